# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""monai-generative 0.2.3 PatchGAN discriminator signatures on top of MONAI core's implementations."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from monai.networks.nets import MultiScalePatchDiscriminator as _CoreMultiScalePatchDiscriminator
from monai.networks.nets import PatchDiscriminator as _CorePatchDiscriminator
from monai.networks.utils import normal_init

from ._compat import REQUIRED, pick_renamed_arg

__all__ = ["PatchDiscriminator", "MultiScalePatchDiscriminator"]

_LEAKY_RELU = ("LEAKYRELU", {"negative_slope": 0.2})


class PatchDiscriminator(_CorePatchDiscriminator):
    """
    ``monai.networks.nets.PatchDiscriminator`` that also takes monai-generative 0.2.3's argument names.

    Differences from MONAI core:
        - ``num_channels`` (0.2.3) is accepted for core's ``channels``; one of the two is required, both is a
          ``TypeError``. Positional order is unchanged (``spatial_dims, num_channels, in_channels, ...``).
        - ``initialise_weights(m)`` from 0.2.3 is kept; it calls ``monai.networks.utils.normal_init``. Core's
          initialisation also sets convolution biases to zero, which 0.2.3 left at PyTorch's default.
        - All defaults are the same as 0.2.3's and core's; state dict keys are identical.

    Args:
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        num_channels: filters of the first convolution, doubled at each further layer (0.2.3 name).
        in_channels: number of input channels.
        out_channels: number of output channels.
        num_layers_d: number of strided convolution layers.
        kernel_size: convolution kernel size.
        activation: activation name or ``(name, kwargs)``.
        norm: normalisation name or ``(name, kwargs)``.
        bias: whether the convolutions have a bias.
        padding: convolution padding.
        dropout: dropout probability or ``(name, kwargs)``.
        last_conv_kernel_size: kernel size of the final convolution; ``None`` uses ``kernel_size``.
        channels: MONAI core name of ``num_channels``.
    """

    def __init__(
        self,
        spatial_dims: int,
        num_channels: int | None = None,
        in_channels: int | None = None,
        out_channels: int = 1,
        num_layers_d: int = 3,
        kernel_size: int = 4,
        activation: str | tuple = _LEAKY_RELU,
        norm: str | tuple = "BATCH",
        bias: bool = False,
        padding: int | Sequence[int] = 1,
        dropout: float | tuple = 0.0,
        last_conv_kernel_size: int | None = None,
        *,
        channels: int | None = None,
    ) -> None:
        name = type(self).__name__
        channels = pick_renamed_arg(name, "num_channels", num_channels, "channels", channels, REQUIRED)
        if in_channels is None:
            raise TypeError(f"{name}() missing required argument 'in_channels'.")
        super().__init__(
            spatial_dims=spatial_dims,
            channels=channels,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers_d=num_layers_d,
            kernel_size=kernel_size,
            activation=activation,
            norm=norm,
            bias=bias,
            padding=padding,
            dropout=dropout,
            last_conv_kernel_size=last_conv_kernel_size,
        )

    def initialise_weights(self, m: nn.Module) -> None:
        """
        Initialise one sub-module the way the discriminator does at construction (0.2.3 method name).

        Args:
            m: module to initialise, typically passed through ``self.apply(self.initialise_weights)``.
        """
        normal_init(m)


class MultiScalePatchDiscriminator(_CoreMultiScalePatchDiscriminator):
    """
    ``monai.networks.nets.MultiScalePatchDiscriminator`` that also takes monai-generative 0.2.3's argument names.

    Differences from MONAI core:
        - ``num_channels`` (0.2.3) is accepted for core's ``channels``; one of the two is required, both is a
          ``TypeError``. Positional order is unchanged (``num_d, num_layers_d, spatial_dims, num_channels, ...``).
        - All defaults are the same as 0.2.3's and core's; state dict keys are identical.

    Args:
        num_d: number of discriminators.
        num_layers_d: strided convolution layers of the first discriminator; each further one has one more.
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        num_channels: filters of the first convolution of each discriminator (0.2.3 name).
        in_channels: number of input channels.
        out_channels: number of output channels of each discriminator.
        kernel_size: convolution kernel size.
        activation: activation name or ``(name, kwargs)``.
        norm: normalisation name or ``(name, kwargs)``.
        bias: whether the convolutions have a bias.
        dropout: dropout probability or ``(name, kwargs)``.
        minimum_size_im: smallest expected input size, used to check that ``num_d`` and ``num_layers_d`` fit.
        last_conv_kernel_size: kernel size of the final convolution of each discriminator.
        channels: MONAI core name of ``num_channels``.
    """

    def __init__(
        self,
        num_d: int,
        num_layers_d: int,
        spatial_dims: int,
        num_channels: int | None = None,
        in_channels: int | None = None,
        out_channels: int = 1,
        kernel_size: int = 4,
        activation: str | tuple = _LEAKY_RELU,
        norm: str | tuple = "BATCH",
        bias: bool = False,
        dropout: float | tuple = 0.0,
        minimum_size_im: int = 256,
        last_conv_kernel_size: int = 1,
        *,
        channels: int | None = None,
    ) -> None:
        name = type(self).__name__
        channels = pick_renamed_arg(name, "num_channels", num_channels, "channels", channels, REQUIRED)
        if in_channels is None:
            raise TypeError(f"{name}() missing required argument 'in_channels'.")
        super().__init__(
            num_d=num_d,
            num_layers_d=num_layers_d,
            spatial_dims=spatial_dims,
            channels=channels,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel_size,
            activation=activation,
            norm=norm,
            bias=bias,
            dropout=dropout,
            minimum_size_im=minimum_size_im,
            last_conv_kernel_size=last_conv_kernel_size,
        )
