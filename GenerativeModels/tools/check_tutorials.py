"""Check the ``generative`` calls of MONAI's generative tutorials against this fork (the compatibility table).

Usage: ``python GenerativeModels/tools/check_tutorials.py TUTORIALS_DIR`` with ``generative`` importable (this
fork) and ``TUTORIALS_DIR`` a checkout of upstream's ``tutorials/generative`` (only its ``*.py`` files are read;
nothing is run from them).

For every tutorial it reports each ``generative`` import (does the name import from that path?), and each call the
script can attribute to a ``generative`` name: a constructor or function imported from ``generative``, or a method
of a variable assigned from such a constructor (``x = Name(...)``, also ``Name(...).to(device)``). Each call's
positional count and keyword names are bound to the fork's signature; a constructor whose arguments are all
literals is also built. Calls with ``*args``/``**kwargs`` are listed as not bound.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
from pathlib import Path


def _imports(tree: ast.AST) -> dict[str, tuple[str, str]]:
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "generative":
            for alias in node.names:
                names[alias.asname or alias.name] = (node.module, alias.name)
    return names


def _constructed(node: ast.AST) -> ast.Call | None:
    """The ``Name(...)`` call of ``Name(...)`` or ``Name(...).to(...)`` (and similar chained calls)."""
    while isinstance(node, ast.Call):
        if isinstance(node.func, ast.Name):
            return node
        if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Call):
            node = node.func.value
        else:
            return None
    return None


def _bind(target, call: ast.Call, skip_self: bool = False) -> str:
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return "not bound (*args/**kwargs)"
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError) as exc:
        return f"no signature ({exc})"
    params = list(sig.parameters.values())
    if skip_self and params and params[0].name == "self":
        params = params[1:]
    sig = sig.replace(parameters=params)
    try:
        sig.bind_partial(*range(len(call.args)), **{k.arg: None for k in call.keywords})
    except TypeError as exc:
        return f"FAILS: {exc}"
    return "ok"


def _literal_args(call: ast.Call):
    try:
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (ValueError, TypeError, SyntaxError):
        return None
    return args, kwargs


def check(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    lines = []
    objects = {}
    imported = _imports(tree)
    for local, (module, name) in sorted(imported.items()):
        try:
            objects[local] = getattr(importlib.import_module(module), name)
            lines.append(f"  import {module}.{name}: ok")
        except (ImportError, AttributeError) as exc:
            lines.append(f"  import {module}.{name}: FAILS: {exc!r}")
    types = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            call = _constructed(node.value)
            if call is not None and call.func.id in objects and inspect.isclass(objects[call.func.id]):
                types[node.targets[0].id] = objects[call.func.id]
    seen = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Name) and node.func.id in objects:
            obj = objects[node.func.id]
            what = node.func.id
            result = _bind(obj.__init__ if inspect.isclass(obj) else obj, node, skip_self=inspect.isclass(obj))
            if result == "ok" and inspect.isclass(obj):
                literal = _literal_args(node)
                if literal is not None:
                    try:
                        obj(*literal[0], **literal[1])
                        result = "ok, built"
                    except Exception as exc:  # noqa: BLE001 - reported, this is what the check is for
                        result = f"FAILS to build: {type(exc).__name__}: {exc}"
        elif isinstance(node.func, ast.Name) and node.func.id in types:
            what = f"{node.func.id}(...) [{types[node.func.id].__name__}.__call__]"
            result = _bind(types[node.func.id].__call__, node, skip_self=True)
        elif (isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
              and node.func.value.id in types):
            cls = types[node.func.value.id]
            what = f"{node.func.value.id}.{node.func.attr} [{cls.__name__}.{node.func.attr}]"
            member = getattr(cls, node.func.attr, None)
            if member is None:
                result = "FAILS: no such attribute"
            elif callable(member):
                result = _bind(member, node, skip_self=True)
            else:
                result = "ok (attribute)"
        else:
            continue
        kws = ",".join(k.arg or "**" for k in node.keywords)
        key = (what, len(node.args), kws, result)
        if key not in seen:
            seen.add(key)
            lines.append(f"  line {node.lineno}: {what}({len(node.args)} positional; {kws}): {result}")
    return lines


def main(argv: list[str]) -> int:
    root = Path(argv[1])
    failures = 0
    for path in sorted(root.rglob("*.py")):
        lines = check(path)
        failures += sum("FAILS" in line for line in lines)
        print(path.relative_to(root))
        print("\n".join(lines) if lines else "  (no generative calls)")
    print(f"{failures} failing checks")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
