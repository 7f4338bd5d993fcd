"""Writing files so that nothing a user made is lost: one atomic write, one plain-data conversion, one
never-overwrite rule.

Ground floor: imports nothing of the application.

* :func:`atomic_write` writes through a temporary file in the same folder, flushes and fsyncs it, then renames it
  over the target, so a reader (or a killed run) sees either the old file or the complete new one.
* :func:`plain` turns what the app holds (dataclasses, tuples, paths, numpy and torch values) into dicts, lists,
  strings and numbers: what YAML, JSON and a ``weights_only`` checkpoint can hold.
* :func:`refuse_existing` is the never-overwrite rule: an existing output is an error unless the user asked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_target", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "plain",
    "refuse_existing",
]


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffixes, so writers that pick a format from the name work) for the
    caller to write; on leaving the block the file is fsynced and renamed to ``path``.

    The parent folder is created if needed. If the block raises, the temporary file is removed and ``path`` is
    untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a binary file at an :func:`atomic_target` of ``path``: ``path`` ends up either as it was or
    complete. Returns ``path`` as a :class:`~pathlib.Path`."""
    path = Path(path)
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of ``text`` as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int = 2, sort_keys: bool = True) -> Path:
    """:func:`atomic_write` of ``obj`` as JSON (converted with ``plain(obj, json=True)``), ending in a newline."""
    text = json.dumps(plain(obj, json=True), indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


_KEY_TYPES = (str, int, float, bool, type(None))


def plain(value: Any, *, json: bool = False) -> Any:
    """``value`` as plain data: dicts, lists, str, int, float, bool and None.

    Dataclasses become dicts of their fields, mappings dicts (keys that are not str/number/bool/None become
    strings), tuples and other sequences lists, numpy and torch scalars Python numbers, arrays and tensors nested
    lists, paths strings. With ``json=True`` a float that is NaN or infinite becomes None (JSON has no such value).
    Anything else is returned unchanged.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name), json=json) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {(k if isinstance(k, _KEY_TYPES) else str(k)): plain(v, json=json) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, json=json) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy and torch scalars, arrays, tensors
        return plain(value.tolist(), json=json)
    if json and isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def refuse_existing(paths: Iterable[str | Path], overwrite: bool = False, hint: str = "it is not replaced unless asked",
                    error: type[Exception] = FileExistsError) -> None:
    """The never-overwrite rule: raise ``error`` naming the first of ``paths`` that exists, unless ``overwrite``."""
    if overwrite:
        return
    for path in paths:
        if Path(path).exists():
            raise error(f"{path} already exists; {hint}")
