# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""Networks under their monai-generative 0.2.3 names; all but the autoencoder are thin layers over MONAI core."""

from __future__ import annotations

from .autoencoderkl import AutoencoderKL, Decoder, Encoder
from .controlnet import ControlNet
from .diffusion_model_unet import DiffusionModelUNet
from .patchgan_discriminator import MultiScalePatchDiscriminator, PatchDiscriminator

__all__ = [
    "AutoencoderKL",
    "ControlNet",
    "Decoder",
    "DiffusionModelUNet",
    "Encoder",
    "MultiScalePatchDiscriminator",
    "PatchDiscriminator",
]
