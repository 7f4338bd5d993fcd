# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""monai-generative 0.2.3 ``SPADEAutoencoderKL`` signature on top of MONAI core's implementation."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets.spade_autoencoderkl import SPADEAutoencoderKL as _CoreSPADEAutoencoderKL
from monai.networks.nets.spade_autoencoderkl import SPADEDecoder, SPADEResBlock

from ._compat import add_generative_023_load_hook, pick_renamed_arg

__all__ = ["SPADEAutoencoderKL", "SPADEDecoder", "SPADEResBlock"]

_SPADE_023_EPS = 1e-5
"""Epsilon of the decoder's SPADE group norms in 0.2.3, which did not pass ``norm_eps`` to them."""


class SPADEAutoencoderKL(_CoreSPADEAutoencoderKL):
    """
    ``monai.networks.nets.SPADEAutoencoderKL`` that also takes monai-generative 0.2.3's argument names and positional
    order, and loads 0.2.3 checkpoints.

    Differences from MONAI core:
        - ``num_channels`` (0.2.3) is accepted for core's ``channels``; giving both is a ``TypeError``.
        - Positional order is 0.2.3's: ``use_flash_attention`` comes before ``spade_intermediate_channels``; core's
          ``channels``, ``include_fc`` and ``use_combined_linear`` are keyword-only.
        - ``load_state_dict`` converts 0.2.3 keys (``to_q``/``to_k``/``to_v`` -> ``attn.to_*``, the decoder's
          upsampling ``conv`` -> ``postconv``). 0.2.3 never applied its attention blocks' ``proj_attn``, so the
          converted ``attn.out_proj`` is the identity and the outputs of an old checkpoint are unchanged (checked
          against a fixture written by 0.2.3).
        - As in 0.2.3, the SPADE normalisations of the decoder's residual blocks use GroupNorm's default epsilon
          (1e-5) whatever ``norm_eps`` is; core passes ``norm_eps`` to them. Without this, 0.2.3 checkpoints would
          give outputs about 1e-4 off.
        - ``use_flash_attention`` uses PyTorch's fused attention (0.2.3 required xformers).

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        label_nc: channels of the semantic map fed to the decoder's SPADE blocks.
        in_channels: number of input channels.
        out_channels: number of output channels.
        num_res_blocks: residual blocks per level, one int for all levels or one per level.
        num_channels: channels of each level (0.2.3 name). Defaults to ``(32, 64, 64, 64)``.
        attention_levels: per level, whether to use attention.
        latent_channels: channels of the latent.
        norm_num_groups: groups of the group normalisation layers.
        norm_eps: epsilon of the normalisation layers (except the decoder's SPADE ones, see above).
        with_encoder_nonlocal_attn: attention block in the middle of the encoder.
        with_decoder_nonlocal_attn: attention block in the middle of the decoder.
        use_flash_attention: use PyTorch's fused attention kernel.
        spade_intermediate_channels: hidden channels of the SPADE blocks.
        channels: MONAI core name of ``num_channels``.
        include_fc: give attention blocks an output projection (core only; 0.2.3 had none in effect).
        use_combined_linear: one fused q/k/v projection (core only; 0.2.3 checkpoints need ``False``).
    """

    def __init__(
        self,
        spatial_dims: int,
        label_nc: int,
        in_channels: int = 1,
        out_channels: int = 1,
        num_res_blocks: Sequence[int] | int = (2, 2, 2, 2),
        num_channels: Sequence[int] | None = None,
        attention_levels: Sequence[bool] = (False, False, True, True),
        latent_channels: int = 3,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        with_encoder_nonlocal_attn: bool = True,
        with_decoder_nonlocal_attn: bool = True,
        use_flash_attention: bool = False,
        spade_intermediate_channels: int = 128,
        *,
        channels: Sequence[int] | None = None,
        include_fc: bool = True,
        use_combined_linear: bool = False,
    ) -> None:
        channels = pick_renamed_arg(
            type(self).__name__, "num_channels", num_channels, "channels", channels, (32, 64, 64, 64)
        )
        super().__init__(
            spatial_dims=spatial_dims,
            label_nc=label_nc,
            in_channels=in_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            channels=channels,
            attention_levels=attention_levels,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            with_encoder_nonlocal_attn=with_encoder_nonlocal_attn,
            with_decoder_nonlocal_attn=with_decoder_nonlocal_attn,
            spade_intermediate_channels=spade_intermediate_channels,
            include_fc=include_fc,
            use_combined_linear=use_combined_linear,
            use_flash_attention=use_flash_attention,
        )
        for block in self.decoder.modules():
            if isinstance(block, SPADEResBlock):
                block.norm1.param_free_norm.eps = _SPADE_023_EPS
                block.norm2.param_free_norm.eps = _SPADE_023_EPS
        add_generative_023_load_hook(self)
