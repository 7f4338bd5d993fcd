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

import numpy as np
import torch
from monai.networks.schedulers import NoiseSchedules, Scheduler

__all__ = ["NoiseSchedules", "Scheduler"]


def timesteps_023(
    num_train_timesteps: int, num_inference_steps: int, steps_offset: int = 0, device: str | torch.device | None = None
) -> torch.Tensor:
    """
    Inference timesteps as 0.2.3's DDPM and DDIM schedulers chose them: multiples of ``T // n`` from
    ``(n - 1) * (T // n)`` down to 0, plus ``steps_offset``.

    Args:
        num_train_timesteps: ``T``, the number of training timesteps.
        num_inference_steps: ``n``, the number of sampling steps.
        steps_offset: added to every timestep (DDIM).
        device: device of the returned ``int64`` tensor.

    Raises:
        ValueError: when ``n > T`` (the model was not trained for that many steps).
    """
    if num_inference_steps > num_train_timesteps:
        raise ValueError(
            f"`num_inference_steps`: {num_inference_steps} cannot be larger than `self.num_train_timesteps`: "
            f"{num_train_timesteps} as the unet model trained with this scheduler can only handle maximal "
            f"{num_train_timesteps} timesteps."
        )
    step_ratio = num_train_timesteps // num_inference_steps
    timesteps = np.arange(num_inference_steps, dtype=np.int64)[::-1] * step_ratio + steps_offset
    return torch.from_numpy(timesteps.copy()).to(device)


def check_clip_range(clip_sample_min: float, clip_sample_max: float) -> None:
    """
    Raise ``ValueError`` unless ``clip_sample_min < clip_sample_max`` (upstream main's check, #495).

    Args:
        clip_sample_min: lower clipping bound of the predicted clean sample.
        clip_sample_max: upper clipping bound.
    """
    if clip_sample_min >= clip_sample_max:
        raise ValueError(
            f"clip_sample_min must be < clip_sample_max, got clip_sample_min={clip_sample_min} and "
            f"clip_sample_max={clip_sample_max}."
        )
