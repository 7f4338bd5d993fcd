# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
monai-generative 0.2.3's DDPM scheduler, now provided by MONAI core with the same arguments and defaults.

Core adds ``clip_sample_min=-1.0`` and ``clip_sample_max=1.0`` (0.2.3's fixed clipping range). Behaviour differences
from 0.2.3: ``set_timesteps(n)`` spreads the steps from ``T - 1`` down to 0 (``linspace``), where 0.2.3 used
``(n - 1) * (T // n), ..., T // n, 0`` and so never started from the noisiest step (both agree when ``n == T``);
and ``schedule="cosine"`` is core's corrected version (see :mod:`generative.networks.schedulers.scheduler`).
"""

from __future__ import annotations

from monai.networks.schedulers.ddpm import DDPMPredictionType, DDPMScheduler, DDPMVarianceType

__all__ = ["DDPMScheduler", "DDPMPredictionType", "DDPMVarianceType"]
