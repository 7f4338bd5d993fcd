"""The Markdown reference of every configuration key (``docs/configuration.md``), generated from the schema's
dataclasses: one table per section, in the schema's order, with each key's type, default and doc."""

from __future__ import annotations

import dataclasses

import yaml

from ..fileio import plain
from .load import describe, hints
from .schema import Settings

__all__ = ["settings_reference"]


def settings_reference() -> str:
    """Markdown reference of every configuration key (type, default, meaning), generated from the dataclasses."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `monai_diffusion/settings/schema.py` by `python -m monai_diffusion.settings --reference`;",
        "a test keeps this file in step with the code. Every key is optional; unknown keys are errors.",
        "",
    ]

    def walk(cls: type, prefix: str) -> None:
        types = hints(cls)
        rows = []
        nested = []
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(types[f.name]):
                nested.append((f, types[f.name], key))
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            shown = yaml.safe_dump(plain(default), default_flow_style=True).strip().removesuffix("...").strip()
            kind = describe(types[f.name])
            doc = f.metadata.get("doc", "")
            cells = [f"`{key}`", kind, f"`{shown}`", doc]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        if rows:
            title = prefix.rstrip(".") or "top level"
            doc = (cls.__doc__ or "").strip().splitlines()[0].replace(":func:", "") if cls.__doc__ else ""
            lines.extend([f"## `{title}`", "", doc, "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"])
            lines.extend(rows)
            lines.append("")
        for f, sub, key in nested:
            walk(sub, f"{key}.")

    walk(Settings, "")
    return "\n".join(lines)
