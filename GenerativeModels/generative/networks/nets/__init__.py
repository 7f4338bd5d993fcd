# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""Networks under their monai-generative 0.2.3 names; all but ``AutoencoderKL`` are thin layers over MONAI core."""

from __future__ import annotations

from .autoencoderkl import AutoencoderKL, Decoder, Encoder
from .controlnet import ControlNet
from .diffusion_model_unet import DiffusionModelUNet
from .patchgan_discriminator import MultiScalePatchDiscriminator, PatchDiscriminator
from .spade_autoencoderkl import SPADEAutoencoderKL
from .spade_diffusion_model_unet import SPADEDiffusionModelUNet
from .spade_network import SPADENet
from .transformer import DecoderOnlyTransformer
from .vqvae import VQVAE

__all__ = [
    "AutoencoderKL",
    "ControlNet",
    "Decoder",
    "DecoderOnlyTransformer",
    "DiffusionModelUNet",
    "Encoder",
    "MultiScalePatchDiscriminator",
    "PatchDiscriminator",
    "SPADEAutoencoderKL",
    "SPADEDiffusionModelUNet",
    "SPADENet",
    "VQVAE",
]
