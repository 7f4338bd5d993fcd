# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
monai-generative 0.2.3's scheduler base class and noise schedule registry, now provided by MONAI core.

Arguments and defaults are unchanged (``num_train_timesteps=1000``, ``schedule="linear_beta"``, ``**schedule_args``),
and ``NoiseSchedules`` is core's registry itself, so schedules added with ``NoiseSchedules.add_def`` reach every
scheduler. One numeric difference from 0.2.3: core corrected ``schedule="cosine"``. 0.2.3 returned the cosine curve
as ``alphas_cumprod`` starting at exactly 1, which made the last sampling step (t = 0) of the DDPM, DDIM and PNDM
schedulers divide by zero and return NaN; core rebuilds ``alphas_cumprod`` from the clipped betas, which shifts the
noise levels by one step.
"""

from __future__ import annotations

from monai.networks.schedulers import NoiseSchedules, Scheduler

__all__ = ["NoiseSchedules", "Scheduler"]
