"""monai-diffusion: 3D latent diffusion for NIfTI volumes, built on MONAI.

The importable library behind the ``3d_ldm`` scripts: settings, data, models and
the training loop. The patched MONAI Generative Models fork lives in the separate
``generative`` package.

From Python (``docs/python_api.md``)::

    from monai_diffusion import DiffusionPipeline, evaluate_sets

Both names are loaded on first use, so ``import monai_diffusion`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["DiffusionPipeline", "evaluate_sets", "__version__"]

_LAZY = {"DiffusionPipeline": "pipeline", "evaluate_sets": "evaluation"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
