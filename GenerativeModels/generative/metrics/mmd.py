# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""monai-generative 0.2.3's ``MMDMetric``: its arguments and its numbers (MONAI core's ``MMDMetric`` computes another
estimate)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.metrics.mmd import MMDMetric as _CoreMMDMetric

__all__ = ["MMDMetric"]


class MMDMetric(_CoreMMDMetric):
    """
    Maximum mean discrepancy between two batches of images with a linear kernel, computed as monai-generative 0.2.3
    did (Gretton et al. 2012, "A kernel two-sample test", JMLR 13).

    Each image (after the transforms) becomes one feature vector of its ``F = C * prod(spatial)`` values; with the
    kernel ``k(a, b) = <a, b> / F`` the value is

        ``mean_ij k(y_i, y_j) + mean_ij k(p_i, p_j) - 2 mean_ij k(p_i, y_j)``

    where every mean runs over all pairs, the diagonal ``i == j`` included. That is ``||mean(y) - mean(p)||^2 / F``:
    zero for identical batches, never negative, and defined for a batch of one.

    Differences from MONAI core's ``MMDMetric``: core leaves out the diagonal terms (the unbiased estimate) and does
    not divide by ``F``, so its numbers differ (core's value for two identical batches is negative, and it needs
    at least two images per batch); 0.2.3 and this class have separate transforms for ``y`` and ``y_pred`` where
    core has one ``y_mapping``.

    Args:
        y_transform: applied to ``y`` first (e.g. a filter or a feature extractor); ``None`` for none.
        y_pred_transform: applied to ``y_pred`` first; ``None`` for none.
        y_mapping: MONAI core's single transform (keyword-only), applied to both after the two above.

    Raises:
        ValueError: when ``y`` and ``y_pred`` differ in shape after the transforms.
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

        Returns:
            a 0-dimensional tensor.
        """
        if self.y_transform is not None:
            y = self.y_transform(y)
        if self.y_pred_transform is not None:
            y_pred = self.y_pred_transform(y_pred)
        if self.y_mapping is not None:
            y, y_pred = self.y_mapping(y), self.y_mapping(y_pred)
        if y_pred.shape != y.shape:
            raise ValueError(
                f"MMDMetric: y_pred has shape {tuple(y_pred.shape)} and y has shape {tuple(y.shape)} after their "
                "transforms; expected the same shape."
            )
        y = y.reshape(y.shape[0], -1)
        y_pred = y_pred.reshape(y_pred.shape[0], -1)
        features = y.shape[1]
        k_yy = (y @ y.t()) / features
        k_pp = (y_pred @ y_pred.t()) / features
        k_py = (y_pred @ y.t()) / features
        return k_yy.mean() + k_pp.mean() - 2.0 * k_py.mean()
