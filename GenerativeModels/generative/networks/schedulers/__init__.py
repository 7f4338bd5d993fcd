# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
Noise schedulers under their monai-generative 0.2.3 names: MONAI core's classes, whose arguments and defaults are
0.2.3's. See the submodules for the two behaviour changes core made (inference timestep spacing of DDPM/DDIM and
the corrected cosine schedule).
"""

from __future__ import annotations

from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .pndm import PNDMScheduler
from .scheduler import NoiseSchedules, Scheduler

__all__ = ["DDIMScheduler", "DDPMScheduler", "NoiseSchedules", "PNDMScheduler", "Scheduler"]
