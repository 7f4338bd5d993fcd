"""How settings problems spell what they name: a value as the user wrote it in YAML, a key path, the closest valid
key, a number, and a value as written after ``--set key=``. Every module of the package words its messages with
these, so that one value reads the same in every message."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import yaml

from ..fileio import plain

__all__ = ["show", "short", "num", "key_path", "suggest", "set_value"]


def show(value: Any) -> str:
    """A value as the user wrote it in YAML, with its YAML type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (boolean)"
    kind = {int: "integer", float: "float", str: "string", list: "list", tuple: "list", dict: "mapping"}.get(
        type(value), type(value).__name__
    )
    shown = repr(value) if not isinstance(value, (list, tuple, dict)) else short(value)
    return f"{shown} ({kind})"


def short(value: Any, limit: int = 60) -> str:
    """A value as one line of flow-style YAML, cut to ``limit`` characters."""
    text = yaml.safe_dump(plain(value), default_flow_style=True).strip()
    if text.endswith("\n..."):
        text = text[:-4].strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def num(x: Any) -> str:
    """A number without a trailing ``.0`` when it is whole."""
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def key_path(parent: str, key: Any) -> str:
    """The dotted path of ``key`` under ``parent`` (``a.b``; a list index as ``a[0]``)."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def suggest(name: str, choices: Sequence[str]) -> str:
    """``did you mean 'x'?`` for the closest of ``choices``, else the list of valid keys."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return "valid keys: " + ", ".join(choices)


def set_value(value: Any) -> str:
    """A value as written after ``--set key=`` (YAML flow style: ``true``, ``null``, ``[4, 2]``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(set_value(v) for v in value) + "]"
    return str(value)
