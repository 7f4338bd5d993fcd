# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""monai-generative 0.2.3 ``ControlNet`` signature on top of MONAI core's implementation."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from monai.networks.nets import ControlNet as _CoreControlNet

from ._compat import add_generative_023_load_hook, pick_renamed_arg

__all__ = ["ControlNet", "copy_weights_to_controlnet"]


class ControlNet(_CoreControlNet):
    """
    ``monai.networks.nets.ControlNet`` that also takes the argument names and positional order of
    monai-generative 0.2.3, and loads 0.2.3 checkpoints.

    Differences from MONAI core:
        - ``num_channels`` (0.2.3) is accepted for core's ``channels``; giving both is a ``TypeError``.
        - Positional order is 0.2.3's: ``use_flash_attention`` comes before the ``conditioning_embedding_*``
          arguments; the core-only ``channels``, ``include_fc`` and ``use_combined_linear`` are keyword-only.
        - ``load_state_dict`` converts 0.2.3 keys as :class:`generative.networks.nets.DiffusionModelUNet` does
          (core's ``load_old_state_dict`` fails on ControlNets whose self-attention blocks hold 0.2.3 keys).
        - All defaults are the same as 0.2.3's and core's.

    Args:
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        in_channels: number of input channels of the diffusion model input ``x``.
        num_res_blocks: residual blocks per level, one int for all levels or one per level.
        num_channels: feature channels of each level (0.2.3 name). Defaults to ``(32, 64, 64, 64)``.
        attention_levels: per level, whether to use attention.
        norm_num_groups: groups of the group normalisation layers; must divide every entry of ``num_channels``.
        norm_eps: epsilon of the group normalisation layers.
        resblock_updown: downsample with residual blocks instead of strided convolutions.
        num_head_channels: channels per attention head, one int for all levels or one per level.
        with_conditioning: add cross-attention to a ``context`` tensor.
        transformer_num_layers: transformer blocks per cross-attention layer.
        cross_attention_dim: feature size of ``context``.
        num_class_embeds: number of classes for class conditioning; ``None`` disables it.
        upcast_attention: compute attention in float32.
        use_flash_attention: use PyTorch's fused scaled-dot-product attention (0.2.3 used xformers for this).
        conditioning_embedding_in_channels: channels of the control image ``controlnet_cond``.
        conditioning_embedding_num_channels: channels of the layers that embed the control image.
        channels: MONAI core name of ``num_channels``.
        include_fc: give self-attention blocks an output projection (core only; 0.2.3 had none in effect).
        use_combined_linear: one linear layer for q, k and v (core only; 0.2.3 checkpoints need ``False``).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
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
        conditioning_embedding_in_channels: int = 1,
        conditioning_embedding_num_channels: Sequence[int] = (16, 32, 96, 256),
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
            conditioning_embedding_in_channels=conditioning_embedding_in_channels,
            conditioning_embedding_num_channels=conditioning_embedding_num_channels,
            include_fc=include_fc,
            use_combined_linear=use_combined_linear,
            use_flash_attention=use_flash_attention,
        )
        add_generative_023_load_hook(self)

    def load_old_state_dict(self, old_state_dict: dict, verbose: bool = False) -> None:
        """
        Load a monai-generative 0.2.3 state dict; same as ``load_state_dict``, which converts old keys itself.

        Args:
            old_state_dict: state dict saved by 0.2.3 (or by this class / MONAI core).
            verbose: kept for compatibility with MONAI core's method; unused.
        """
        self.load_state_dict(old_state_dict)


def copy_weights_to_controlnet(controlnet: nn.Module, diffusion_model: nn.Module, verbose: bool = True) -> None:
    """
    Start a ControlNet from a trained diffusion model: load every weight of ``diffusion_model`` whose key the
    ControlNet also has (upstream's final main, Project-MONAI/GenerativeModels#478). The ControlNet's own layers
    (control-image embedding, zero convolutions) keep their values; the UNet's decoder weights are skipped.

    Args:
        controlnet: the ControlNet to fill (this package's or MONAI core's).
        diffusion_model: a ``DiffusionModelUNet`` or ``SPADEDiffusionModelUNet`` with the same encoder layout.
        verbose: print which keys were copied, which ControlNet keys got nothing and which diffusion-model keys
            had no place.
    """
    result = controlnet.load_state_dict(diffusion_model.state_dict(), strict=False)
    if verbose:
        skipped = set(result.unexpected_keys)
        copied = [name for name, _ in diffusion_model.named_parameters() if name not in skipped]
        print(
            f"Copied {len(copied)} parameters of the diffusion model into the ControlNet: {'; '.join(copied)}\n"
            f"ControlNet keys left as they were ({len(result.missing_keys)}): {'; '.join(result.missing_keys)}\n"
            f"Diffusion model keys with no place in the ControlNet ({len(result.unexpected_keys)}): "
            f"{'; '.join(result.unexpected_keys)}"
        )
