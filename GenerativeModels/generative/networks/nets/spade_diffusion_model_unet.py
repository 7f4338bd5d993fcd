# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""monai-generative 0.2.3 ``SPADEDiffusionModelUNet`` signature on top of MONAI core's implementation."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets.spade_diffusion_model_unet import SPADEDiffusionModelUNet as _CoreSPADEDiffusionModelUNet

from ._compat import add_generative_023_load_hook, pick_renamed_arg

__all__ = ["SPADEDiffusionModelUNet"]


class SPADEDiffusionModelUNet(_CoreSPADEDiffusionModelUNet):
    """
    ``monai.networks.nets.SPADEDiffusionModelUNet`` that also takes monai-generative 0.2.3's argument names and
    positional order, and loads 0.2.3 checkpoints.

    Differences from MONAI core:
        - ``num_channels`` (0.2.3) is accepted for core's ``channels``; giving both is a ``TypeError``.
        - Positional order is 0.2.3's: ``use_flash_attention`` comes before ``spade_intermediate_channels``; core's
          ``channels``, ``include_fc`` and ``use_combined_linear`` are keyword-only.
        - ``load_state_dict`` converts 0.2.3 keys as :class:`generative.networks.nets.DiffusionModelUNet` does, plus
          the SPADE norms (``param_free_norm.N.*`` -> ``param_free_norm.*``); outputs are unchanged (checked
          against a fixture written by 0.2.3).
        - ``use_flash_attention`` uses PyTorch's fused attention (0.2.3 required xformers).

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: number of input channels.
        out_channels: number of output channels.
        label_nc: channels of the semantic map fed to the decoder's SPADE blocks.
        num_res_blocks: residual blocks per level, one int for all levels or one per level.
        num_channels: channels of each level (0.2.3 name). Defaults to ``(32, 64, 64, 64)``.
        attention_levels: per level, whether to use attention.
        norm_num_groups: groups of the group normalisation layers.
        norm_eps: epsilon of the normalisation layers.
        resblock_updown: resample with residual blocks instead of plain convolutions.
        num_head_channels: channels per attention head, one int for all levels or one per level.
        with_conditioning: add cross-attention to a ``context`` tensor.
        transformer_num_layers: transformer blocks per cross-attention layer.
        cross_attention_dim: feature size of ``context``.
        num_class_embeds: number of classes for class conditioning; ``None`` disables it.
        upcast_attention: compute attention in float32.
        use_flash_attention: use PyTorch's fused attention kernel.
        spade_intermediate_channels: hidden channels of the SPADE blocks.
        channels: MONAI core name of ``num_channels``.
        include_fc: give self-attention blocks an output projection (core only; 0.2.3 had none in effect).
        use_combined_linear: one fused q/k/v projection (core only; 0.2.3 checkpoints need ``False``).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        label_nc: int,
        num_res_blocks: Sequence[int] | int = (2, 2, 2, 2),
        num_channels: Sequence[int] | None = None,
        attention_levels: Sequence[bool] = (False, False, True, True),
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        resblock_updown: bool = False,
        num_head_channels: int | Sequence[int] = 8,
        with_conditioning: bool = False,
        transformer_num_layers: int = 1,
        cross_attention_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
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
            in_channels=in_channels,
            out_channels=out_channels,
            label_nc=label_nc,
            num_res_blocks=num_res_blocks,
            channels=channels,
            attention_levels=attention_levels,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            resblock_updown=resblock_updown,
            num_head_channels=num_head_channels,
            with_conditioning=with_conditioning,
            transformer_num_layers=transformer_num_layers,
            cross_attention_dim=cross_attention_dim,
            num_class_embeds=num_class_embeds,
            upcast_attention=upcast_attention,
            spade_intermediate_channels=spade_intermediate_channels,
            include_fc=include_fc,
            use_combined_linear=use_combined_linear,
            use_flash_attention=use_flash_attention,
        )
        add_generative_023_load_hook(self)
