# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""Exact tiled execution of the AutoencoderKL encoder and decoder with bounded memory (inference only).

The encoder and decoder are a chain of blocks. Each block's output is either *whole* (held as one tensor, computed
exactly as in the untiled pass) or *streamed* (never held; any box of it is computed on demand from boxes of its
input). A block output is whole when it has at most ``whole_voxels`` voxels per sample (the small, low-resolution
levels), when it feeds an attention block, and at the end (the returned tensor); everything else is streamed.

Why the result is exact:

* A streamed convolution computes a box of its output from the box of its input that its kernel reaches (the halo),
  with zeros where that box leaves the volume, which is the convolution's own zero padding. Nearest-neighbour
  upsampling, strided downsampling (including the patchify input convolution of ``initial_downsample_factor``) and
  transposed convolutions (including the decoder's sub-pixel output convolution) map boxes the same way. Average
  pooling (``use_conv_downsample=False``) needs no halo: an output box reads exactly the input box it averages.
* A streamed GroupNorm is applied box by box with statistics of the whole volume. They are gathered once, when the
  node is built, by computing its input tile by tile: per-tile mean and variance merged in float64 with Chan's
  pooled formula. Every later GroupNorm therefore recomputes the streamed layers before it (compute is traded for
  memory: with ``k`` GroupNorms in the streamed levels, the streamed convolutions run about ``k / 2 + 1`` times).
* Attention runs on the whole tensor of its level.

Peak memory is set by the whole (low-resolution) levels, the returned tensor, and the streamed activations of one
tile with its halo, not by the full-resolution activations.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .autoencoder_blocks import AttentionBlock, Downsample, ResBlock, Upsample

__all__ = ["run_tiled"]

Box = tuple[tuple[int, int], ...]  # per spatial axis: [start, stop)


class _Context:
    """What all nodes of one tiled pass share: the per-node tile shape and a one-tile memo for shared inputs."""

    def __init__(self, tile: Sequence[int], image_shape: Sequence[int], whole_voxels: int, bar=None) -> None:
        self.tile = tuple(tile)
        self.image_shape = tuple(image_shape)
        self.whole_voxels = whole_voxels
        self.memo: dict[int, tuple[Box, torch.Tensor]] = {}
        self.bar = bar  # a tqdm bar counting tile passes (its total grows as passes are discovered), or None

    def passes(self, shape: Sequence[int], what: str):
        """:meth:`tiles` for one pass over a streamed level (GroupNorm statistics, or materialising it), counted
        on the progress bar when there is one."""
        boxes = list(self.tiles(shape))
        if self.bar is not None:
            self.bar.total = (self.bar.total or 0) + len(boxes)
            self.bar.set_postfix_str(f"{what} {'x'.join(map(str, shape))}", refresh=False)
            self.bar.refresh()
        for box in boxes:
            yield box
            if self.bar is not None:
                self.bar.update(1)

    def tile_for(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Tile of a node with spatial ``shape``: the image tile scaled to that node's resolution."""
        return tuple(max(1, math.ceil(t * n / m)) for t, n, m in zip(self.tile, shape, self.image_shape))

    def tiles(self, shape: Sequence[int]):
        """Non-overlapping boxes that cover ``shape``, the last one on each axis cut at the border."""
        tile = self.tile_for(shape)
        starts = [range(0, n, t) for n, t in zip(shape, tile)]
        for corner in itertools.product(*starts):
            yield tuple((s, min(s + t, n)) for s, t, n in zip(corner, tile, shape))


def _crop(x: torch.Tensor, box: Box, origin: Sequence[int] | None = None) -> torch.Tensor:
    origin = origin or (0,) * len(box)
    return x[(..., *(slice(a - o, b - o) for (a, b), o in zip(box, origin)))]


def _contains(outer: Box, inner: Box) -> bool:
    return all(a <= c and d <= b for (a, b), (c, d) in zip(outer, inner))


class _Node:
    """A block output: ``shape`` is its spatial size; ``get(box)`` returns B x C x box."""

    shape: tuple[int, ...]

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        self.shared = False  # read by more than one consumer within a tile: memoise its last box

    def compute(self, box: Box) -> torch.Tensor:
        raise NotImplementedError

    def get(self, box: Box) -> torch.Tensor:
        if not self.shared:
            return self.compute(box)
        hit = self.ctx.memo.get(id(self))
        if hit is not None and _contains(hit[0], box):
            return _crop(hit[1], box, [a for a, _ in hit[0]])
        out = self.compute(box)
        self.ctx.memo[id(self)] = (box, out)
        return out


class _Whole(_Node):
    def __init__(self, ctx: _Context, tensor: torch.Tensor) -> None:
        super().__init__(ctx)
        self.tensor = tensor
        self.shape = tuple(tensor.shape[2:])

    def compute(self, box: Box) -> torch.Tensor:
        return _crop(self.tensor, box)


def _materialize(node: _Node) -> _Whole:
    """Compute a streamed node tile by tile into one tensor (the node and what it streams from can then be freed)."""
    if isinstance(node, _Whole):
        return node
    ctx, out = node.ctx, None
    for box in ctx.passes(node.shape, "output"):
        ctx.memo.clear()
        part = node.get(box)
        if out is None:
            out = part.new_empty((*part.shape[:2], *node.shape))
        _crop(out, box).copy_(part)
    ctx.memo.clear()
    assert out is not None
    return _Whole(ctx, out)


class _GroupNorm(_Node):
    """GroupNorm (+ optional SiLU) with whole-volume statistics, gathered tile by tile when the node is built."""

    def __init__(self, ctx: _Context, inp: _Node, norm: nn.GroupNorm, silu: bool) -> None:
        super().__init__(ctx)
        self.inp, self.silu, self.shape = inp, silu, inp.shape
        groups = norm.num_groups
        count, mean, m2 = 0, None, None
        for box in ctx.passes(inp.shape, "GroupNorm statistics"):
            ctx.memo.clear()
            x = inp.get(box)
            n = x[0].numel() // groups
            # statistics in fp32 at least, as autocast runs GroupNorm (tiles may be bf16 / fp16 under autocast)
            flat = x.reshape(x.shape[0], groups, -1)
            flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
            var_t, mean_t = torch.var_mean(flat, dim=-1, correction=0)
            mean_t, m2_t = mean_t.double(), var_t.double() * n
            if mean is None:
                count, mean, m2 = n, mean_t, m2_t
            else:  # Chan et al.'s pooled merge
                delta = mean_t - mean
                total = count + n
                mean = mean + delta * (n / total)
                m2 = m2 + m2_t + delta * delta * (count * n / total)
                count = total
        ctx.memo.clear()
        assert mean is not None and m2 is not None
        rstd = torch.rsqrt(m2 / count + norm.eps)  # B x G
        per_group = norm.num_channels // groups
        rstd_c = rstd.repeat_interleave(per_group, dim=1)
        mean_c = mean.repeat_interleave(per_group, dim=1)
        weight = norm.weight.double() if norm.weight is not None else torch.ones_like(rstd_c[0])
        bias = norm.bias.double() if norm.bias is not None else torch.zeros_like(rstd_c[0])
        scale = rstd_c * weight
        view = (*scale.shape, *(1,) * len(self.shape))
        self.scale = scale.reshape(view)
        self.shift = (bias - mean_c * scale).reshape(view)

    def compute(self, box: Box) -> torch.Tensor:
        x = self.inp.get(box)
        y = torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))
        return F.silu(y, inplace=True) if self.silu else y


# polyphase upsampling convolutions pay off (fewer taps) only on tiles with this many low-resolution voxels or more;
# below it, per-call overhead dominates and the input is upsampled before the convolution
POLYPHASE_MIN_VOXELS = 4096


def _nearest(x: torch.Tensor, up: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour upsampling by integer factors (one copy)."""
    b, c, *sizes = x.shape
    view = [b, c, *itertools.chain(*((n, 1) for n in sizes))]
    expanded = [b, c, *itertools.chain(*((n, u) for n, u in zip(sizes, up)))]
    return x.reshape(view).expand(expanded).reshape(b, c, *(n * u for n, u in zip(sizes, up)))


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _Conv(_Node):
    """A convolution, optionally reading its input through integer nearest-neighbour upsampling and adding a
    residual ``shortcut(residual)``. ``pad`` lists the (before, after) zero padding of each axis."""

    def __init__(
        self,
        ctx: _Context,
        inp: _Node,
        conv: nn.Module,
        pad: Sequence[tuple[int, int]],
        up: Sequence[int] | None = None,
        residual: tuple[_Node, nn.Module] | None = None,
    ) -> None:
        super().__init__(ctx)
        if conv.dilation != (1,) * len(pad) or conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"tiled execution supports plain convolutions only, got {conv!r}.")
        self.inp, self.conv, self.pad, self.residual = inp, conv, tuple(pad), residual
        self.up = tuple(up) if up is not None else (1,) * len(pad)
        if any(u > 1 for u in self.up) and any(st != 1 for st in conv.stride):
            raise ValueError(f"tiled execution: upsampling before a strided convolution is not supported ({conv!r}).")
        self._phase_weights: dict[tuple[int, ...], torch.Tensor] = {}
        self.in_shape = tuple(n * u for n, u in zip(inp.shape, self.up))
        self.shape = tuple(
            (n + b + a - k) // s + 1
            for n, (b, a), k, s in zip(self.in_shape, self.pad, conv.kernel_size, conv.stride)
        )

    def _read(self, box: Box) -> torch.Tensor:
        """The conv input over ``box`` (which may reach past the volume: zeros there), without upsampling."""
        inside = tuple((max(0, a), min(n, b)) for (a, b), n in zip(box, self.inp.shape))
        x = self.inp.get(inside)
        pads: list[int] = []
        for (a, b), (ia, ib) in reversed(list(zip(box, inside))):
            pads += [ia - a, b - ib]
        return F.pad(x, pads) if any(pads) else x

    def compute(self, box: Box) -> torch.Tensor:
        low_res_voxels = math.prod(-(-(b - a) // u) for (a, b), u in zip(box, self.up))
        if any(u > 1 for u in self.up) and low_res_voxels >= POLYPHASE_MIN_VOXELS:
            y = self._polyphase(box)
        else:
            y = self._direct(box)
        if self.residual is not None:
            node, shortcut = self.residual
            y += shortcut(node.get(box))
        return y

    def _direct(self, box: Box) -> torch.Tensor:
        k, s = self.conv.kernel_size, self.conv.stride
        need = tuple((lo * st - b, (hi - 1) * st - b + kk) for (lo, hi), st, (b, _), kk in zip(box, s, self.pad, k))
        if all(u == 1 for u in self.up):
            x = self._read(need)
        else:  # zeros outside the volume stay zeros after nearest upsampling: read low-res, then upsample
            src = tuple((a // u, -(-b // u)) for (a, b), u in zip(need, self.up))
            x = _crop(_nearest(self._read(src), self.up), need, [a * u for (a, _), u in zip(src, self.up)])
        return _CONV[len(box)](x, self.conv.weight, self.conv.bias, stride=s)

    def _polyphase(self, box: Box) -> torch.Tensor:
        """Nearest-neighbour upsampling by ``u`` followed by a stride-1 convolution, computed at low resolution.

        Output ``o = q * u + r`` reads upsampled inputs ``o - p + j`` (``j < k``), i.e. low-resolution inputs
        ``q + (r - p + j) // u``: for each phase ``r`` the kernel taps that hit the same low-resolution voxel are
        summed, giving a smaller kernel over the low-resolution input (1.5 taps per axis instead of 3 for u = 4).
        Zero padding of the upsampled input is zero padding of the low-resolution one, so this is exact.
        """
        k, dims = self.conv.kernel_size, len(box)
        q_box = tuple((lo // u, -(-hi // u)) for (lo, hi), u in zip(box, self.up))
        # per axis and phase: low-resolution offset of each tap
        offsets = [
            [[(r - p + j) // u for j in range(kk)] for r in range(u)] for u, (p, _), kk in zip(self.up, self.pad, k)
        ]
        lo_off = [min(o[0] for o in axis) for axis in offsets]
        hi_off = [max(o[-1] for o in axis) for axis in offsets]
        src_box = tuple((a + lo, b - 1 + hi + 1) for (a, b), lo, hi in zip(q_box, lo_off, hi_off))
        x = self._read(src_box)
        q_len = [b - a for a, b in q_box]
        out = x.new_empty((x.shape[0], self.conv.weight.shape[0], *itertools.chain(*zip(q_len, self.up))))
        for phase in itertools.product(*(range(u) for u in self.up)):
            w = self._phase_weight(phase, offsets)
            starts = [offsets[axis][r][0] - lo_off[axis] for axis, r in enumerate(phase)]
            view = x[(..., *(slice(st, st + n + w.shape[2 + i] - 1) for i, (st, n) in enumerate(zip(starts, q_len))))]
            out[(slice(None), slice(None), *itertools.chain(*((slice(None), r) for r in phase)))] = _CONV[dims](
                view, w, self.conv.bias
            )
        out = out.reshape(*out.shape[:2], *(n * u for n, u in zip(q_len, self.up)))
        return _crop(out, box, [a * u for (a, _), u in zip(q_box, self.up)])

    def _phase_weight(self, phase: Sequence[int], offsets: list[list[list[int]]]) -> torch.Tensor:
        """The kernel of one phase: taps reading the same low-resolution offset summed (cached per phase)."""
        key = tuple(phase)
        if key not in self._phase_weights:
            w = self.conv.weight
            for axis, r in enumerate(phase):
                taps = offsets[axis][r]
                parts = []
                for d in range(taps[0], taps[-1] + 1):  # taps are sorted: those hitting offset d are contiguous
                    idx = [j for j, t in enumerate(taps) if t == d]
                    parts.append(w.narrow(2 + axis, idx[0], len(idx)).sum(dim=2 + axis, keepdim=True))
                w = torch.cat(parts, dim=2 + axis)
            self._phase_weights[key] = w
        return self._phase_weights[key]


_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


class _AvgPool(_Node):
    """Average pooling with kernel = stride (``Downsample`` with ``use_conv=False``): no halo, no padding."""

    def __init__(self, ctx: _Context, inp: _Node, stride: Sequence[int]) -> None:
        super().__init__(ctx)
        if any(n % s for n, s in zip(inp.shape, stride)):
            raise ValueError(f"tiled average pooling: size {inp.shape} is not divisible by the stride {tuple(stride)}.")
        self.inp, self.stride = inp, tuple(stride)
        self.shape = tuple(n // s for n, s in zip(inp.shape, stride))

    def compute(self, box: Box) -> torch.Tensor:
        x = self.inp.get(tuple((a * s, b * s) for (a, b), s in zip(box, self.stride)))
        return _AVG_POOL[len(box)](x, kernel_size=self.stride, stride=self.stride)


class _ConvTranspose(_Node):
    """A transposed convolution (the decoder's ``use_convtranspose`` upsampling)."""

    def __init__(self, ctx: _Context, inp: _Node, conv: nn.Module) -> None:
        super().__init__(ctx)
        if conv.dilation != (1,) * len(inp.shape) or conv.groups != 1:
            raise ValueError(f"tiled execution supports plain transposed convolutions only, got {conv!r}.")
        self.inp, self.conv = inp, conv
        self.shape = tuple(
            (n - 1) * s - 2 * p + k + op
            for n, s, p, k, op in zip(inp.shape, conv.stride, conv.padding, conv.kernel_size, conv.output_padding)
        )

    def compute(self, box: Box) -> torch.Tensor:
        s, p, k = self.conv.stride, self.conv.padding, self.conv.kernel_size
        # output o receives input i when 0 <= o + p - i * s < k
        src = tuple(
            (max(0, -(-(lo + pp - kk + 1) // st)), min(n, (hi - 1 + pp) // st + 1))
            for (lo, hi), st, pp, kk, n in zip(box, s, p, k, self.inp.shape)
        )
        y = _CONV_T[len(box)](self.inp.get(src), self.conv.weight, self.conv.bias, stride=s)
        # local index t of y is output o = a * s + t - p
        local = tuple((lo + pp - a * st, hi + pp - a * st) for (lo, hi), (a, _), st, pp in zip(box, src, s, p))
        if any(b > n for (_, b), n in zip(local, y.shape[2:])):  # cannot happen for padding <= kernel - stride
            raise RuntimeError(f"transposed convolution tile {box} reaches past its computed extent {local}.")
        return _crop(y, local)


def _inner_conv(block: nn.Module) -> nn.Module:
    """The torch conv layer of a MONAI ``Convolution`` (conv_only) or the layer itself."""
    return block.conv if hasattr(block, "conv") and isinstance(block.conv, nn.Module) else block


def _symmetric(conv: nn.Module) -> list[tuple[int, int]]:
    return [(p, p) for p in conv.padding]


def _add_block(ctx: _Context, block: nn.Module, inp: _Node) -> _Node:
    """The node of ``block``'s output given its input node."""
    if isinstance(block, AttentionBlock):
        return _Whole(ctx, block(_materialize(inp).tensor))
    out_voxels = math.prod(inp.shape) * (math.prod(block.scale_factor) if isinstance(block, Upsample) else 1)
    if isinstance(inp, _Whole) and max(math.prod(inp.shape), out_voxels) <= ctx.whole_voxels:
        return _Whole(ctx, block(inp.tensor))  # a small level: run the block as is, exactly as untiled
    if isinstance(block, ResBlock):
        inp.shared = True
        h = _Conv(ctx, _GroupNorm(ctx, inp, block.norm1, silu=True), block.conv1.conv, _symmetric(block.conv1.conv))
        h = _GroupNorm(ctx, h, block.norm2, silu=True)
        out = _Conv(ctx, h, block.conv2.conv, _symmetric(block.conv2.conv), residual=(inp, block.nin_shortcut))
    elif isinstance(block, Downsample) and not block.use_conv:
        out = _AvgPool(ctx, inp, block.stride)
    elif isinstance(block, Downsample):
        conv = block.conv.conv
        pads = list(zip(block.pad[0::2], block.pad[1::2]))[::-1]  # F.pad order is last axis first
        out = _Conv(ctx, inp, conv, pads)
    elif isinstance(block, Upsample):
        conv = block.conv.conv
        if block.use_convtranspose:
            out = _ConvTranspose(ctx, inp, conv)
        else:
            out = _Conv(ctx, inp, conv, _symmetric(conv), up=block.scale_factor)
    elif isinstance(block, nn.GroupNorm):
        out = _GroupNorm(ctx, inp, block, silu=False)
    elif isinstance(_inner_conv(block), (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        conv = _inner_conv(block)
        out = _Conv(ctx, inp, conv, _symmetric(conv))
    else:  # anything else: run it whole (exact, not memory-bounded)
        return _Whole(ctx, block(_materialize(inp).tensor))
    if math.prod(out.shape) <= ctx.whole_voxels:
        return _materialize(out)
    return out


def run_tiled(
    blocks: Sequence[nn.Module],
    x: torch.Tensor,
    tile: Sequence[int],
    image_shape: Sequence[int],
    whole_voxels: int,
    progress: bool | str = False,
) -> torch.Tensor:
    """Run a chain of encoder/decoder ``blocks`` on ``x`` exactly, streaming the levels larger than ``whole_voxels``.

    Args:
        blocks: the ``blocks`` of an ``Encoder`` or ``Decoder``, applied in order.
        x: B x C x *spatial input, held whole.
        tile: tile size in image voxels, one per spatial axis; each node works in tiles of this size scaled to its
            own resolution.
        image_shape: spatial size of the image (the encoder's input or the decoder's output).
        whole_voxels: block outputs with at most this many voxels per sample are held whole.
        progress: show a tqdm progress bar of the tile passes (when tqdm is installed); a string is its label.

    Returns:
        the output of the last block, whole.
    """
    bar = None
    if progress:
        from monai.utils import optional_import

        tqdm, has_tqdm = optional_import("tqdm", name="tqdm")
        if has_tqdm:
            bar = tqdm(total=0, desc=progress if isinstance(progress, str) else "tiled pass", unit="tile", leave=False)
    ctx = _Context(tile, image_shape, whole_voxels, bar)
    try:
        node: _Node = _Whole(ctx, x)
        for block in blocks:
            node = _add_block(ctx, block, node)
        return _materialize(node).tensor
    finally:
        if bar is not None:
            bar.close()
