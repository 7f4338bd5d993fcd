# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""KL-regularised autoencoder with per-level, per-axis down/upsampling factors.

With ``downsample_factors`` left out (or all 2) the module tree, the ``state_dict`` keys and the numbers are those
of monai-generative 0.2.3's ``AutoencoderKL``. The blocks (residual, attention, resampling) live in
``autoencoder_blocks`` and are re-exported here under their 0.2.3 module path; exact tiled execution lives in
``tiled``. The attention block keeps the 0.2.3 parameter layout (``to_q``/``to_k``/``to_v``/``proj_attn``) so old
checkpoints load unchanged, and state dicts saved by ``monai.networks.nets.AutoencoderKL`` are converted on load.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.utils import ensure_tuple_rep
from torch.utils.checkpoint import checkpoint

from .autoencoder_blocks import (
    AttentionBlock,
    Downsample,
    Factor,
    OutputUpsample,
    ResBlock,
    Upsample,
    _is_int,
    input_conv,
    normalize_factor,
    normalize_factors,
    total_factor,
)
from .tiled import run_tiled

__all__ = [
    "AutoencoderKL",
    "Encoder",
    "Decoder",
    "Downsample",
    "Upsample",
    "OutputUpsample",
    "input_conv",
    "AttentionBlock",
    "ResBlock",
    "normalize_factors",
    "normalize_factor",
    "total_factor",
]


def _is_legacy(factors: Sequence[Sequence[int]]) -> bool:
    return all(f == 2 for level in factors for f in level)


class _FactorState(nn.Module):
    """Shared machinery of Encoder and Decoder: block-wise checkpointing and the factor record in state dicts.

    Non-legacy factors are stored as a persistent integer buffer ``factors`` so that a state dict saved with other
    factors is refused with a clear message instead of loading into a different geometry. Legacy factors (all 2)
    register no buffer, keeping the 0.2.3 keys. Likewise an initial (encoder) / final (decoder) resampling factor
    other than 1 is stored as the buffer ``initial_factor``; a factor of 1 registers none.
    """

    _factor_arg = "factors"
    _initial_arg = "initial_downsample_factor"
    blocks: nn.ModuleList

    def _init_factors(self, factors: tuple[tuple[int, ...], ...], initial: tuple[int, ...]) -> None:
        self.use_checkpointing = False
        self.legacy_factors = _is_legacy(factors)
        if not self.legacy_factors:
            self.register_buffer("factors", torch.tensor(factors, dtype=torch.long), persistent=True)
        self._initial = initial
        if any(f != 1 for f in initial):
            self.register_buffer("initial_factor", torch.tensor(initial, dtype=torch.long), persistent=True)

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.use_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        mine = getattr(self, self._factor_arg)
        stored = state_dict.get(f"{prefix}factors")
        if stored is None:
            theirs = "all 2 (legacy; no factors recorded)"
            differ = not self.legacy_factors
        else:
            theirs_t = tuple(tuple(int(v) for v in row) for row in torch.as_tensor(stored).tolist())
            theirs = str([list(r) for r in theirs_t])
            differ = theirs_t != mine
        if differ:
            raise ValueError(
                f"Cannot load state dict into {type(self).__name__} at '{prefix or '<root>'}': the {self._factor_arg} "
                f"differ (state dict: {theirs}; this model: {[list(r) for r in mine]}). Build the model with the "
                "factors the checkpoint was trained with."
            )
        stored = state_dict.get(f"{prefix}initial_factor")
        theirs_i = (1,) * len(self._initial) if stored is None else tuple(torch.as_tensor(stored).tolist())
        if theirs_i != self._initial:
            raise ValueError(
                f"Cannot load state dict into {type(self).__name__} at '{prefix or '<root>'}': the "
                f"{self._initial_arg} differs (state dict: {list(theirs_i)}"
                f"{' (none recorded)' if stored is None else ''}; this model: {list(self._initial)}). Build the model "
                "with the initial_downsample_factor the checkpoint was trained with."
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)


class Encoder(_FactorState):
    """Convolutional cascade that maps an image to a spatial latent.

    Args:
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        in_channels: number of input channels.
        num_channels: output channels of each level.
        out_channels: channels of the latent produced by the last convolution.
        num_res_blocks: residual blocks per level.
        norm_num_groups: groups of every GroupNorm; each entry of ``num_channels`` must be divisible by it.
        norm_eps: epsilon of every GroupNorm.
        attention_levels: which levels get an attention block after each residual block.
        with_nonlocal_attn: if True, add residual + attention + residual blocks at the lowest resolution.
        use_flash_attention: if True, attention uses PyTorch's scaled-dot-product attention.
        downsample_factors: one factor per downsampling level (``len(num_channels) - 1`` entries), each an int or one
            int per spatial axis; None means 2 everywhere (0.2.3 behaviour).
        include_fc: if True, attention blocks apply their output projection (MONAI core default); False is 0.2.3.
        initial_downsample_factor: an int or one int per axis; the first convolution becomes a patchify convolution
            (kernel = stride = factor, see :func:`input_conv`). 1 (default) is the legacy kernel-3 convolution.
        use_conv_downsample: if True (default), levels downsample with strided convolutions; if False, with
            average pooling (kernel = stride = factor, no parameters).
    """

    _factor_arg = "downsample_factors"

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_channels: Sequence[int],
        out_channels: int,
        num_res_blocks: Sequence[int],
        norm_num_groups: int,
        norm_eps: float,
        attention_levels: Sequence[bool],
        with_nonlocal_attn: bool = True,
        use_flash_attention: bool = False,
        downsample_factors: Sequence[Factor] | None = None,
        include_fc: bool = False,
        initial_downsample_factor: Factor = 1,
        use_conv_downsample: bool = True,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_channels = num_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.norm_num_groups = norm_num_groups
        self.norm_eps = norm_eps
        self.attention_levels = attention_levels
        self.downsample_factors = normalize_factors(downsample_factors, len(num_channels) - 1, spatial_dims)
        self.initial_downsample_factor = normalize_factor(
            initial_downsample_factor, spatial_dims, "initial_downsample_factor"
        )
        self.use_conv_downsample = bool(use_conv_downsample)
        self.total_factor = total_factor((self.initial_downsample_factor, *self.downsample_factors))
        self._init_factors(self.downsample_factors, self.initial_downsample_factor)

        def attention(channels: int) -> AttentionBlock:
            return AttentionBlock(
                spatial_dims=spatial_dims,
                num_channels=channels,
                norm_num_groups=norm_num_groups,
                norm_eps=norm_eps,
                use_flash_attention=use_flash_attention,
                include_fc=include_fc,
            )

        def resblock(cin: int, cout: int) -> ResBlock:
            return ResBlock(spatial_dims, cin, norm_num_groups, norm_eps, cout)

        blocks: list[nn.Module] = [
            input_conv(spatial_dims, in_channels, num_channels[0], self.initial_downsample_factor)
        ]
        channels = num_channels[0]
        for level, level_channels in enumerate(num_channels):
            for _ in range(num_res_blocks[level]):
                blocks.append(resblock(channels, level_channels))
                channels = level_channels
                if attention_levels[level]:
                    blocks.append(attention(channels))
            if level < len(num_channels) - 1:
                blocks.append(
                    Downsample(spatial_dims, channels, self.downsample_factors[level], self.use_conv_downsample)
                )
        if with_nonlocal_attn:
            blocks += [resblock(num_channels[-1], num_channels[-1]), attention(num_channels[-1])]
            blocks.append(resblock(num_channels[-1], num_channels[-1]))
        blocks.append(nn.GroupNorm(norm_num_groups, num_channels[-1], eps=norm_eps, affine=True))
        blocks.append(
            Convolution(spatial_dims, num_channels[-1], out_channels, strides=1, kernel_size=3, padding=1, conv_only=True)
        )
        self.blocks = nn.ModuleList(blocks)

    def check_input_shape(self, shape: Sequence[int]) -> None:
        """Raise a ValueError unless ``shape`` (B, C, *spatial) fits this encoder."""
        if len(shape) != self.spatial_dims + 2:
            raise ValueError(
                f"Encoder expects a {self.spatial_dims + 2}D input (batch, channel, {self.spatial_dims} spatial axes), "
                f"got shape {tuple(shape)}."
            )
        if shape[1] != self.in_channels:
            raise ValueError(f"Encoder expects {self.in_channels} input channels, got shape {tuple(shape)}.")
        for axis, (size, factor) in enumerate(zip(shape[2:], self.total_factor)):
            if size % factor:
                lower, upper = (size // factor) * factor, (size // factor + 1) * factor
                nearest = f"{lower} or {upper}" if lower > 0 else f"{upper}"
                raise ValueError(
                    f"Input spatial axis {axis} has size {size} (input shape {tuple(shape)}), which is not divisible by "
                    f"the total downsample factor {factor} of that axis; use a multiple of {factor} (e.g. {nearest})."
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_shape(x.shape)
        return self._run_blocks(x)


class Decoder(_FactorState):
    """Convolutional cascade that maps a spatial latent back to image space.

    Args:
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        num_channels: output channels of each encoder level; the decoder walks them in reverse.
        in_channels: channels of the latent.
        out_channels: channels of the output image.
        num_res_blocks: residual blocks per level (encoder order).
        norm_num_groups: groups of every GroupNorm.
        norm_eps: epsilon of every GroupNorm.
        attention_levels: which levels get attention (encoder order).
        with_nonlocal_attn: if True, add residual + attention + residual blocks at the lowest resolution.
        use_flash_attention: if True, attention uses PyTorch's scaled-dot-product attention.
        use_convtranspose: if True, upsample with transposed convolutions instead of nearest interpolation + conv.
        upsample_factors: one factor per upsampling level in decoder order (lowest resolution first), each an int or
            one int per spatial axis; None means 2 everywhere (0.2.3 behaviour).
        include_fc: if True, attention blocks apply their output projection (MONAI core default); False is 0.2.3.
        final_upsample_factor: an int or one int per axis, the encoder's ``initial_downsample_factor``: the last
            convolution becomes an :class:`OutputUpsample`. 1 (default) is the legacy kernel-3 convolution.
    """

    _factor_arg = "upsample_factors"
    _initial_arg = "final_upsample_factor"

    def __init__(
        self,
        spatial_dims: int,
        num_channels: Sequence[int],
        in_channels: int,
        out_channels: int,
        num_res_blocks: Sequence[int],
        norm_num_groups: int,
        norm_eps: float,
        attention_levels: Sequence[bool],
        with_nonlocal_attn: bool = True,
        use_flash_attention: bool = False,
        use_convtranspose: bool = False,
        upsample_factors: Sequence[Factor] | None = None,
        include_fc: bool = False,
        final_upsample_factor: Factor = 1,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.num_channels = num_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.norm_num_groups = norm_num_groups
        self.norm_eps = norm_eps
        self.attention_levels = attention_levels
        self.upsample_factors = normalize_factors(
            upsample_factors, len(num_channels) - 1, spatial_dims, name="upsample_factors"
        )
        self.final_upsample_factor = normalize_factor(final_upsample_factor, spatial_dims, "final_upsample_factor")
        self.total_factor = total_factor((*self.upsample_factors, self.final_upsample_factor))
        self._init_factors(self.upsample_factors, self.final_upsample_factor)

        def attention(channels: int) -> AttentionBlock:
            return AttentionBlock(
                spatial_dims=spatial_dims,
                num_channels=channels,
                norm_num_groups=norm_num_groups,
                norm_eps=norm_eps,
                use_flash_attention=use_flash_attention,
                include_fc=include_fc,
            )

        def resblock(cin: int, cout: int) -> ResBlock:
            return ResBlock(spatial_dims, cin, norm_num_groups, norm_eps, cout)

        rev_channels = list(reversed(num_channels))
        rev_attention = list(reversed(attention_levels))
        rev_res_blocks = list(reversed(num_res_blocks))
        blocks: list[nn.Module] = [
            Convolution(spatial_dims, in_channels, rev_channels[0], strides=1, kernel_size=3, padding=1, conv_only=True)
        ]
        if with_nonlocal_attn:
            blocks += [resblock(rev_channels[0], rev_channels[0]), attention(rev_channels[0])]
            blocks.append(resblock(rev_channels[0], rev_channels[0]))
        channels = rev_channels[0]
        for level, level_channels in enumerate(rev_channels):
            for _ in range(rev_res_blocks[level]):
                blocks.append(resblock(channels, level_channels))
                channels = level_channels
                if rev_attention[level]:
                    blocks.append(attention(channels))
            if level < len(rev_channels) - 1:
                blocks.append(
                    Upsample(spatial_dims, channels, use_convtranspose, scale_factor=self.upsample_factors[level])
                )
        blocks.append(nn.GroupNorm(norm_num_groups, channels, eps=norm_eps, affine=True))
        if any(f != 1 for f in self.final_upsample_factor):
            blocks.append(
                OutputUpsample(spatial_dims, channels, out_channels, use_convtranspose, self.final_upsample_factor)
            )
        else:
            blocks.append(
                Convolution(spatial_dims, channels, out_channels, strides=1, kernel_size=3, padding=1, conv_only=True)
            )
        self.blocks = nn.ModuleList(blocks)

    def check_input_shape(self, shape: Sequence[int]) -> None:
        """Raise a ValueError unless ``shape`` is a latent (B, in_channels, *spatial) this decoder accepts."""
        if len(shape) != self.spatial_dims + 2 or shape[1] != self.in_channels:
            raise ValueError(
                f"Decoder expects a latent of shape (batch, {self.in_channels}, {self.spatial_dims} spatial axes), "
                f"got {tuple(shape)}."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_shape(x.shape)
        return self._run_blocks(x)


class AutoencoderKL(nn.Module):
    """Autoencoder with a KL-regularised latent (Rombach et al. 2022; Pinaya et al. 2022) and per-level factors.

    Arguments and defaults are those of monai-generative 0.2.3, plus ``downsample_factors``,
    ``upsample_factors``, ``include_fc``, ``initial_downsample_factor`` and ``use_conv_downsample``. Leaving them
    at their defaults reproduces 0.2.3 exactly (module tree, state dict keys and numbers).

    Args:
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        in_channels: number of input channels.
        out_channels: number of output channels.
        num_res_blocks: residual blocks per level (an int applies to every level).
        num_channels: output channels of each level.
        attention_levels: which levels get attention blocks.
        latent_channels: channels of the latent.
        norm_num_groups: groups of every GroupNorm; every entry of ``num_channels`` must be divisible by it.
        norm_eps: epsilon of every GroupNorm.
        with_encoder_nonlocal_attn: if True, the encoder ends with residual + attention + residual blocks.
        with_decoder_nonlocal_attn: if True, the decoder starts with residual + attention + residual blocks.
        use_flash_attention: if True, attention uses ``torch.nn.functional.scaled_dot_product_attention`` (any device;
            0.2.3 required xformers and CUDA).
        use_checkpointing: if True, recompute each encoder/decoder block in the backward pass instead of storing its
            activations (saves memory, costs about one extra forward).
        use_convtranspose: if True, the decoder upsamples with transposed convolutions.
        downsample_factors: one factor per downsampling level, ``len(num_channels) - 1`` entries, each an int or a
            sequence with one int per spatial axis: ``[4, 2]`` = 8x, ``[8, 2]`` = 16x, ``[(2, 2, 1), (2, 2, 2)]``
            for anisotropic volumes. None means 2 at every level (0.2.3 behaviour).
        upsample_factors: decoder factors in decoder order (latent first); default: ``downsample_factors`` reversed.
            Their per-axis product must equal that of ``downsample_factors``.
        include_fc: if True, attention blocks apply their output projection, as MONAI core's AutoencoderKL does by
            default; False (default) is 0.2.3's behaviour.
        initial_downsample_factor: an int or one int per spatial axis (default 1 = none): an extra resampling step
            at the very input of the encoder and the very output of the decoder. The encoder's first convolution
            becomes a patchify convolution (kernel = stride = factor: every input voxel is used exactly once, none
            is skipped); the decoder's last convolution becomes its inverse (:class:`OutputUpsample`: a sub-pixel
            transposed convolution with ``use_convtranspose``, else nearest interpolation + kernel-3 convolution,
            computed at the low resolution without the interpolated tensor).
            The total factor per axis is ``initial_downsample_factor * prod(downsample_factors)``; the first level
            then works at ``1 / initial`` of the input size per axis (its activations shrink by the product).
        use_conv_downsample: if True (default), each level downsamples with a strided convolution; if False, with
            average pooling of kernel = stride = the level's factor (no parameters).

    Raises:
        ValueError: for channels not divisible by ``norm_num_groups``, mismatched list lengths, invalid factors, or
            upsample factors whose total differs from the downsample total.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        out_channels: int = 1,
        num_res_blocks: Sequence[int] | int = (2, 2, 2, 2),
        num_channels: Sequence[int] = (32, 64, 64, 64),
        attention_levels: Sequence[bool] = (False, False, True, True),
        latent_channels: int = 3,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        with_encoder_nonlocal_attn: bool = True,
        with_decoder_nonlocal_attn: bool = True,
        use_flash_attention: bool = False,
        use_checkpointing: bool = False,
        use_convtranspose: bool = False,
        downsample_factors: Sequence[Factor] | None = None,
        upsample_factors: Sequence[Factor] | None = None,
        include_fc: bool = False,
        initial_downsample_factor: Factor = 1,
        use_conv_downsample: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"`spatial_dims` must be 1, 2 or 3, got {spatial_dims!r}.")
        if any(c % norm_num_groups != 0 for c in num_channels):
            raise ValueError(
                f"Every entry of `num_channels` {list(num_channels)} must be divisible by "
                f"`norm_num_groups` ({norm_num_groups})."
            )
        if len(num_channels) != len(attention_levels):
            raise ValueError(
                f"`attention_levels` {list(attention_levels)} must have one entry per level of `num_channels` "
                f"({len(num_channels)})."
            )
        if isinstance(num_res_blocks, int):
            num_res_blocks = ensure_tuple_rep(num_res_blocks, len(num_channels))
        if len(num_res_blocks) != len(num_channels):
            raise ValueError(
                f"`num_res_blocks` {list(num_res_blocks)} must be an int or have one entry per level of "
                f"`num_channels` ({len(num_channels)})."
            )
        levels = len(num_channels) - 1
        down = normalize_factors(downsample_factors, levels, spatial_dims, "downsample_factors")
        up = (
            tuple(reversed(down))
            if upsample_factors is None
            else normalize_factors(upsample_factors, levels, spatial_dims, "upsample_factors")
        )
        if total_factor(up) != total_factor(down):
            raise ValueError(
                f"`upsample_factors` {[list(f) for f in up]} multiply to {total_factor(up)} per axis but "
                f"`downsample_factors` {[list(f) for f in down]} multiply to {total_factor(down)}; the decoder "
                "must restore the input size."
            )

        self.spatial_dims = spatial_dims
        self.latent_channels = latent_channels
        # constructor arguments, enough to rebuild this model (stored in self-describing checkpoints)
        self.init_args: dict[str, Any] = {
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "num_res_blocks": list(num_res_blocks),
            "num_channels": list(num_channels),
            "attention_levels": [bool(a) for a in attention_levels],
            "latent_channels": latent_channels,
            "norm_num_groups": norm_num_groups,
            "norm_eps": norm_eps,
            "with_encoder_nonlocal_attn": with_encoder_nonlocal_attn,
            "with_decoder_nonlocal_attn": with_decoder_nonlocal_attn,
            "use_flash_attention": use_flash_attention,
            "use_checkpointing": use_checkpointing,
            "use_convtranspose": use_convtranspose,
            "downsample_factors": None if downsample_factors is None else [list(f) for f in down],
            "upsample_factors": None if upsample_factors is None else [list(f) for f in up],
            "include_fc": include_fc,
        }
        # the newer arguments are recorded only when they differ from the default, so that the arguments of a model
        # built without them (and the checkpoints that store them) stay exactly as they were
        initial = normalize_factor(initial_downsample_factor, spatial_dims, "initial_downsample_factor")
        if any(f != 1 for f in initial):
            self.init_args["initial_downsample_factor"] = (
                initial[0] if _is_int(initial_downsample_factor) else list(initial)
            )
        if not use_conv_downsample:
            self.init_args["use_conv_downsample"] = False

        self.encoder = Encoder(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_channels=num_channels,
            out_channels=latent_channels,
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            attention_levels=attention_levels,
            with_nonlocal_attn=with_encoder_nonlocal_attn,
            use_flash_attention=use_flash_attention,
            downsample_factors=down,
            include_fc=include_fc,
            initial_downsample_factor=initial,
            use_conv_downsample=use_conv_downsample,
        )
        self.decoder = Decoder(
            spatial_dims=spatial_dims,
            num_channels=num_channels,
            in_channels=latent_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            attention_levels=attention_levels,
            with_nonlocal_attn=with_decoder_nonlocal_attn,
            use_flash_attention=use_flash_attention,
            use_convtranspose=use_convtranspose,
            upsample_factors=up,
            include_fc=include_fc,
            final_upsample_factor=initial,
        )

        def pointwise() -> Convolution:
            return Convolution(
                spatial_dims, latent_channels, latent_channels, strides=1, kernel_size=1, padding=0, conv_only=True
            )

        self.quant_conv_mu = pointwise()
        self.quant_conv_log_sigma = pointwise()
        self.post_quant_conv = pointwise()
        self.use_checkpointing = use_checkpointing
        self._tiling: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------------------- geometry
    @property
    def downsample_factors(self) -> tuple[tuple[int, ...], ...]:
        """Per-level, per-axis downsample factors."""
        return self.encoder.downsample_factors

    @property
    def upsample_factors(self) -> tuple[tuple[int, ...], ...]:
        """Per-level, per-axis upsample factors in decoder order."""
        return self.decoder.upsample_factors

    @property
    def initial_downsample_factor(self) -> tuple[int, ...]:
        """Per-axis factor of the encoder's first (patchify) convolution and the decoder's last one."""
        return self.encoder.initial_downsample_factor

    @property
    def total_downsample_factor(self) -> tuple[int, ...]:
        """Total factor by which each spatial axis shrinks from image to latent:
        ``initial_downsample_factor * prod(downsample_factors)``."""
        return self.encoder.total_factor

    def latent_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Latent shape for an input shape.

        Args:
            input_shape: either the spatial size (``spatial_dims`` ints), giving the latent's spatial size, or the
                full shape (batch, channels, *spatial), giving (batch, latent_channels, *latent spatial).

        Raises:
            ValueError: if a spatial size is not divisible by the total factor of its axis.
        """
        shape = tuple(int(s) for s in input_shape)
        if len(shape) == self.spatial_dims:
            self.encoder.check_input_shape((1, self.encoder.in_channels, *shape))
            return tuple(s // f for s, f in zip(shape, self.total_downsample_factor))
        self.encoder.check_input_shape(shape)
        return (shape[0], self.latent_channels, *(s // f for s, f in zip(shape[2:], self.total_downsample_factor)))

    # ------------------------------------------------------------------------------------------ checkpointing
    @property
    def use_checkpointing(self) -> bool:
        """Whether encoder and decoder blocks are recomputed during backward instead of stored."""
        return self.encoder.use_checkpointing

    @use_checkpointing.setter
    def use_checkpointing(self, value: bool) -> None:
        self.encoder.use_checkpointing = bool(value)
        self.decoder.use_checkpointing = bool(value)

    # ----------------------------------------------------------------------------------------------- forward
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode an image into the latent mean and standard deviation (tiled when tiling is enabled).

        Args:
            x: B x C x *spatial tensor, each spatial size divisible by the total factor of its axis.
        """
        if self._tiling is not None:
            return self.encode_tiled(x, **self._tiling)
        return self._encode(x)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._quantize(self.encoder(x))

    def _quantize(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_mu = self.quant_conv_mu(h)
        z_log_var = torch.clamp(self.quant_conv_log_sigma(h), -30.0, 20.0)
        return z_mu, torch.exp(z_log_var / 2)

    def sampling(self, z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
        """Draw ``z = mu + eps * sigma`` with ``eps ~ N(0, 1)`` (reparameterisation trick)."""
        return z_mu + torch.randn_like(z_sigma) * z_sigma

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Encode and decode with the latent mean (no sampling)."""
        z_mu, _ = self.encode(x)
        return self.decode(z_mu)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode a latent into image space (tiled when tiling is enabled)."""
        if self._tiling is not None:
            return self.decode_tiled(z, **self._tiling)
        return self._decode(z)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        self.decoder.check_input_shape(z.shape)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_mu, z_sigma = self.encode(x)
        z = self.sampling(z_mu, z_sigma)
        return self.decode(z), z_mu, z_sigma

    def encode_stage_2_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Sampled latent for training a stage-2 (diffusion) model."""
        z_mu, z_sigma = self.encode(x)
        return self.sampling(z_mu, z_sigma)

    def decode_stage_2_outputs(self, z: torch.Tensor) -> torch.Tensor:
        """Decode a stage-2 sample into image space."""
        return self.decode(z)

    # ------------------------------------------------------------------------------------------------ tiling
    def enable_tiling(
        self,
        tile_size: Sequence[int] | int,
        halo: Sequence[int] | int | None = None,
        whole_voxels: int | None = None,
    ) -> None:
        """Make ``encode``/``decode`` (and so ``forward``/``reconstruct``) run tiled: exact, with bounded memory.

        See ``encode_tiled``/``decode_tiled``. Inference only: tiled passes run under ``torch.no_grad()``, so
        disable tiling before training.

        Args:
            tile_size: tile size in image voxels (an int for every axis), a multiple of the total downsample factor
                of each axis.
            halo: deprecated, has no effect (halos are derived from the layers); passing it warns, and it is
                removed in version 0.4.0. Still checked: a non-negative multiple of the total factor of each axis.
            whole_voxels: levels with at most this many voxels per sample are held whole (default: one tile's).
        """
        tile = self._check_tiling(tile_size, halo)
        self._tiling = {"tile_size": tile, "whole_voxels": self._check_whole_voxels(whole_voxels)}

    def disable_tiling(self) -> None:
        """Return to whole-volume ``encode``/``decode``."""
        self._tiling = None

    def _check_tiling(self, tile_size: Sequence[int] | int, halo: Sequence[int] | int | None) -> tuple[int, ...]:
        """The checked tile size; a ``halo`` other than None is checked too and triggers its deprecation warning."""
        factor = self.total_downsample_factor
        tile = ensure_tuple_rep(tile_size, self.spatial_dims)
        for axis, (t, f) in enumerate(zip(tile, factor)):
            if not _is_int(t) or t <= 0 or t % f:
                raise ValueError(
                    f"`tile_size` {tuple(tile)}: axis {axis} must be a positive multiple of the total downsample "
                    f"factor {f} of that axis, got {t!r}."
                )
        if halo is not None:
            warnings.warn(
                "AutoencoderKL tiling: `halo` is deprecated and has no effect (halos are derived from the layers); "
                "it will be removed in version 0.4.0. Stop passing it.",
                DeprecationWarning,
                stacklevel=3,
            )
            halo = ensure_tuple_rep(halo, self.spatial_dims)
            for axis, (h, f) in enumerate(zip(halo, factor)):
                if not _is_int(h) or h < 0 or h % f:
                    raise ValueError(
                        f"`halo` {tuple(halo)}: axis {axis} must be a non-negative multiple of the total downsample "
                        f"factor {f} of that axis, got {h!r}."
                    )
        return tuple(int(t) for t in tile)

    @staticmethod
    def _check_whole_voxels(whole_voxels: int | None) -> int | None:
        if whole_voxels is not None and (not _is_int(whole_voxels) or whole_voxels < 1):
            raise ValueError(f"`whole_voxels` must be a positive integer or None, got {whole_voxels!r}.")
        return None if whole_voxels is None else int(whole_voxels)

    def encode_tiled(
        self,
        x: torch.Tensor,
        tile_size: Sequence[int] | int,
        halo: Sequence[int] | int | None = None,
        whole_voxels: int | None = None,
        progress: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode exactly as ``encode`` does, holding full-resolution activations one tile at a time.

        Convolutions are computed on tiles with the halo their kernels need, GroupNorm with statistics of the whole
        volume (gathered tile by tile), attention on the whole tensor of its (low-resolution) level. The result
        equals the untiled one up to float rounding. Runs under ``torch.no_grad()`` (inference only).

        Args:
            x: B x C x *spatial image, each spatial size divisible by the total factor of its axis (any multiple of
                the tile or not).
            tile_size: spatial size of the input tiles in image voxels (an int for every axis), a multiple of the
                total downsample factor of each axis. Lower levels work in tiles scaled by their factor. Larger
                tiles: more memory, less recomputed halo.
            halo: deprecated, has no effect (halos are derived from the layers); passing it warns, and it is
                removed in version 0.4.0.
            whole_voxels: levels whose activations have at most this many voxels per sample are computed whole, as
                in the untiled pass; larger ones are streamed. Default: the voxels of one tile.
            progress: show a progress bar of the tile passes (tqdm, when installed).
        """
        self.encoder.check_input_shape(x.shape)
        tile = self._check_tiling(tile_size, halo)
        whole = self._check_whole_voxels(whole_voxels) or math.prod(tile)
        with torch.no_grad():
            h = run_tiled(self.encoder.blocks, x, tile, x.shape[2:], whole, progress="tiled encode" if progress else False)
            return self._quantize(h)

    def decode_tiled(
        self,
        z: torch.Tensor,
        tile_size: Sequence[int] | int,
        halo: Sequence[int] | int | None = None,
        whole_voxels: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Decode exactly as ``decode`` does, holding full-resolution activations one tile at a time.

        Same scheme as ``encode_tiled``. Runs under ``torch.no_grad()`` (inference only).

        Args:
            z: B x latent_channels x *latent spatial.
            tile_size: spatial size of the output tiles in image voxels (an int for every axis), a multiple of the
                total factor of each axis; it need not divide the output size.
            halo: deprecated, has no effect (halos are derived from the layers); passing it warns, and it is
                removed in version 0.4.0.
            whole_voxels: levels whose activations have at most this many voxels per sample are computed whole;
                larger ones are streamed. Default: the voxels of one tile.
            progress: show a progress bar of the tile passes (tqdm, when installed).
        """
        self.decoder.check_input_shape(z.shape)
        tile = self._check_tiling(tile_size, halo)
        whole = self._check_whole_voxels(whole_voxels) or math.prod(tile)
        image_shape = tuple(n * f for n, f in zip(z.shape[2:], self.decoder.total_factor))
        with torch.no_grad():
            return run_tiled(self.decoder.blocks, self.post_quant_conv(z), tile, image_shape, whole,
                             progress="tiled decode" if progress else False)
