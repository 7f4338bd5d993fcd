# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""monai-generative 0.2.3 ``SPADENet`` (SPADE VAE-GAN generator) signature on top of MONAI core's implementation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.nets.spade_network import SPADEDecoder, SPADEEncoder, UpsamplingModes
from monai.networks.nets.spade_network import SPADENet as _CoreSPADENet
from monai.networks.nets.spade_network import SPADENetResBlock as SPADEResNetBlock

from ._compat import REQUIRED, add_generative_023_load_hook, pick_renamed_arg

__all__ = ["KLDLoss", "SPADEDecoder", "SPADEEncoder", "SPADENet", "SPADEResNetBlock", "UpsamplingModes"]

_LEAKY_RELU = ("LEAKYRELU", {"negative_slope": 0.2})


class KLDLoss(nn.Module):
    """
    Kullback-Leibler divergence of ``N(mu, exp(logvar))`` from ``N(0, 1)``, summed over all elements (0.2.3's
    helper of ``SPADENet``; core computes the same value inside ``SPADENet``).
    """

    def forward(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """
        Args:
            mu: means of the latent distribution.
            logvar: log-variances of the latent distribution, same shape as ``mu``.
        """
        return 0.5 * torch.sum(mu.square() + logvar.exp() - 1.0 - logvar)


class SPADENet(_CoreSPADENet):
    """
    ``monai.networks.nets.SPADENet`` that also takes monai-generative 0.2.3's argument names.

    Differences from MONAI core:
        - ``num_channels`` (0.2.3, required) is accepted for core's ``channels``; one of the two is required, both
          is a ``TypeError``. Positional order is unchanged.
        - ``forward(seg, x)`` returns 0.2.3's ``(image, kld_loss)`` when ``is_vae`` (core returns ``(image, z_mu,
          z_logvar)``) and ``(image,)`` otherwise; ``kld_loss`` is :class:`KLDLoss` of the encoder's outputs.
        - All defaults are 0.2.3's and core's; 0.2.3 checkpoints load (an affine ``norm`` stored under
          ``param_free_norm.N.*`` in 0.2.3 is renamed on load).

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: channels of the image (encoder input).
        out_channels: channels of the generated image.
        label_nc: channels of the semantic map.
        input_shape: spatial shape of the images; each side must be divisible by ``2 ** len(num_channels)``.
        num_channels: channels of each level (0.2.3 name).
        z_dim: size of the latent vector; required when ``is_vae``.
        is_vae: use the encoder (VAE-GAN); otherwise the decoder starts from the downsampled semantic map.
        spade_intermediate_channels: hidden channels of the SPADE blocks.
        norm: parameter-free normalisation of the SPADE blocks.
        act: activation of the blocks.
        last_act: activation of the output; ``None`` for none.
        kernel_size: convolution kernel size.
        upsampling_mode: interpolation mode of the decoder (an ``UpsamplingModes`` value).
        channels: MONAI core name of ``num_channels``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        label_nc: int,
        input_shape: Sequence[int],
        num_channels: Sequence[int] | None = None,
        z_dim: int | None = None,
        is_vae: bool = True,
        spade_intermediate_channels: int = 128,
        norm: str | tuple = "INSTANCE",
        act: str | tuple = _LEAKY_RELU,
        last_act: str | tuple | None = _LEAKY_RELU,
        kernel_size: int = 3,
        upsampling_mode: str = UpsamplingModes.nearest.value,
        *,
        channels: Sequence[int] | None = None,
    ) -> None:
        channels = pick_renamed_arg(type(self).__name__, "num_channels", num_channels, "channels", channels, REQUIRED)
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            label_nc=label_nc,
            input_shape=input_shape,
            channels=list(channels) if isinstance(channels, Sequence) else channels,  # core's checks report others
            z_dim=z_dim,
            is_vae=is_vae,
            spade_intermediate_channels=spade_intermediate_channels,
            norm=norm,
            act=act,
            last_act=last_act,
            kernel_size=kernel_size,
            upsampling_mode=upsampling_mode,
        )
        add_generative_023_load_hook(self)
        self.kld_loss = KLDLoss()

    def forward(self, seg: torch.Tensor, x: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """
        Args:
            seg: one-hot semantic map ``(B, label_nc, *input_shape)``.
            x: image ``(B, in_channels, *input_shape)``; required when ``is_vae``.

        Returns:
            ``(image, kld_loss)`` when ``is_vae``, else ``(image,)``.
        """
        if not self.is_vae:
            return (self.decoder(seg, None),)
        if x is None:
            raise ValueError("SPADENet.forward: x (the image to encode) is required when is_vae=True, got None.")
        z_mu, z_logvar = self.encoder(x)
        z = self.encoder.reparameterize(z_mu, z_logvar)
        return self.decoder(seg, z), self.kld_loss(z_mu, z_logvar)
