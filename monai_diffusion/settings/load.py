"""YAML file (+ ``--set key=value`` overrides) -> typed, validated settings.

This module reads the YAML (a key written twice in one section is an error), applies ``--set`` overrides (key paths
checked against the schema), folds the seed system's configs (:mod:`.legacy`), converts the plain values to the
schema's dataclasses and hands them to the cross-field checks (:mod:`.checks`). The converter reports:

* unknown keys at any level (with the closest valid name: ``did you mean 'n_epochs'?``),
* wrong types (``true`` is not an integer, ``2.5`` is not an integer, a scalar is not a list, ...),
* values out of range and unknown enum values.

Notes on values:

* Floats: YAML 1.1 (PyYAML) reads ``1e-4`` (no dot in the mantissa) as the *string* ``"1e-4"``. Float fields accept
  such strings when they parse as a number, so ``learning_rate: 1e-4`` and ``learning_rate: 1.0e-4`` mean the same.
  Integer fields never accept strings, floats or booleans.
* Enum values (``crop_mode``, ``schedule``, ...) are matched case-insensitively and stored in their canonical
  lower-case spelling.
* A section written with nothing under it (``training:``) means "all defaults".
* An int ``data.voxel_size`` / ``data.voxel_resize`` is a cube: one int per axis.
* Relative paths are kept as written; they are relative to the working directory of the process, not to the YAML.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Tuple, Union, get_args, get_origin, get_type_hints

import yaml

from ..errors import ConfigError
from .checks import check_data_section, validate
from .legacy import fold_seed_vqvae, renamed, seed_conditional_defaults, seed_names
from .messages import key_path, num, show, suggest
from .schema import STAGES, DataSettings, Settings

__all__ = [
    "settings_from_dict",
    "load_settings",
    "apply_overrides",
    "add_config_args",
    "settings_from_args",
    "build_data_settings",
    "describe",
    "hints",
]


class _Problem(Exception):
    """Internal: one problem at one key path, raised while converting a value."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(key, message)
        self.key = key
        self.message = message


# --------------------------------------------------------------------------------------------------------------------
# conversion of plain values to typed settings
# --------------------------------------------------------------------------------------------------------------------


_NONE = type(None)
_FLOAT_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_HINTS: dict[type, dict[str, Any]] = {}


def hints(cls: type) -> dict[str, Any]:
    """The resolved type of every field of a settings dataclass (cached)."""
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def describe(tp: Any, plural: bool = False) -> str:
    """Human description of an expected type."""
    origin = get_origin(tp)
    if tp is bool:
        return "true/false values" if plural else "true or false"
    if tp is int:
        return "integers" if plural else "an integer"
    if tp is float:
        return "numbers" if plural else "a number"
    if tp is str:
        return "strings" if plural else "a string"
    if dataclasses.is_dataclass(tp):
        return "sections" if plural else "a section (a mapping of keys)"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (tuple, Tuple):
        inner = get_args(tp)[0]
        if get_origin(inner) is Union:
            return f"a list whose entries are each {describe(inner)}"
        return f"a list of {describe(inner, plural=True)}"
    if origin is Union:
        args = [a for a in get_args(tp) if a is not _NONE]
        text = " or ".join(describe(a, plural) for a in args)
        return text + (" or null" if _NONE in get_args(tp) else "")
    return str(tp)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a plain YAML value to ``tp`` or raise _Problem naming ``key``."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Union:
        args = get_args(tp)
        if value is None:
            if _NONE in args:
                return None
            raise _Problem(key, f"expected {describe(tp)}, got null")
        options = [a for a in args if a is not _NONE]
        # pick the branch that has the value's shape so that errors point inside it
        if isinstance(value, (list, tuple)):
            shaped = [a for a in options if get_origin(a) in (tuple, Tuple)]
        elif isinstance(value, Mapping):
            shaped = [a for a in options if dataclasses.is_dataclass(a)]
        else:
            shaped = [a for a in options if get_origin(a) not in (tuple, Tuple) and not dataclasses.is_dataclass(a)]
        if len(shaped) == 1:
            try:
                return _convert(value, shaped[0], key)
            except _Problem as p:
                if p.key != key or len(options) == 1:
                    raise
                raise _Problem(key, f"expected {describe(tp)}, got {show(value)}") from None
        for option in shaped:
            try:
                return _convert(value, option, key)
            except _Problem:
                continue
        raise _Problem(key, f"expected {describe(tp)}, got {show(value)}")
    if value is None:
        raise _Problem(key, f"expected {describe(tp)}, got null")
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise _Problem(key, f"expected {describe(tp)}, got {show(value)}")
        inner = get_args(tp)[0]
        return tuple(_convert(v, inner, key_path(key, i)) for i, v in enumerate(value))
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, str):
            for choice in choices:
                if isinstance(choice, str) and value.lower() == choice:
                    return choice
        hint = difflib.get_close_matches(str(value).lower(), [c for c in choices if isinstance(c, str)], n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise _Problem(key, f"expected {describe(tp)}, got {show(value)}{extra}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Problem(key, f"expected true or false, got {show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        extra = ""
        if isinstance(value, float) and value.is_integer():
            extra = f"; write {int(value)}"
        elif isinstance(value, bool):
            extra = " (YAML true/false are booleans, not numbers)"
        raise _Problem(key, f"expected an integer, got {show(value)}{extra}")
    if tp is float:
        if isinstance(value, bool):
            raise _Problem(key, f"expected a number, got {show(value)}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            # YAML 1.1 reads 1e-4 (no dot) as a string: accept it as the number it obviously is
            return float(value)
        raise _Problem(key, f"expected a number (e.g. 1.0e-4), got {show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Problem(key, f"expected a string, got {show(value)} (quote it in YAML if it should be text)")
    raise TypeError(f"unsupported settings type {tp!r} at {key}")  # pragma: no cover - schema bug


def _check_bounds(value: Any, meta: Mapping[str, Any], key: str) -> None:
    """Apply ge/gt/le bounds to a number, or to every number inside nested lists."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, tuple):
        for i, v in enumerate(value):
            _check_bounds(v, meta, key_path(key, i))
        return
    if not isinstance(value, (int, float)):
        return
    ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
    if ge is not None and value < ge:
        raise _Problem(key, f"must be >= {num(ge)}, got {num(value)}")
    if gt is not None and not value > gt:
        raise _Problem(key, f"must be > {num(gt)}, got {num(value)}")
    if le is not None and value > le:
        span = f" (between {num(ge if ge is not None else gt)} and {num(le)})" if (ge, gt) != (None, None) else ""
        raise _Problem(key, f"must be <= {num(le)}{span}, got {num(value)}")



def _build(cls: type, raw: Any, key: str, problems: list[tuple[str, str]] | None = None) -> Any:
    """Build dataclass ``cls`` from a mapping; problems of fields are appended to ``problems`` (or raised)."""
    own = problems is None
    problems = [] if own else problems
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        p = _Problem(key or "<top level>", f"expected a section (a mapping of keys), got {show(raw)}")
        if own:
            raise p
        problems.append((p.key, p.message))
        return cls()
    types = hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name in raw:
        if name not in names:
            problems.append((key_path(key, name), f"unknown key; {suggest(name, names)}"))
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        sub = key_path(key, f.name)
        tp = types[f.name]
        try:
            if dataclasses.is_dataclass(tp):
                kwargs[f.name] = _build(tp, raw[f.name], sub, problems)
            else:
                value = _convert(raw[f.name], tp, sub)
                _check_bounds(value, f.metadata, sub)
                kwargs[f.name] = value
        except _Problem as p:
            problems.append((p.key, p.message))
    if own and problems:
        raise _Problem(*problems[0])
    return cls(**kwargs)



# --------------------------------------------------------------------------------------------------------------------
# reading, overriding, folding, validating
# --------------------------------------------------------------------------------------------------------------------


def settings_from_dict(
    d: Mapping[str, Any] | None, check_paths: bool = True, *, require_data: bool = True, stage: Optional[str] = None
) -> Settings:
    """Validate a plain (YAML-like) dict and build typed settings.

    Args:
        d: nested dict with the keys of :class:`Settings`; missing keys take their defaults; None = all defaults.
        check_paths: check that data folders / the datalist / the perceptual weights file exist, and that a data
            source is given at all. False validates the document only (no filesystem access).
        require_data: False skips the data-source presence and existence checks (for tools that read no data,
            like sampling); conflicting sources are still an error.
        stage: the command the settings are for (``"autoencoder"``, ``"diffusion"``, ``"sampling"``) or None;
            ``"diffusion"`` adds stage 2's own checks (no ``random_patch``, the stage-1 checkpoint is given and
            exists).

    Raises:
        ConfigError: listing every problem found (key path, given value, expected value).
    """
    if stage is not None and stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES} or None, got {stage!r}")
    problems: list[tuple[str, str]] = []
    names = seed_names(d)
    # the seed's top-level vqvae: section, if any, as autoencoder.type vq; its conditional config as pixel space
    folded = seed_conditional_defaults(fold_seed_vqvae(d))
    settings = _build(Settings, _expand_cube_sizes(folded, _raw_spatial_dims(folded)), "", problems)
    if problems:
        raise renamed(ConfigError(problems=problems), names)
    try:
        validate(settings, check_paths, require_data, stage)
    except ConfigError as e:
        raise renamed(e, names) from None
    return settings


_CUBE_KEYS = ("voxel_size", "voxel_resize")


def _raw_spatial_dims(d: Mapping[str, Any] | None) -> int:
    """``autoencoder.spatial_dims`` of a raw document when it is 2 or 3, else the default 3 (a wrong value is
    reported by the checks)."""
    ae = d.get("autoencoder") if isinstance(d, Mapping) else None
    dims = ae.get("spatial_dims") if isinstance(ae, Mapping) else None
    return dims if isinstance(dims, int) and not isinstance(dims, bool) and dims in (2, 3) else 3


def _expand_cube_sizes(d: Mapping[str, Any] | None, dims: int, section: str | None = "data") -> Any:
    """A copy of the raw document in which an int ``data.voxel_size`` / ``data.voxel_resize`` (a cube) is one int
    per axis, so that the typed settings always hold a tuple. Anything else is left for the schema to judge.

    Args:
        d: the raw document (or, with ``section=None``, the raw ``data`` section itself).
        dims: number of spatial axes.
        section: the key of the data section in ``d``, or None when ``d`` is the section.
    """
    data = d if section is None else (d.get(section) if isinstance(d, Mapping) else None)
    if not isinstance(data, Mapping):
        return d
    cubes = {k: [data[k]] * dims for k in _CUBE_KEYS
             if isinstance(data.get(k), int) and not isinstance(data.get(k), bool)}
    if not cubes:
        return d
    data = {**data, **cubes}
    return data if section is None else {**d, section: data}


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice in one mapping (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is written twice in the same section (first at line "
                            f"{seen[key].start_mark.line + 1})", key_node.start_mark,
            )
        if isinstance(key, (str, int, float, bool)):
            seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        what = "is a folder, expected a YAML file" if path.exists() else "not found"
        raise ConfigError(f"config file {what}: {str(path)!r} (resolved to {path.resolve()})", key="--config")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse YAML: {e}", key="", source=str(path)) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"the top level must be a mapping of sections (data:, autoencoder:, ...), "
                          f"got {show(raw)}", source=str(path))
    return raw


def _split_key(dotted: str) -> list[str]:
    return [part.strip() for part in dotted.split(".")]


def apply_overrides(d: Mapping[str, Any] | None, overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``d`` with ``"a.b.c=value"`` overrides applied (values parsed with ``yaml.safe_load``).

    Key names are checked against the schema (unknown key -> ConfigError with the closest valid name); values are
    validated later, with the rest of the settings.
    """
    out: dict[str, Any] = copy.deepcopy(dict(d)) if d else {}
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} must look like KEY=VALUE, e.g. autoencoder.training.n_epochs=5",
                              key="--set")
        dotted, text = item.split("=", 1)
        parts = _split_key(dotted)
        if not dotted.strip() or any(not p for p in parts):
            raise ConfigError(f"override {item!r} has an empty key part; expected e.g. data.voxel_size=[64, 64, 64]",
                              key="--set")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse the value of override {item!r} as YAML: {e}",
                              key=dotted.strip()) from None
        # check the key path against the schema
        cls: Any = Settings
        for i, part in enumerate(parts):
            here = ".".join(parts[: i + 1])
            if not dataclasses.is_dataclass(cls):
                raise ConfigError(f"override --set {item!r}: {'.'.join(parts[:i])} is a value, not a section",
                                  key=here)
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                raise ConfigError(f"unknown key in override --set {item!r}; {suggest(part, names)}", key=here)
            cls = hints(cls)[part]
        # set it in the raw dict
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(
                    f"cannot apply --set {item!r}: the config gives {'.'.join(parts[: i + 1])} the value "
                    f"{show(nxt)} instead of a section", key=".".join(parts[: i + 1]),
                )
            node = nxt
        node[parts[-1]] = value
    return out


def load_settings(
    path: str | Path | None, overrides: Sequence[str] = (), check_paths: bool = True, *, require_data: bool = True,
    stage: Optional[str] = None,
) -> Settings:
    """Read a YAML config, apply ``--set`` overrides, validate, and return typed settings.

    Args:
        path: YAML file; None = defaults only.
        overrides: ``"a.b.c=value"`` strings, applied in order after the file; values are parsed as YAML
            (``5``, ``true``, ``[4, 2]``, ``null``, ``1e-4``).
        check_paths: see :func:`settings_from_dict`.
        require_data: see :func:`settings_from_dict`.
        stage: see :func:`settings_from_dict`.

    Raises:
        ConfigError: for an unreadable file, an unknown override key, or any invalid value (the file is named).
    """
    raw = {} if path is None else _read_yaml(Path(path).expanduser())
    names = seed_names(raw)  # problems of a seed vqvae: section name its keys as written there
    try:
        raw = apply_overrides(fold_seed_vqvae(raw), overrides)
        return settings_from_dict(raw, check_paths=check_paths, require_data=require_data, stage=stage)
    except ConfigError as e:
        e = renamed(e, names)
        if path is not None and e.source is None:
            raise e.with_source(path) from None
        raise e from None


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config PATH`` and ``--set KEY=VALUE`` (repeatable) to ``parser``; returns the parser."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", "-c", metavar="PATH", default=None,
                       help="YAML config file (default: built-in defaults); see monai_diffusion/config/")
    group.add_argument("--set", dest="set", metavar="KEY=VALUE", action="append", default=[],
                       help="override one config value, e.g. --set autoencoder.training.n_epochs=5 "
                            "--set data.voxel_size='[64, 64, 32]' (repeatable; values are YAML)")
    return parser


def settings_from_args(
    args: argparse.Namespace, check_paths: bool = True, *, require_data: bool = True, stage: Optional[str] = None
) -> Settings:
    """Settings from the ``--config`` / ``--set`` arguments added by :func:`add_config_args`."""
    return load_settings(getattr(args, "config", None), getattr(args, "set", None) or (),
                         check_paths=check_paths, require_data=require_data, stage=stage)


def build_data_settings(raw: Mapping[str, Any] | None = None, spatial_dims: int = 3) -> DataSettings:
    """The ``data`` section alone, validated with the same schema and checks as in :func:`settings_from_dict`
    (shape, orientation, spacing and intensity checks for ``spatial_dims`` axes; no autoencoder, no paths).

    For tools and tests that read volumes without a whole config (``evaluate --real``).

    Raises:
        ConfigError: naming each ``data.*`` key that is wrong.
    """
    problems: list[tuple[str, str]] = []
    data = _build(DataSettings, _expand_cube_sizes(raw, spatial_dims, section=None), "data", problems)
    if not problems:
        check_data_section(data, spatial_dims, None, problems)
    if problems:
        raise ConfigError(problems=problems)
    return data

