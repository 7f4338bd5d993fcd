# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""monai-generative 0.2.3 ``PatchAdversarialLoss`` on top of MONAI core's."""

from __future__ import annotations

import torch
from monai.losses import PatchAdversarialLoss as _CorePatchAdversarialLoss
from monai.losses.adversarial_loss import AdversarialCriterions

__all__ = ["PatchAdversarialLoss", "AdversarialCriterions"]


class PatchAdversarialLoss(_CorePatchAdversarialLoss):
    """
    ``monai.losses.PatchAdversarialLoss`` with 0.2.3's public ``forward_single`` method (core made it private).

    Arguments and defaults are the same as 0.2.3's and core's.

    Args:
        reduction: ``"none"``, ``"mean"`` or ``"sum"``, applied over the discriminator outputs.
        criterion: ``"bce"``, ``"hinge"`` or ``"least_squares"``; pass raw (not activated) discriminator outputs.
        no_activation_leastsq: for ``"least_squares"``, skip the final activation when ``True``.
    """

    def forward_single(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Loss for one discriminator output (0.2.3 method name).

        Args:
            input: output of one discriminator.
            target: target tensor of the same shape, as made by ``get_target_tensor``.
        """
        return self._forward_single(input, target)
