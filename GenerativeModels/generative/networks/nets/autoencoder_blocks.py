# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""The building blocks of the fork's ``AutoencoderKL`` and the arithmetic of its resampling factors.

``autoencoderkl`` (the networks) and ``tiled`` (exact tiled execution, which recognises these blocks) both import
from here; this module imports neither. The names stay importable from ``generative.networks.nets.autoencoderkl``
as well.

Residual blocks are MONAI core's ``AEKLResBlock``. The attention block keeps the parameter layout of
monai-generative 0.2.3 (``to_q``/``to_k``/``to_v``/``proj_attn``) and converts MONAI core's keys on load.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets.autoencoderkl import AEKLResBlock as ResBlock

__all__ = [
    "AttentionBlock",
    "Downsample",
    "Factor",
    "OutputUpsample",
    "ResBlock",
    "Upsample",
    "input_conv",
    "normalize_factor",
    "normalize_factors",
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
    upsamples to full resolution and then convolves. That is how it is defined; it runs without the full-resolution
    tensor of ``in_channels`` channels (4 GiB in fp32 for 32 channels at 512x512x128): per axis, output voxel
    ``q f + r`` sees the upsampled voxels ``q f + r - 1 .. q f + r + 1``, which come from low-resolution voxels
    ``q - 1 .. q + 1`` only, so each of the ``prod(f)`` phases ``r`` is a kernel-3 convolution of the low-resolution
    input whose taps are sums of the original taps (:func:`subpixel_weight`), and a pixel shuffle interleaves the
    phases. Same weights, same result up to float rounding, for training and inference alike; the largest tensor is
    the output. On an axis with factor 1 both are a kernel-3, padding-1 (transposed) convolution.

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_convtranspose or all(s == 1 for s in self.scale_factor):
            return self.conv(x)
        return subpixel_conv(x, self.conv.conv, self.scale_factor)


def subpixel_weight(weight: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
    """The kernel-3 weight of "nearest-neighbour upsampling by ``factor``, then ``weight``'s kernel-3, padding-1
    convolution" rewritten as one kernel-3 convolution at the low resolution with ``out_channels * prod(factor)``
    outputs (phase-major within each output channel: ``o * prod(factor) + r_1 * f_2 * f_3 + r_2 * f_3 + r_3``).

    Per axis, tap ``t`` (offset ``t - 1``) of phase ``r`` reads the upsampled voxel at offset ``r + t - 1`` from the
    phase's block start, which is low-resolution offset ``floor((r + t - 1) / f)`` in ``{-1, 0, 1}``; the new tap
    at that offset is the sum of the original taps that land on it.
    """
    dims = weight.dim() - 2
    if weight.shape[2:] != (3,) * dims:
        raise ValueError(f"subpixel_weight needs a kernel-3 convolution, got kernel {tuple(weight.shape[2:])}.")
    maps = []
    for f in factor:
        m = weight.new_zeros(f, 3, 3)  # (phase, new tap, old tap)
        for r in range(f):
            for t in range(3):
                m[r, (r + t - 1) // f + 1, t] = 1.0
        maps.append(m)
    old, phase, new = "tuv"[:dims], "abc"[:dims], "xyz"[:dims]
    spec = f"oi{old}," + ",".join(f"{phase[a]}{new[a]}{old[a]}" for a in range(dims)) + f"->o{phase}i{new}"
    w = torch.einsum(spec, weight, *maps)  # (out, r_1 .. r_d, in, k_1 .. k_d)
    return w.reshape(weight.shape[0] * math.prod(factor), *weight.shape[1:])


def subpixel_conv(x: torch.Tensor, conv: nn.Module, factor: Sequence[int]) -> torch.Tensor:
    """``conv(nearest_upsample(x, factor))`` for a kernel-3, stride-1, padding-1 ``conv`` (``nn.Conv1d/2d/3d``),
    computed at ``x``'s resolution (:func:`subpixel_weight`) and pixel-shuffled: no tensor larger than the output."""
    dims = x.dim() - 2
    with torch.autocast(device_type=x.device.type, enabled=False):
        exact = torch.promote_types(conv.weight.dtype, torch.float32)  # sums of taps in at least fp32
        weight = subpixel_weight(conv.weight.to(exact), factor).to(conv.weight.dtype)
    bias = None if conv.bias is None else conv.bias.repeat_interleave(math.prod(factor))
    y = (F.conv1d, F.conv2d, F.conv3d)[dims - 1](x, weight, bias, padding=1)
    b, spatial = y.shape[0], y.shape[2:]
    y = y.reshape(b, conv.out_channels, *factor, *spatial)
    # (b, o, r_1 .. r_d, n_1 .. n_d) -> (b, o, n_1, r_1, .., n_d, r_d)
    order = [0, 1] + [i for axis in range(dims) for i in (2 + dims + axis, 2 + axis)]
    return y.permute(order).reshape(b, conv.out_channels, *(n * f for n, f in zip(spatial, factor)))


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with the parameter layout of monai-generative 0.2.3.

    0.2.3 creates an output projection (``proj_attn``) but never applies it; ``include_fc=False`` (default) keeps
    that behaviour, ``include_fc=True`` applies it as MONAI core's ``SpatialAttentionBlock`` does.

    The explicit attention (``use_flash_attention=False``) multiplies ``q`` by ``1 / sqrt(head channels)`` before
    ``q @ k^T``, so that fp16 scores overflow only where the scaled scores themselves exceed fp16's range (0.2.3
    scaled the product, which overflows first); in fp32 the result is 0.2.3's up to float rounding.

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
            # scale q before the product, not the scores after it: in fp16 (autocast or a half model) q @ k^T
            # overflows to inf (then NaN after softmax) at wide attention long before the scaled scores do, e.g.
            # at 512 channels once |q . k| > 65504 although the scores are 22.6x smaller; in fp32 the two orders
            # differ by rounding only. It also skips one N x N temporary.
            weights = torch.matmul(q * self.scale, k.transpose(-1, -2))
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
