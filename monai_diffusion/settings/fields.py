"""How a settings field is declared: a default, a one-line doc and numeric bounds.

The converter (:mod:`.load`) applies the bounds, the reference generator (:mod:`.reference`) prints the doc, and the
synthetic generators' parameter dataclasses (:mod:`.synthetic_kinds`) use the same metadata for their own checks.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

__all__ = ["setting", "section"]


def setting(
    default: Any, doc: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None
) -> Any:
    """A settings field: default, one-line doc, numeric bounds applied to the value (or every number in a list)."""
    return field(default=default, metadata={"doc": doc, "ge": ge, "gt": gt, "le": le})


def section(cls: type, doc: str) -> Any:
    """A nested settings section with all its defaults."""
    return field(default_factory=cls, metadata={"doc": doc})
