"""Maintained fork of MONAI Generative Models 0.2.3.

The import paths and argument names of monai-generative 0.2.3 keep working on current MONAI and PyTorch.
Everything except ``AutoencoderKL`` and ``SpatialRescaler`` delegates to MONAI core; ``AutoencoderKL`` gains
per-level ``downsample_factors`` / ``upsample_factors``.
"""

from __future__ import annotations

from .version import __version__

__all__ = ["__version__"]
