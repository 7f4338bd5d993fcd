# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""monai-generative 0.2.3 ``DiffusionModelUNet`` and ``DiffusionModelEncoder`` signatures on top of MONAI core's
implementations."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch.nn as nn
from monai.networks.nets import DiffusionModelUNet as _CoreDiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder as _CoreDiffusionModelEncoder

from ._compat import add_generative_023_load_hook, pick_renamed_arg

__all__ = ["DiffusionModelEncoder", "DiffusionModelUNet"]


class DiffusionModelUNet(_CoreDiffusionModelUNet):
    """
    ``monai.networks.nets.DiffusionModelUNet`` that also takes the argument names and positional order of
    monai-generative 0.2.3, and loads 0.2.3 checkpoints.

    Differences from MONAI core:
        - ``num_channels`` (0.2.3) is accepted for core's ``channels``; giving both is a ``TypeError``.
        - Positional order is 0.2.3's: ``use_flash_attention`` comes before ``dropout_cattn``; the core-only
          arguments ``channels``, ``include_fc`` and ``use_combined_linear`` are keyword-only.
        - ``load_state_dict`` converts 0.2.3 keys (``to_q``/``proj_attn``/``to_out.0``/``upsampler.conv``) to
          core's. 0.2.3 never applied ``proj_attn``, so the converted ``out_proj`` is the identity and the outputs
          of an old checkpoint are unchanged (core's own ``load_old_state_dict`` copies ``proj_attn`` instead).
        - All defaults are the same as 0.2.3's and core's.

    Args:
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        in_channels: number of input channels.
        out_channels: number of output channels.
        num_res_blocks: residual blocks per level, one int for all levels or one per level.
        num_channels: feature channels of each level (0.2.3 name). Defaults to ``(32, 64, 64, 64)``.
        attention_levels: per level, whether to use attention.
        norm_num_groups: groups of the group normalisation layers; must divide every entry of ``num_channels``.
        norm_eps: epsilon of the group normalisation layers.
        resblock_updown: resample with residual blocks instead of plain (transposed) convolutions.
        num_head_channels: channels per attention head, one int for all levels or one per level.
        with_conditioning: add cross-attention to a ``context`` tensor.
        transformer_num_layers: transformer blocks per cross-attention layer.
        cross_attention_dim: feature size of ``context``.
        num_class_embeds: number of classes for class conditioning; ``None`` disables it.
        upcast_attention: compute attention in float32.
        use_flash_attention: use PyTorch's fused scaled-dot-product attention (0.2.3 used xformers for this).
        dropout_cattn: dropout in the cross-attention layers.
        channels: MONAI core name of ``num_channels``.
        include_fc: give self-attention blocks an output projection (core only; 0.2.3 had none in effect).
        use_combined_linear: one linear layer for q, k and v (core only; 0.2.3 checkpoints need ``False``).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
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
        dropout_cattn: float = 0.0,
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
            dropout_cattn=dropout_cattn,
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


_ENCODER_023_FLAT_FEATURES = 4096
"""In-features of the first linear layer of 0.2.3's ``DiffusionModelEncoder`` head, fixed whatever the input."""
_CORE_ENCODER_TAKES_INPUT_SHAPE = "input_shape" in inspect.signature(_CoreDiffusionModelEncoder.__init__).parameters
"""MONAI core added ``input_shape`` in 1.5.1 or 1.5.2 (1.5.0 and 1.4 build the fixed 4096-feature head)."""


class DiffusionModelEncoder(_CoreDiffusionModelEncoder):
    """
    ``monai.networks.nets.diffusion_model_unet.DiffusionModelEncoder`` (the diffusion UNet's encoder followed by a
    small fully connected head, e.g. a noise-aware classifier for classifier guidance) with monai-generative
    0.2.3's argument names and positional order, loading 0.2.3 checkpoints.

    Differences from MONAI core:
        - ``num_channels`` (0.2.3) is accepted for core's ``channels``; giving both is a ``TypeError``.
        - Positional order is 0.2.3's (core inserted ``input_shape`` after ``out_channels``); the core-only
          ``channels``, ``input_shape``, ``include_fc``, ``use_combined_linear`` and ``use_flash_attention`` are
          keyword-only.
        - Without ``input_shape`` the head's first linear layer takes 4096 features, as 0.2.3's always did (0.2.3
          had no ``input_shape``; 4096 is, for example, a 64x64 input with ``num_channels=(32, 64, 64)``: each level
          halves the size, 8x8x64). With ``input_shape`` core sizes the head from it.
        - ``load_state_dict`` converts 0.2.3 keys as :class:`DiffusionModelUNet` does.

    Args:
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        in_channels: number of input channels.
        out_channels: number of outputs of the head (e.g. classes).
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
        channels: MONAI core name of ``num_channels``.
        input_shape: spatial shape of the input (core only); ``None`` keeps 0.2.3's 4096-feature head.
        include_fc: give self-attention blocks an output projection (core only; 0.2.3 had none in effect).
        use_combined_linear: one linear layer for q, k and v (core only; 0.2.3 checkpoints need ``False``).
        use_flash_attention: use PyTorch's fused scaled-dot-product attention (core only).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
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
        *,
        channels: Sequence[int] | None = None,
        input_shape: Sequence[int] | None = None,
        include_fc: bool = True,
        use_combined_linear: bool = False,
        use_flash_attention: bool = False,
    ) -> None:
        channels = pick_renamed_arg(
            type(self).__name__, "num_channels", num_channels, "channels", channels, (32, 64, 64, 64)
        )
        shape_arg = {"input_shape": (64,) * spatial_dims if input_shape is None else input_shape}
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            **(shape_arg if _CORE_ENCODER_TAKES_INPUT_SHAPE else {}),
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
            include_fc=include_fc,
            use_combined_linear=use_combined_linear,
            use_flash_attention=use_flash_attention,
        )
        if input_shape is None:
            flat = _ENCODER_023_FLAT_FEATURES
        elif not _CORE_ENCODER_TAKES_INPUT_SHAPE:  # older core: size the head as core's newer versions do
            size = list(input_shape)
            for _ in channels:
                size = [math.ceil(n / 2) for n in size]
            flat = math.prod(size) * channels[-1]
        if input_shape is None or not _CORE_ENCODER_TAKES_INPUT_SHAPE:
            self.out = nn.Sequential(nn.Linear(flat, 512), nn.ReLU(), nn.Dropout(0.1), nn.Linear(512, out_channels))
        add_generative_023_load_hook(self)
