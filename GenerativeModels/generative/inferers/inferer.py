# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
Diffusion inferers of monai-generative 0.2.3, which MONAI core now provides unchanged.

MONAI core's classes take the same arguments, in the same order and with the same defaults, as 0.2.3's; ``sample``
additionally accepts ``cfg`` and ``cfg_fill_value`` (classifier-free guidance, off by default). They only call
methods on the models and schedulers they are given, so this package's networks and schedulers work with them.
``VQVAETransformerInferer`` needs MONAI core's ``VQVAE``, ``DecoderOnlyTransformer`` and ``monai.utils.Ordering``:
this fork has no VQ-VAE of its own.
"""

from __future__ import annotations

from monai.inferers import (
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
