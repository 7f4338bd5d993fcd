# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
monai-generative 0.2.3's ``SPADE`` normalisation: MONAI core's, with the same arguments and defaults.

0.2.3 wrapped the parameter-free normalisation in an ``ADN`` block, so an affine one (e.g. ``norm="GROUP"``) stored
its weights under ``param_free_norm.N.*``; core stores them under ``param_free_norm.*``. ``load_state_dict`` here
accepts both.
"""

from __future__ import annotations

from monai.networks.blocks.spade_norm import SPADE as _CoreSPADE

from ..nets._compat import add_generative_023_load_hook

__all__ = ["SPADE"]


class SPADE(_CoreSPADE):
    """
    Spatially adaptive normalisation (``monai.networks.blocks.SPADE``) that also loads 0.2.3 ``state_dict`` keys.

    Args:
        label_nc: number of channels of the semantic map.
        norm_nc: number of channels of the normalised input.
        kernel_size: kernel size of the convolutions that predict the scale and shift.
        spatial_dims: number of spatial dimensions.
        hidden_channels: channels of the shared hidden convolution.
        norm: parameter-free normalisation applied before the modulation.
        norm_params: extra arguments of ``norm``.
    """

    def __init__(
        self,
        label_nc: int,
        norm_nc: int,
        kernel_size: int = 3,
        spatial_dims: int = 2,
        hidden_channels: int = 64,
        norm: str | tuple = "INSTANCE",
        norm_params: dict | None = None,
    ) -> None:
        super().__init__(
            label_nc=label_nc,
            norm_nc=norm_nc,
            kernel_size=kernel_size,
            spatial_dims=spatial_dims,
            hidden_channels=hidden_channels,
            norm=norm,
            norm_params=norm_params,
        )
        add_generative_023_load_hook(self)
