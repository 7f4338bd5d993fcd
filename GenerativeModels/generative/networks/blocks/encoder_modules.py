# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
monai-generative 0.2.3's ``SpatialRescaler`` (resize a conditioning image, optionally remapping its channels).

MONAI core has no such block, so this is the fork's own implementation with 0.2.3's arguments, defaults and
``state_dict`` keys (``channel_mapper.conv.*``). Its argument errors are ``ValueError``s with a message; they are
also ``AssertionError``s, which 0.2.3 raised (with ``assert``), so that 0.2.3 code catching those keeps working. It
does not print when it maps channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

__all__ = ["SpatialRescaler", "SpatialRescalerArgumentError"]

_METHODS = ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area")


class SpatialRescalerArgumentError(ValueError, AssertionError):
    """A wrong ``SpatialRescaler`` argument: a ``ValueError``, and an ``AssertionError`` as 0.2.3 raised."""


class SpatialRescaler(nn.Module):
    """
    Resize the input ``n_stages`` times by ``multiplier`` (or once to ``size``), after an optional 1x1 convolution
    from ``in_channels`` to ``out_channels``.

    Args:
        spatial_dims: number of spatial dimensions.
        n_stages: number of successive resizings (0 keeps the size); must be 1 when ``size`` is given.
        size: output spatial size, one int or one per axis; excludes ``multiplier``.
        method: interpolation mode of ``torch.nn.functional.interpolate``.
        multiplier: scale factor per stage, one float or one per axis.
        in_channels: channels of the input (used only when ``out_channels`` is given).
        out_channels: channels after the 1x1 convolution; ``None`` for no convolution.
        bias: whether the 1x1 convolution has a bias.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        n_stages: int = 1,
        size: Sequence[int] | int | None = None,
        method: str = "bilinear",
        multiplier: Sequence[float] | float | None = None,
        in_channels: int = 3,
        out_channels: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if n_stages < 0:
            raise SpatialRescalerArgumentError(f"SpatialRescaler: n_stages={n_stages} must be >= 0.")
        if method not in _METHODS:
            raise SpatialRescalerArgumentError(f"SpatialRescaler: method={method!r} is not one of {_METHODS}.")
        if size is not None and n_stages != 1:
            raise ValueError(f"SpatialRescaler: size={size} needs n_stages=1, got n_stages={n_stages}.")
        if size is not None and multiplier is not None:
            raise ValueError(f"SpatialRescaler: give size ({size}) or multiplier ({multiplier}), not both.")
        self.n_stages = n_stages
        self.size = size
        self.method = method
        self.multiplier = multiplier
        self.remap_output = out_channels is not None
        if self.remap_output:
            if in_channels is None:
                raise ValueError(f"SpatialRescaler: out_channels={out_channels} needs in_channels, got None.")
            self.channel_mapper = Convolution(
                spatial_dims=spatial_dims,
                in_channels=in_channels,
                out_channels=out_channels,
                kernel_size=1,
                conv_only=True,
                bias=bias,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: tensor ``(B, C, *spatial)``.
        """
        if self.remap_output:
            x = self.channel_mapper(x)
        for _ in range(self.n_stages):
            x = F.interpolate(x, size=self.size, scale_factor=self.multiplier, mode=self.method)
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Same as ``forward`` (0.2.3 name used by conditioning pipelines)."""
        return self(x)
