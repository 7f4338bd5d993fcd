# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""monai-generative 0.2.3 ``VQVAE`` signature on top of MONAI core's implementation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from monai.networks.nets.vqvae import VQVAE as _CoreVQVAE
from monai.networks.nets.vqvae import Decoder, Encoder, VQVAEResidualUnit

from ._compat import pick_renamed_arg

__all__ = ["VQVAE", "Decoder", "Encoder", "VQVAEResidualUnit"]


class VQVAE(_CoreVQVAE):
    """
    ``monai.networks.nets.VQVAE`` that also takes monai-generative 0.2.3's argument names.

    Differences from MONAI core:
        - ``num_channels`` (0.2.3) is accepted for core's ``channels``; giving both is a ``TypeError``. Positional
          order is unchanged; ``self.num_channels`` is kept as an alias of ``self.channels``.
        - ``encode_stage_2_inputs(x, quantized=False)`` returns the encoder's output before quantisation
          (upstream's final main, Project-MONAI/GenerativeModels#474); the default is 0.2.3's quantised latent.
        - All defaults are 0.2.3's and core's; the ``state_dict`` keys are identical, so 0.2.3 checkpoints load
          as they are and give 0.2.3's outputs (checked against a fixture written by 0.2.3).

    Args:
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        in_channels: number of input channels.
        out_channels: number of output channels.
        num_channels: channels of each level (0.2.3 name). Defaults to ``(96, 96, 192)``.
        num_res_layers: residual units per level.
        num_res_channels: channels of the residual units, one int or one per level.
        downsample_parameters: ``(stride, kernel_size, dilation, padding)`` per level, or one for all.
        upsample_parameters: ``(stride, kernel_size, dilation, padding, output_padding)`` per level, or one for all.
        num_embeddings: size of the codebook.
        embedding_dim: size of each codebook vector (channels of the latent).
        embedding_init: initialisation of the codebook (``"normal"`` or ``"kaiming_uniform"``).
        commitment_cost: weight of the commitment loss.
        decay: exponential moving average decay of the codebook.
        epsilon: added to the cluster sizes for numerical stability.
        dropout: dropout of the residual units.
        act: activation name or ``(name, kwargs)``.
        output_act: activation of the output; ``None`` for none.
        ddp_sync: synchronise the codebook statistics across DDP processes.
        use_checkpointing: recompute activations in the backward pass to save memory.
        channels: MONAI core name of ``num_channels``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        num_channels: Sequence[int] | None = None,
        num_res_layers: int = 3,
        num_res_channels: Sequence[int] | int = (96, 96, 192),
        downsample_parameters: Sequence[tuple[int, int, int, int]] | tuple[int, int, int, int] = (
            (2, 4, 1, 1),
            (2, 4, 1, 1),
            (2, 4, 1, 1),
        ),
        upsample_parameters: Sequence[tuple[int, int, int, int, int]] | tuple[int, int, int, int, int] = (
            (2, 4, 1, 1, 0),
            (2, 4, 1, 1, 0),
            (2, 4, 1, 1, 0),
        ),
        num_embeddings: int = 32,
        embedding_dim: int = 64,
        embedding_init: str = "normal",
        commitment_cost: float = 0.25,
        decay: float = 0.5,
        epsilon: float = 1e-5,
        dropout: float = 0.0,
        act: tuple | str | None = "RELU",
        output_act: tuple | str | None = None,
        ddp_sync: bool = True,
        use_checkpointing: bool = False,
        *,
        channels: Sequence[int] | None = None,
    ) -> None:
        channels = pick_renamed_arg(
            type(self).__name__, "num_channels", num_channels, "channels", channels, (96, 96, 192)
        )
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            num_res_layers=num_res_layers,
            num_res_channels=num_res_channels,
            downsample_parameters=downsample_parameters,
            upsample_parameters=upsample_parameters,
            num_embeddings=num_embeddings,
            embedding_dim=embedding_dim,
            embedding_init=embedding_init,
            commitment_cost=commitment_cost,
            decay=decay,
            epsilon=epsilon,
            dropout=dropout,
            act=act,
            output_act=output_act,
            ddp_sync=ddp_sync,
            use_checkpointing=use_checkpointing,
        )
        self.num_channels = self.channels

    def encode_stage_2_inputs(self, x: torch.Tensor, quantized: bool = True) -> torch.Tensor:
        """
        Latent representation for a second-stage model.

        Args:
            x: input images, ``(B, in_channels, *spatial)``.
            quantized: ``True`` (0.2.3): the codebook vectors; ``False``: the encoder's output before quantisation.
        """
        z = self.encode(x)
        e, _ = self.quantize(z)  # also when not returned: in training mode it updates the codebook, as upstream
        return e if quantized else z
