# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""KL-regularised autoencoder with per-level, per-axis down/upsampling factors.

With ``downsample_factors`` left out (or all 2) the module tree, the ``state_dict`` keys and the numbers are those
of monai-generative 0.2.3's ``AutoencoderKL``. Residual blocks are MONAI core's; the attention block keeps the 0.2.3
parameter layout (``to_q``/``to_k``/``to_v``/``proj_attn``) so old checkpoints load unchanged, and state dicts saved
by ``monai.networks.nets.AutoencoderKL`` are converted on load.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from typing import Any, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets.autoencoderkl import AEKLResBlock as ResBlock
from monai.utils import ensure_tuple_rep
from torch.utils.checkpoint import checkpoint

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

Factor = Union[int, Sequence[int]]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def normalize_factors(
    factors: Sequence[Factor] | None, num_levels: int, spatial_dims: int, name: str = "downsample_factors"
) -> tuple[tuple[int, ...], ...]:
    """Check per-level resampling factors and expand each one to a tuple with one int per spatial axis.

    Args:
        factors: one entry per resampling level; an entry is an int (the same on every axis) or a sequence with one
            int per spatial axis. ``None`` means 2 on every axis at every level (the legacy behaviour).
        num_levels: how many resampling levels the network has (``len(num_channels) - 1``).
        spatial_dims: number of spatial axes.
        name: argument name used in error messages.

    Raises:
        ValueError: when the number of entries is not ``num_levels``, an entry is not an integer or a sequence of
            ``spatial_dims`` integers, or a factor is smaller than 1.
    """
    if factors is None:
        return tuple((2,) * spatial_dims for _ in range(num_levels))
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence):
        raise ValueError(
            f"`{name}` must be a list with one factor per level (len(num_channels) - 1 = {num_levels}), "
            f"got {factors!r}."
        )
    if len(factors) != num_levels:
        raise ValueError(
            f"`{name}` must have len(num_channels) - 1 = {num_levels} entries (one per resampling level), "
            f"got {len(factors)}: {list(factors)!r}."
        )
    out = []
    for level, factor in enumerate(factors):
        if _is_int(factor):
            per_axis = (int(factor),) * spatial_dims
        elif isinstance(factor, Sequence) and not isinstance(factor, (str, bytes)):
            if len(factor) != spatial_dims:
                raise ValueError(
                    f"`{name}[{level}]` = {factor!r} must have one factor per spatial axis ({spatial_dims}), "
                    f"got {len(factor)}."
                )
            if not all(_is_int(f) for f in factor):
                raise ValueError(f"`{name}[{level}]` = {factor!r} must contain integers only.")
            per_axis = tuple(int(f) for f in factor)
        else:
            raise ValueError(
                f"`{name}[{level}]` = {factor!r} must be an integer or a sequence of {spatial_dims} integers."
            )
        if any(f < 1 for f in per_axis):
            raise ValueError(f"`{name}[{level}]` = {factor!r}: every factor must be >= 1.")
        out.append(per_axis)
    return tuple(out)


def normalize_factor(factor: Factor, spatial_dims: int, name: str) -> tuple[int, ...]:
    """Check one resampling factor (an int, or one int per spatial axis, each >= 1) and expand it to a tuple.

    Args:
        factor: the factor.
        spatial_dims: number of spatial axes.
        name: argument name used in error messages.

    Raises:
        ValueError: when ``factor`` is not a positive integer or a sequence of ``spatial_dims`` positive integers.
    """
    if _is_int(factor):
        per_axis: tuple[int, ...] = (int(factor),) * spatial_dims
    elif isinstance(factor, Sequence) and not isinstance(factor, (str, bytes)) and all(_is_int(f) for f in factor):
        if len(factor) != spatial_dims:
            raise ValueError(
                f"`{name}` = {list(factor)!r} must have one factor per spatial axis ({spatial_dims}), "
                f"got {len(factor)}."
            )
        per_axis = tuple(int(f) for f in factor)
    else:
        raise ValueError(f"`{name}` must be an integer or a sequence of {spatial_dims} integers, got {factor!r}.")
    if any(f < 1 for f in per_axis):
        raise ValueError(f"`{name}` = {factor!r}: every factor must be >= 1.")
    return per_axis


def total_factor(factors: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Product of per-level, per-axis factors: the total resampling factor of each spatial axis."""
    if len(factors) == 0:
        return ()
    return tuple(math.prod(level[axis] for level in factors) for axis in range(len(factors[0])))


def _is_legacy(factors: Sequence[Sequence[int]]) -> bool:
    return all(f == 2 for level in factors for f in level)


def _pad_arg(per_axis: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """Turn (before, after) pads listed first axis first into the last-axis-first order of ``F.pad``."""
    out: list[int] = []
    for before, after in reversed(per_axis):
        out.extend((before, after))
    return tuple(out)


class Downsample(nn.Module):
    """Divides each spatial axis by its factor, with a strided convolution (default) or average pooling.

    Convolution (``use_conv=True``): for a factor ``s >= 2`` on an axis the input is padded by one voxel at the end of
    that axis and convolved with a kernel of ``s + 1`` and stride ``s`` without padding: the output has exactly
    ``n / s`` voxels and consecutive windows overlap by one voxel, so every input voxel reaches the output. For
    ``s = 2`` this is the legacy layer (pad (0, 1), kernel 3, stride 2). A factor of 1 is a plain kernel-3
    convolution with symmetric padding.

    Average pooling (``use_conv=False``): kernel = stride = the factor of each axis, no parameters; every input voxel
    enters exactly one output voxel with weight ``1 / prod(factor)`` (a factor of 1 leaves that axis unchanged).

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: number of input (and output) channels.
        stride: an int (same on every axis) or one int per axis.
        use_conv: if True, a learned strided convolution; if False, parameter-free average pooling.
    """

    def __init__(self, spatial_dims: int, in_channels: int, stride: Factor = 2, use_conv: bool = True) -> None:
        super().__init__()
        (strides,) = normalize_factors([stride], 1, spatial_dims, name="stride")
        self.stride = strides
        self.use_conv = bool(use_conv)
        self.pad = _pad_arg([(1, 1) if s == 1 else (0, 1) for s in strides])
        if not self.use_conv:
            return
        kernel = tuple(3 if s == 1 else s + 1 for s in strides)
        self.conv = Convolution(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=in_channels,
            strides=strides,
            kernel_size=kernel,
            padding=0,
            conv_only=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_conv:
            return _AVG_POOL[len(self.stride)](x, kernel_size=self.stride, stride=self.stride)
        x = F.pad(x, self.pad, mode="constant", value=0.0)
        return self.conv(x)


_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


class Upsample(nn.Module):
    """Multiplies each spatial axis by its factor.

    Without ``use_convtranspose``: nearest-neighbour interpolation followed by a kernel-3 convolution (legacy).
    With it: a transposed convolution of kernel ``s + 1``, stride ``s``, padding 1 and output padding 1 (kernel 3
    and stride 2 for ``s = 2``, as in 0.2.3), which gives exactly ``n * s`` voxels and leaves no output voxel
    without a contribution. A factor of 1 is a kernel-3 convolution that keeps the size.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: number of input (and output) channels.
        use_convtranspose: if True, upsample with a transposed convolution.
        scale_factor: an int (same on every axis) or one int per axis.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, use_convtranspose: bool = False, scale_factor: Factor = 2
    ) -> None:
        super().__init__()
        (scales,) = normalize_factors([scale_factor], 1, spatial_dims, name="scale_factor")
        self.scale_factor = scales
        self.use_convtranspose = use_convtranspose
        if use_convtranspose:
            self.conv = Convolution(
                spatial_dims=spatial_dims,
                in_channels=in_channels,
                out_channels=in_channels,
                strides=scales,
                kernel_size=tuple(3 if s == 1 else s + 1 for s in scales),
                padding=1,
                output_padding=tuple(0 if s == 1 else 1 for s in scales),
                conv_only=True,
                is_transposed=True,
            )
        else:
            self.conv = Convolution(
                spatial_dims=spatial_dims,
                in_channels=in_channels,
                out_channels=in_channels,
                strides=1,
                kernel_size=3,
                padding=1,
                conv_only=True,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_convtranspose:
            return self.conv(x)
        if any(s != 1 for s in self.scale_factor):
            x = F.interpolate(x, scale_factor=tuple(float(s) for s in self.scale_factor), mode="nearest")
        return self.conv(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # MONAI core names the interpolation branch's convolution `postconv`; its transposed variant is a
        # different layer (kernel 2, no padding) that this block cannot reproduce.
        if f"{prefix}deconv.weight" in state_dict:
            raise ValueError(
                f"State dict key '{prefix}deconv.weight' comes from MONAI core's AutoencoderKL with "
                "use_convtranspose=True, whose kernel-2 transposed convolution differs from this model's kernel-3 "
                "one; it cannot be loaded. Checkpoints of MONAI core with use_convtranspose=False load fine."
            )
        for key in [k for k in state_dict if k.startswith(f"{prefix}postconv.")]:
            state_dict[f"{prefix}conv." + key[len(f"{prefix}postconv.") :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)


def input_conv(spatial_dims: int, in_channels: int, out_channels: int, factor: Sequence[int]) -> Convolution:
    """The encoder's first convolution, which also applies the initial downsample factor.

    On an axis with factor 1 it is the legacy kernel-3, stride-1, padding-1 convolution. On an axis with factor
    ``f > 1`` it is a "patchify" convolution: kernel = stride = ``f``, no padding, so the windows tile the axis and
    every input voxel enters exactly one output voxel (a kernel-3 convolution with stride ``f > 3`` would skip
    ``f - 3`` of every ``f`` voxels). With factor 1 on every axis this is the legacy layer.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: image channels.
        out_channels: channels of the first level.
        factor: initial downsample factor, one int per axis.
    """
    if all(f == 1 for f in factor):  # exactly the legacy layer
        return Convolution(spatial_dims, in_channels, out_channels, strides=1, kernel_size=3, padding=1, conv_only=True)
    return Convolution(
        spatial_dims,
        in_channels,
        out_channels,
        strides=tuple(factor),
        kernel_size=tuple(3 if f == 1 else f for f in factor),
        padding=tuple(1 if f == 1 else 0 for f in factor),
        conv_only=True,
    )


class OutputUpsample(Upsample):
    """The decoder's last convolution when it also undoes the initial downsample factor (changes channels).

    With ``use_convtranspose``: a sub-pixel convolution written as one transposed convolution of kernel ``3 f``,
    stride ``f`` and padding ``f`` per axis. Output voxel ``q f + r`` receives low-resolution voxels ``q - 1``,
    ``q`` and ``q + 1`` through the kernel taps of its phase ``r``: every output voxel gets exactly three
    contributions per axis (no checkerboard from uneven overlap) and no full-resolution hidden activation is
    stored. It equals a kernel-3 convolution to ``out_channels * prod(f)`` channels followed by a pixel shuffle.
    Without it: nearest-neighbour upsampling followed by a kernel-3 convolution (as the legacy ``Upsample``), which
    holds one full-resolution tensor with ``in_channels`` channels. On an axis with factor 1 both are a kernel-3,
    padding-1 (transposed) convolution.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: channels of the last decoder level.
        out_channels: image channels.
        use_convtranspose: if True, the sub-pixel transposed convolution; else interpolation + convolution.
        scale_factor: one int per axis (the initial downsample factor).
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, use_convtranspose: bool, scale_factor: Factor
    ) -> None:
        nn.Module.__init__(self)
        (scales,) = normalize_factors([scale_factor], 1, spatial_dims, name="scale_factor")
        self.scale_factor = scales
        self.use_convtranspose = use_convtranspose
        if use_convtranspose:
            self.conv = Convolution(
                spatial_dims=spatial_dims,
                in_channels=in_channels,
                out_channels=out_channels,
                strides=scales,
                kernel_size=tuple(3 * s for s in scales),
                padding=scales,
                output_padding=0,
                conv_only=True,
                is_transposed=True,
            )
        else:
            self.conv = Convolution(
                spatial_dims, in_channels, out_channels, strides=1, kernel_size=3, padding=1, conv_only=True
            )


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with the parameter layout of monai-generative 0.2.3.

    0.2.3 creates an output projection (``proj_attn``) but never applies it; ``include_fc=False`` (default) keeps
    that behaviour, ``include_fc=True`` applies it as MONAI core's ``SpatialAttentionBlock`` does.

    Args:
        spatial_dims: number of spatial dimensions.
        num_channels: number of channels (the attention width).
        num_head_channels: channels per head; None means a single head.
        norm_num_groups: groups of the GroupNorm applied before attention.
        norm_eps: epsilon of that GroupNorm.
        use_flash_attention: if True, use ``torch.nn.functional.scaled_dot_product_attention`` (memory-efficient
            kernels where the device has them) instead of materialising the attention matrix.
        include_fc: if True, apply ``proj_attn`` to the attention output.
    """

    def __init__(
        self,
        spatial_dims: int,
        num_channels: int,
        num_head_channels: int | None = None,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        use_flash_attention: bool = False,
        include_fc: bool = False,
    ) -> None:
        super().__init__()
        if num_head_channels is not None and num_channels % num_head_channels != 0:
            raise ValueError(
                f"num_channels ({num_channels}) must be divisible by num_head_channels ({num_head_channels})."
            )
        self.spatial_dims = spatial_dims
        self.num_channels = num_channels
        self.num_heads = num_channels // num_head_channels if num_head_channels is not None else 1
        self.scale = 1 / math.sqrt(num_channels / self.num_heads)
        self.use_flash_attention = use_flash_attention
        self.include_fc = include_fc

        self.norm = nn.GroupNorm(num_groups=norm_num_groups, num_channels=num_channels, eps=norm_eps, affine=True)
        self.to_q = nn.Linear(num_channels, num_channels)
        self.to_k = nn.Linear(num_channels, num_channels)
        self.to_v = nn.Linear(num_channels, num_channels)
        self.proj_attn = nn.Linear(num_channels, num_channels)
        # unused without include_fc (as in 0.2.3): keep it out of optimizers and DDP's gradient bookkeeping
        self.proj_attn.requires_grad_(include_fc)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        b, c = x.shape[:2]
        spatial = x.shape[2:]
        h = self.norm(x).reshape(b, c, -1).transpose(1, 2)  # B, N, C
        q, k, v = (self._split_heads(proj(h)) for proj in (self.to_q, self.to_k, self.to_v))  # B, heads, N, Ch
        if self.use_flash_attention:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            weights = torch.matmul(q, k.transpose(-1, -2)) * self.scale
            out = torch.matmul(weights.softmax(dim=-1), v)
        out = out.transpose(1, 2).reshape(b, -1, c).to(q.dtype)
        if self.include_fc:
            out = self.proj_attn(out)
        out = out.transpose(1, 2).reshape(b, c, *spatial)
        return out + residual

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        self._convert_core_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def _convert_core_keys(self, state_dict: dict, prefix: str) -> None:
        """Rename keys of MONAI core's ``SpatialAttentionBlock`` (``attn.*``) to this block's layout, in place."""
        core = f"{prefix}attn."
        if not any(k.startswith(core) for k in state_dict):
            return
        for kind in ("weight", "bias"):
            qkv = state_dict.pop(f"{core}qkv.{kind}", None)
            if qkv is not None:  # use_combined_linear=True: rows are ordered q, k, v
                for name, part in zip(("to_q", "to_k", "to_v"), qkv.chunk(3, dim=0)):
                    state_dict[f"{prefix}{name}.{kind}"] = part
            for name in ("to_q", "to_k", "to_v"):
                if f"{core}{name}.{kind}" in state_dict:
                    state_dict[f"{prefix}{name}.{kind}"] = state_dict.pop(f"{core}{name}.{kind}")
        out_w = state_dict.pop(f"{core}out_proj.weight", None)
        out_b = state_dict.pop(f"{core}out_proj.bias", None)
        if out_w is not None:
            is_identity = torch.equal(out_w.cpu(), torch.eye(out_w.shape[0], dtype=out_w.dtype)) and (
                out_b is None or not torch.any(out_b)
            )
            if not self.include_fc and not is_identity:
                raise ValueError(
                    f"State dict key '{core}out_proj.weight' holds a trained output projection (MONAI core "
                    "AutoencoderKL with include_fc=True); build this model with include_fc=True to reproduce it."
                )
            state_dict[f"{prefix}proj_attn.weight"] = out_w
            state_dict[f"{prefix}proj_attn.bias"] = out_b if out_b is not None else torch.zeros(out_w.shape[0])
        elif self.include_fc:
            raise ValueError(
                f"State dict under '{core}' has no output projection (MONAI core AutoencoderKL with "
                "include_fc=False); build this model with include_fc=False to reproduce it."
            )
        else:  # the projection is not applied, so its values do not matter: keep ours
            state_dict[f"{prefix}proj_attn.weight"] = self.proj_attn.weight.detach().clone()
            state_dict[f"{prefix}proj_attn.bias"] = self.proj_attn.bias.detach().clone()


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
            transposed convolution with ``use_convtranspose``, else nearest interpolation + kernel-3 convolution).
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
            halo: accepted for compatibility and checked, but not used: halos are derived from the layers.
            whole_voxels: levels with at most this many voxels per sample are held whole (default: one tile's).
        """
        tile, halo_ = self._check_tiling(tile_size, halo)
        self._tiling = {"tile_size": tile, "halo": halo_, "whole_voxels": self._check_whole_voxels(whole_voxels)}

    def disable_tiling(self) -> None:
        """Return to whole-volume ``encode``/``decode``."""
        self._tiling = None

    def _check_tiling(
        self, tile_size: Sequence[int] | int, halo: Sequence[int] | int | None
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        factor = self.total_downsample_factor
        tile = ensure_tuple_rep(tile_size, self.spatial_dims)
        for axis, (t, f) in enumerate(zip(tile, factor)):
            if not _is_int(t) or t <= 0 or t % f:
                raise ValueError(
                    f"`tile_size` {tuple(tile)}: axis {axis} must be a positive multiple of the total downsample "
                    f"factor {f} of that axis, got {t!r}."
                )
        if halo is None:
            halo = tuple((t // 4) // f * f for t, f in zip(tile, factor))
        halo = ensure_tuple_rep(halo, self.spatial_dims)
        for axis, (h, f) in enumerate(zip(halo, factor)):
            if not _is_int(h) or h < 0 or h % f:
                raise ValueError(
                    f"`halo` {tuple(halo)}: axis {axis} must be a non-negative multiple of the total downsample "
                    f"factor {f} of that axis, got {h!r}."
                )
        return tuple(int(t) for t in tile), tuple(int(h) for h in halo)

    @staticmethod
    def _check_whole_voxels(whole_voxels: int | None) -> int | None:
        if whole_voxels is not None and (not _is_int(whole_voxels) or whole_voxels < 1):
            raise ValueError(f"`whole_voxels` must be a positive integer or None, got {whole_voxels!r}.")
        return None if whole_voxels is None else int(whole_voxels)

    @staticmethod
    def _run_tiles(x: torch.Tensor, fn, tile: Sequence[int], halo: Sequence[int], num: Sequence[int], den: Sequence[int]):
        """Apply ``fn`` to halo-padded tiles of ``x`` and stitch the cores; output index = input index * num / den.

        Exact only for functions whose receptive field the halo covers (no normalisation, no attention); kept as a
        helper for such functions. ``encode_tiled``/``decode_tiled`` do not use it.
        """
        sizes = x.shape[2:]
        starts = [range(0, n, t) for n, t in zip(sizes, tile)]
        outputs: list[torch.Tensor] | None = None
        for corner in itertools.product(*starts):
            lo = [max(0, s - h) for s, h in zip(corner, halo)]
            hi = [min(n, s + t + h) for s, t, h, n in zip(corner, tile, halo, sizes)]
            result = fn(x[(..., *(slice(a, b) for a, b in zip(lo, hi)))])
            parts = result if isinstance(result, tuple) else (result,)
            if outputs is None:
                outputs = [
                    p.new_zeros((*p.shape[:2], *(n * u // d for n, u, d in zip(sizes, num, den)))) for p in parts
                ]
            src, dst = [], []
            for s, t, n, a, u, d in zip(corner, tile, sizes, lo, num, den):
                length = min(t, n - s) * u // d
                src.append(slice((s - a) * u // d, (s - a) * u // d + length))
                dst.append(slice(s * u // d, s * u // d + length))
            for out, p in zip(outputs, parts):
                out[(..., *dst)] = p[(..., *src)]
        assert outputs is not None
        return tuple(outputs) if len(outputs) > 1 else outputs[0]

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
            halo: accepted for compatibility and checked, but not used: halos are derived from the layers.
            whole_voxels: levels whose activations have at most this many voxels per sample are computed whole, as
                in the untiled pass; larger ones are streamed. Default: the voxels of one tile.
            progress: show a progress bar of the tile passes (tqdm, when installed).
        """
        self.encoder.check_input_shape(x.shape)
        tile, _ = self._check_tiling(tile_size, halo)
        whole = self._check_whole_voxels(whole_voxels) or math.prod(tile)
        from .tiled import run_tiled

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
            halo: accepted for compatibility and checked, but not used: halos are derived from the layers.
            whole_voxels: levels whose activations have at most this many voxels per sample are computed whole;
                larger ones are streamed. Default: the voxels of one tile.
            progress: show a progress bar of the tile passes (tqdm, when installed).
        """
        self.decoder.check_input_shape(z.shape)
        tile, _ = self._check_tiling(tile_size, halo)
        whole = self._check_whole_voxels(whole_voxels) or math.prod(tile)
        image_shape = tuple(n * f for n, f in zip(z.shape[2:], self.decoder.total_factor))
        from .tiled import run_tiled

        with torch.no_grad():
            return run_tiled(self.decoder.blocks, self.post_quant_conv(z), tile, image_shape, whole,
                             progress="tiled decode" if progress else False)
