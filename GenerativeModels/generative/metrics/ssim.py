# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""monai-generative 0.2.3's ``SSIMMetric`` (``kernel_size``) on top of MONAI core's (``win_size``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.metrics.regression import KernelType
from monai.metrics.regression import SSIMMetric as _CoreSSIMMetric
from monai.metrics.regression import compute_ssim_and_cs as _core_compute_ssim_and_cs
from monai.utils import MetricReduction, ensure_tuple_rep

from ..networks.nets._compat import pick_renamed_arg

__all__ = ["KernelType", "SSIMMetric", "compute_ssim_and_cs"]


class SSIMMetric(_CoreSSIMMetric):
    """
    Structural similarity index, with monai-generative 0.2.3's argument names.

    Differences from MONAI core's ``SSIMMetric``:
        - ``kernel_size`` (0.2.3) is core's ``win_size``; ``win_size`` is accepted as a keyword; both is a
          ``TypeError``.

    Args:
        spatial_dims: number of spatial dimensions of the images (2 or 3).
        data_range: value range of the images (max - min).
        kernel_type: ``"gaussian"`` or ``"uniform"``.
        kernel_size: window size, one int or one per axis (0.2.3 name). Defaults to 11.
        kernel_sigma: standard deviation of the Gaussian window, one or one per axis.
        k1: stability constant of the luminance term.
        k2: stability constant of the contrast term.
        reduction: how to reduce over the batch (a ``MetricReduction``).
        get_not_nans: also return the number of non-NaN values.
        win_size: MONAI core name of ``kernel_size``.
    """

    def __init__(
        self,
        spatial_dims: int,
        data_range: float = 1.0,
        kernel_type: KernelType | str = KernelType.GAUSSIAN,
        kernel_size: int | Sequence[int] | None = None,
        kernel_sigma: float | Sequence[float] = 1.5,
        k1: float = 0.01,
        k2: float = 0.03,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        *,
        win_size: int | Sequence[int] | None = None,
    ) -> None:
        win_size = pick_renamed_arg(type(self).__name__, "kernel_size", kernel_size, "win_size", win_size, 11)
        super().__init__(
            spatial_dims=spatial_dims,
            data_range=data_range,
            kernel_type=kernel_type,
            win_size=win_size,
            kernel_sigma=kernel_sigma,
            k1=k1,
            k2=k2,
            reduction=reduction,
            get_not_nans=get_not_nans,
        )


def compute_ssim_and_cs(
    y_pred: torch.Tensor,
    y: torch.Tensor,
    spatial_dims: int,
    data_range: float = 1.0,
    kernel_type: KernelType | str = KernelType.GAUSSIAN,
    kernel_size: int | Sequence[int] = 11,
    kernel_sigma: float | Sequence[float] = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    SSIM and contrast-sensitivity maps, in 0.2.3's argument order (core's makes the kernel arguments required and
    puts them before ``data_range``). Scalars are repeated over the ``spatial_dims`` axes.

    Args:
        y_pred: predicted images, ``(B, C, *spatial)``.
        y: reference images, same shape as ``y_pred``.
        spatial_dims: number of spatial dimensions (2 or 3).
        data_range: value range of the images.
        kernel_type: ``"gaussian"`` or ``"uniform"``.
        kernel_size: window size, one int or one per axis.
        kernel_sigma: standard deviation of the Gaussian window, one or one per axis.
        k1: stability constant of the luminance term.
        k2: stability constant of the contrast term.
    """
    return _core_compute_ssim_and_cs(
        y_pred=y_pred,
        y=y,
        spatial_dims=spatial_dims,
        kernel_size=ensure_tuple_rep(kernel_size, spatial_dims),
        kernel_sigma=ensure_tuple_rep(kernel_sigma, spatial_dims),
        data_range=data_range,
        kernel_type=kernel_type,
        k1=k1,
        k2=k2,
    )
