# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
monai-generative 0.2.3's PNDM scheduler, now provided by MONAI core with the same arguments, defaults and timestep
spacing. Only ``schedule="cosine"`` differs: it is core's corrected version (see
:mod:`generative.networks.schedulers.scheduler`).
"""

from __future__ import annotations

from monai.networks.schedulers.pndm import PNDMPredictionType, PNDMScheduler

__all__ = ["PNDMScheduler", "PNDMPredictionType"]
