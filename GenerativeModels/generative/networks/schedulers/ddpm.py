# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
monai-generative's DDPM scheduler: MONAI core's, with 0.2.3's inference timestep spacing and upstream main's
clipping range check.

Arguments, order and defaults are upstream main's (0.2.3's plus ``clip_sample_min=-1`` and ``clip_sample_max=1``
from #495, which core also has). Differences from core: ``set_timesteps(n)`` spaces the steps as 0.2.3 did,
``(n - 1) * (T // n), ..., T // n, 0`` (core spreads them from ``T - 1`` to 0; both agree when ``n == T``), and
``clip_sample_min >= clip_sample_max`` is a ``ValueError`` as in upstream main. ``schedule="cosine"`` is core's
corrected version (see :mod:`generative.networks.schedulers.scheduler`).
"""

from __future__ import annotations

import torch
from monai.networks.schedulers.ddpm import DDPMPredictionType, DDPMVarianceType
from monai.networks.schedulers.ddpm import DDPMScheduler as _CoreDDPMScheduler

from .scheduler import check_clip_range, timesteps_023

__all__ = ["DDPMScheduler", "DDPMPredictionType", "DDPMVarianceType"]


class DDPMScheduler(_CoreDDPMScheduler):
    """
    Denoising diffusion probabilistic model scheduler (Ho et al. 2020): ``monai.networks.schedulers.DDPMScheduler``
    with 0.2.3's ``set_timesteps`` spacing.

    Args:
        num_train_timesteps: number of diffusion steps used to train the model.
        schedule: name of a noise schedule in ``NoiseSchedules``.
        variance_type: a ``DDPMVarianceType``.
        clip_sample: clip the predicted clean sample to ``[clip_sample_min, clip_sample_max]``.
        prediction_type: a ``DDPMPredictionType``.
        clip_sample_min: lower clipping bound (upstream main).
        clip_sample_max: upper clipping bound (upstream main); must be above ``clip_sample_min``.
        schedule_args: arguments of the noise schedule.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        variance_type: str = DDPMVarianceType.FIXED_SMALL,
        clip_sample: bool = True,
        prediction_type: str = DDPMPredictionType.EPSILON,
        clip_sample_min: float = -1.0,
        clip_sample_max: float = 1.0,
        **schedule_args,
    ) -> None:
        check_clip_range(clip_sample_min, clip_sample_max)
        super().__init__(
            num_train_timesteps,
            schedule,
            variance_type,
            clip_sample,
            prediction_type,
            clip_sample_min,
            clip_sample_max,
            **schedule_args,
        )

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """
        Choose the timesteps of the sampling chain, spaced as 0.2.3 did (see the module docstring).

        Args:
            num_inference_steps: number of sampling steps, at most ``num_train_timesteps``.
            device: where to put ``self.timesteps``.

        Raises:
            ValueError: when ``num_inference_steps`` exceeds ``num_train_timesteps``.
        """
        self.timesteps = timesteps_023(self.num_train_timesteps, num_inference_steps, 0, device)
        self.num_inference_steps = num_inference_steps
