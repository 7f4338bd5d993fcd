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
from monai.networks.layers import get_pool_layer
from monai.networks.utils import normal_init

from ._compat import REQUIRED, pick_renamed_arg

__all__ = ["PatchDiscriminator", "MultiScalePatchDiscriminator", "PatchDiscriminatorArgumentError"]

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


class PatchDiscriminatorArgumentError(ValueError, AssertionError):
    """A wrong ``MultiScalePatchDiscriminator`` argument: a ``ValueError``, and an ``AssertionError`` as upstream raised."""


class MultiScalePatchDiscriminator(_CoreMultiScalePatchDiscriminator):
    """
    ``monai.networks.nets.MultiScalePatchDiscriminator`` with monai-generative's argument names and the
    downsampling options of upstream's final main (Project-MONAI/GenerativeModels#479).

    Differences from MONAI core:
        - ``num_channels`` (0.2.3) is accepted for core's ``channels``; one of the two is required, both is a
          ``TypeError``.
        - ``num_layers_d`` may be one number per discriminator, and ``pooling_method`` (``"max"`` or ``"avg"``)
          makes discriminator ``i`` see the input pooled ``i`` times (kernel ``kernel_size``, stride 2) instead of
          having more layers; both come from upstream's final main. Left at their defaults, the network, its
          ``state_dict`` keys and its outputs are 0.2.3's and core's.
        - Positional order is upstream main's: ``num_d, num_layers_d, spatial_dims, num_channels, in_channels,
          pooling_method, out_channels, ...`` (main inserted ``pooling_method`` before ``out_channels``; 0.2.3 code
          passes ``out_channels`` and later arguments by keyword, as its tutorials do).
        - ``num_layers_d`` is stored as the list of the layers of each discriminator (upstream main; 0.2.3 kept the
          int it was given).

    Args:
        num_d: number of discriminators.
        num_layers_d: strided convolution layers: one int, or one per discriminator. An int without
            ``pooling_method`` gives discriminator ``i`` (from 0) ``num_layers_d * (i + 1)`` layers (0.2.3); with
            ``pooling_method`` every discriminator has ``num_layers_d`` layers.
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        num_channels: filters of the first convolution of each discriminator (0.2.3 name).
        in_channels: number of input channels.
        pooling_method: ``None`` (0.2.3), or a MONAI pooling name such as ``"max"`` or ``"avg"`` applied ``i``
            times before discriminator ``i``.
        out_channels: number of output channels of each discriminator.
        kernel_size: convolution (and pooling) kernel size.
        activation: activation name or ``(name, kwargs)``.
        norm: normalisation name or ``(name, kwargs)``.
        bias: whether the convolutions have a bias.
        dropout: dropout probability or ``(name, kwargs)``.
        minimum_size_im: smallest expected input size, used to check that ``num_d`` and ``num_layers_d`` fit.
        last_conv_kernel_size: kernel size of the final convolution of each discriminator.
        channels: MONAI core name of ``num_channels``.

    Raises:
        PatchDiscriminatorArgumentError: (a ``ValueError`` and an ``AssertionError``) when a list ``num_layers_d``
            does not have ``num_d`` entries.
        AssertionError: when ``minimum_size_im`` is too small for a discriminator's layers (as 0.2.3 and core).
    """

    def __init__(
        self,
        num_d: int,
        num_layers_d: int | Sequence[int],
        spatial_dims: int,
        num_channels: int | None = None,
        in_channels: int | None = None,
        pooling_method: str | None = None,
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
        if isinstance(num_layers_d, int):
            layers = [num_layers_d] * num_d if pooling_method else [num_layers_d * (i + 1) for i in range(num_d)]
        else:
            layers = [int(n) for n in num_layers_d]
            if len(layers) != num_d:
                raise PatchDiscriminatorArgumentError(
                    f"{name}: num_layers_d={list(num_layers_d)} has {len(layers)} entries, expected one per "
                    f"discriminator (num_d={num_d})."
                )
        # core's __init__ only builds the 0.2.3 layout; the modules are built here, with the same names and keys
        nn.Sequential.__init__(self)
        self.num_d = num_d
        self.num_layers_d = layers
        self.num_channels = channels
        self.padding = tuple([int((kernel_size - 1) / 2)] * spatial_dims)
        pool = None
        if pooling_method is not None:
            pool = get_pool_layer(
                (pooling_method, {"kernel_size": kernel_size, "stride": 2, "padding": self.padding}),
                spatial_dims=spatial_dims,
            )
        for i, layers_i in enumerate(layers):
            if float(minimum_size_im) / (2**layers_i) < 1:
                raise AssertionError(
                    f"Your image size is too small to take in up to {i} discriminators with num_layers = {layers_i}. "
                    "Please reduce num_layers, reduce num_D or enter bigger images."
                )
            subnet: nn.Module = PatchDiscriminator(
                spatial_dims=spatial_dims,
                num_channels=channels,
                in_channels=in_channels,
                out_channels=out_channels,
                num_layers_d=layers_i,
                kernel_size=kernel_size,
                activation=activation,
                norm=norm,
                bias=bias,
                padding=self.padding,
                dropout=dropout,
                last_conv_kernel_size=last_conv_kernel_size,
            )
            if pool is not None and i > 0:
                # upstream's layout: the pooling layers (no parameters) at 0 .. i-1, the discriminator at index i
                subnet = nn.Sequential(*([pool] * i), subnet)
            self.add_module(f"discriminator_{i}", subnet)
