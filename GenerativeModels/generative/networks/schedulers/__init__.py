# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
Noise schedulers under their monai-generative 0.2.3 names, on MONAI core's, with 0.2.3's arguments and defaults plus
upstream main's clipping range (#495). ``DDPMScheduler`` and ``DDIMScheduler`` keep 0.2.3's inference timestep
spacing (core changed it); ``PNDMScheduler``, ``Scheduler`` and ``NoiseSchedules`` are core's. The one numeric
change kept from core is the corrected cosine schedule (see :mod:`generative.networks.schedulers.scheduler`).
"""

from __future__ import annotations

from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .pndm import PNDMScheduler
from .scheduler import NoiseSchedules, Scheduler

__all__ = ["DDIMScheduler", "DDPMScheduler", "NoiseSchedules", "PNDMScheduler", "Scheduler"]
