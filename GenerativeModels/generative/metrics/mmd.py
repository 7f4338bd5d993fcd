# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""monai-generative 0.2.3's ``MMDMetric`` (separate transforms for ``y`` and ``y_pred``) on top of MONAI core's."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.metrics.mmd import MMDMetric as _CoreMMDMetric
from monai.metrics.mmd import compute_mmd

__all__ = ["MMDMetric"]


class MMDMetric(_CoreMMDMetric):
    """
    Unbiased maximum mean discrepancy between two batches of images, with 0.2.3's arguments.

    Differences from MONAI core's ``MMDMetric``:
        - 0.2.3 has one transform for ``y`` and one for ``y_pred``; core has a single ``y_mapping`` applied to both.
          Giving ``y_mapping`` here is accepted (keyword-only) and applies to both, after the separate transforms.
        - The value is computed by core's ``compute_mmd``, which 0.2.3's formula equals.

    Args:
        y_transform: applied to ``y`` before the metric (e.g. a filter or a feature extractor); ``None`` for none.
        y_pred_transform: applied to ``y_pred`` before the metric; ``None`` for none.
        y_mapping: MONAI core's single transform, applied to both after the two above.
    """

    def __init__(
        self,
        y_transform: Callable | None = None,
        y_pred_transform: Callable | None = None,
        *,
        y_mapping: Callable | None = None,
    ) -> None:
        super().__init__(y_mapping=y_mapping)
        self.y_transform = y_transform
        self.y_pred_transform = y_pred_transform

    def __call__(self, y: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
        """
        Args:
            y: first batch, ``(B, C, *spatial)``.
            y_pred: second batch; after the transforms it must have the shape of ``y``.
        """
        if self.y_transform is not None:
            y = self.y_transform(y)
        if self.y_pred_transform is not None:
            y_pred = self.y_pred_transform(y_pred)
        return compute_mmd(y, y_pred, self.y_mapping)
