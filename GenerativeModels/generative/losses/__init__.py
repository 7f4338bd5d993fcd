# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""Losses under their monai-generative 0.2.3 names; importing needs neither ``lpips`` nor ``torchvision``."""

from __future__ import annotations

from .adversarial_loss import PatchAdversarialLoss
from .perceptual import PerceptualLoss
from .spectral_loss import JukeboxLoss

__all__ = ["JukeboxLoss", "PatchAdversarialLoss", "PerceptualLoss"]
