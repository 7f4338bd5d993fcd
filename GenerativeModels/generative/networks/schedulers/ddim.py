# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
monai-generative's DDIM scheduler: MONAI core's, with 0.2.3's inference timestep spacing and upstream main's
clipping range check.

Arguments, order and defaults are upstream main's (0.2.3's plus ``clip_sample_min=-1`` and ``clip_sample_max=1``
from #495, which core also has). Differences from core: ``set_timesteps(n)`` spaces the steps as 0.2.3 did,
``(n - 1) * (T // n), ..., T // n, 0`` plus ``steps_offset`` (core spreads them from ``T - 1 - steps_offset`` to 0
and checks ``0 <= steps_offset < T``; both agree when ``n == T`` and the offset is 0), and
``clip_sample_min >= clip_sample_max`` is a ``ValueError`` as in upstream main. ``step`` (core's, like 0.2.3's)
goes from ``t`` to ``t - T // n``, which is the next timestep only with this spacing. ``schedule="cosine"`` is
core's corrected version (see :mod:`generative.networks.schedulers.scheduler`).
"""

from __future__ import annotations

import torch
from monai.networks.schedulers.ddim import DDIMPredictionType
from monai.networks.schedulers.ddim import DDIMScheduler as _CoreDDIMScheduler

from .scheduler import check_clip_range, timesteps_023

__all__ = ["DDIMScheduler", "DDIMPredictionType"]


class DDIMScheduler(_CoreDDIMScheduler):
    """
    Denoising diffusion implicit model scheduler (Song et al. 2020): ``monai.networks.schedulers.DDIMScheduler``
    with 0.2.3's ``set_timesteps`` spacing.

    Args:
        num_train_timesteps: number of diffusion steps used to train the model.
        schedule: name of a noise schedule in ``NoiseSchedules``.
        clip_sample: clip the predicted clean sample to ``[clip_sample_min, clip_sample_max]``.
        set_alpha_to_one: use 1 as the cumulative alpha before step 0 (else the value at step 0).
        steps_offset: added to every inference timestep.
        prediction_type: a ``DDIMPredictionType``.
        clip_sample_min: lower clipping bound (upstream main).
        clip_sample_max: upper clipping bound (upstream main); must be above ``clip_sample_min``.
        schedule_args: arguments of the noise schedule.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = DDIMPredictionType.EPSILON,
        clip_sample_min: float = -1.0,
        clip_sample_max: float = 1.0,
        **schedule_args,
    ) -> None:
        check_clip_range(clip_sample_min, clip_sample_max)
        super().__init__(
            num_train_timesteps,
            schedule,
            clip_sample,
            set_alpha_to_one,
            steps_offset,
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
        self.timesteps = timesteps_023(self.num_train_timesteps, num_inference_steps, self.steps_offset, device)
        self.num_inference_steps = num_inference_steps
