# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""Diffusion inferers under their monai-generative 0.2.3 names (MONAI core's classes)."""

from __future__ import annotations

from .inferer import (
    ControlNetDiffusionInferer,
    ControlNetLatentDiffusionInferer,
    DiffusionInferer,
    LatentDiffusionInferer,
    VQVAETransformerInferer,
)

__all__ = [
    "ControlNetDiffusionInferer",
    "ControlNetLatentDiffusionInferer",
    "DiffusionInferer",
    "LatentDiffusionInferer",
    "VQVAETransformerInferer",
]
