"""The arithmetic of sizes: resampling factors, total factor, latent shape, per-level resolutions, VQ-VAE strides,
tile rules and the nearest valid sizes. The one home of these rules in the application.

Ground floor: this module imports nothing of the application. Its functions take plain values (ints, tuples, lists
as the settings hold them); settings validation, the networks' builders, stage 1's warnings and ``plan`` call them.
The fork's ``normalize_factors`` / ``normalize_factor`` / ``total_factor`` stay the network's own API: the
expansion of factors to one int per axis is theirs, and this module calls them.

Conventions: a *factor* is an int (every axis) or one int per spatial axis; *per-level factors* are one factor per
resampling level, expanded to one tuple per level with one int per axis; a *total factor* is one int per axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

from generative.networks.nets.autoencoderkl import normalize_factor, normalize_factors, total_factor

__all__ = [
    "Factor",
    "per_axis",
    "per_level_factors",
    "product_per_axis",
    "kl_total_factor",
    "vq_parameters",
    "vq_total_factor",
    "indivisible_axes",
    "divided",
    "rounded_up",
    "latent_shape",
    "level_resolutions",
    "nearest_multiples",
    "nearest_multiple",
    "two_adic",
    "unet_levels_that_fit",
    "decode_tile",
]

Factor = Union[int, Sequence[int]]

# the VQ-VAE's parameters when the settings leave them out: [stride, kernel, dilation, padding(, output_padding)]
VQ_DOWN_DEFAULT = (2, 4, 1, 1)
VQ_UP_DEFAULT = (2, 4, 1, 1, 0)


def per_axis(factor: Factor, spatial_dims: int, name: str = "factor") -> tuple[int, ...]:
    """One factor as one int per axis (``2`` -> ``(2, 2, 2)``); the fork's ``normalize_factor``.

    Raises:
        ValueError: a factor that is not a positive int or ``spatial_dims`` positive ints (named ``name``).
    """
    return normalize_factor(factor, spatial_dims, name)


def per_level_factors(factors: Optional[Sequence[Factor]], levels: int, spatial_dims: int,
                      name: str = "downsample_factors") -> list[tuple[int, ...]]:
    """Per-level factors as one tuple per level with one int per axis; ``None`` = 2 on every axis of every level
    (the legacy autoencoder). The fork's ``normalize_factors``.

    Raises:
        ValueError: not ``levels`` entries, or an entry that is not an int or ``spatial_dims`` ints.
    """
    return [tuple(level) for level in normalize_factors(factors, levels, spatial_dims, name)]


def product_per_axis(factors: Sequence[Sequence[int]], spatial_dims: int) -> tuple[int, ...]:
    """The product over levels of expanded factors, per axis (no levels: 1 on every axis)."""
    return tuple(total_factor(factors)) if len(factors) else (1,) * spatial_dims


def kl_total_factor(initial: Factor, factors: Optional[Sequence[Factor]], levels: int,
                    spatial_dims: int) -> tuple[int, ...]:
    """Total downsample factor per axis of the KL autoencoder: ``initial`` (its patchify step) times the product of
    the per-level ``factors`` (None = 2 per level) over its ``levels`` resampling levels."""
    return product_per_axis([per_axis(initial, spatial_dims, "initial_downsample_factor"),
                             *per_level_factors(factors, levels, spatial_dims)], spatial_dims)


def vq_parameters(levels: int, downsample: Optional[Sequence[Sequence[int]]],
                  upsample: Optional[Sequence[Sequence[int]]]) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """The VQ-VAE's downsample and upsample parameters, one tuple per level, with MONAI's defaults
    (``[2, 4, 1, 1]`` and ``[2, 4, 1, 1, 0]`` at every one of ``levels``) where they are None."""
    down = [VQ_DOWN_DEFAULT] * levels if downsample is None else [tuple(p) for p in downsample]
    up = [VQ_UP_DEFAULT] * levels if upsample is None else [tuple(p) for p in upsample]
    return down, up


def vq_total_factor(parameters: Sequence[Sequence[int]], spatial_dims: int) -> tuple[int, ...]:
    """Total factor of a VQ-VAE encoder or decoder: the product of the strides (first entries) of its
    ``[stride, kernel, ...]`` parameters, the same on every axis."""
    return (math.prod(int(p[0]) for p in parameters),) * spatial_dims


def indivisible_axes(sizes: Sequence[int], factor: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(axis, size, factor)`` for every axis whose size the factor does not divide."""
    return [(axis, int(n), int(f)) for axis, (n, f) in enumerate(zip(sizes, factor)) if n % f]


def divided(sizes: Sequence[int], factor: Sequence[int]) -> list[int]:
    """``sizes`` divided by ``factor`` per axis, rounded down (as a resampling layer does with a size its factor does
    not divide)."""
    return [int(n) // int(f) for n, f in zip(sizes, factor)]


def rounded_up(sizes: Sequence[int], factor: Sequence[int]) -> list[int]:
    """Each size rounded up to the next multiple of its axis's factor (the padded size a network can take)."""
    return [-(-int(n) // int(f)) * int(f) for n, f in zip(sizes, factor)]


def latent_shape(sizes: Sequence[int], factor: Sequence[int]) -> tuple[int, ...]:
    """The spatial size of the latent of ``sizes`` voxels under a total ``factor`` per axis.

    Raises:
        ValueError: a different number of sizes and factors, or a size the factor of its axis does not divide.
    """
    if len(sizes) != len(factor):
        raise ValueError(f"expected {len(factor)} spatial sizes, got {list(sizes)}")
    bad = indivisible_axes(sizes, factor)
    if bad:
        raise ValueError("; ".join(f"axis {a}: {n} is not divisible by {f}" for a, n, f in bad))
    return tuple(divided(sizes, factor))


def level_resolutions(sizes: Sequence[int], initial: Sequence[int],
                      factors: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """The spatial size an encoder works at on each of its levels (``len(factors) + 1`` entries): ``sizes`` after
    the ``initial`` (patchify) factor, then divided by each level's factor in turn. Floor division, as the
    resampling layers do for a size a factor does not divide."""
    out = [tuple(divided(sizes, initial))]
    for level in factors:
        out.append(tuple(divided(out[-1], level)))
    return out


def nearest_multiples(size: int, factor: int) -> list[int]:
    """The multiples of ``factor`` around ``size`` (below and above; only above when below would be 0)."""
    lo, hi = (size // factor) * factor, (size // factor + 1) * factor
    return [hi] if lo < 1 else [lo, hi]


def nearest_multiple(size: int, factor: int) -> int:
    """The multiple of ``factor`` closest to ``size`` (the lower one on a tie; at least ``factor``)."""
    lo, hi = (size // factor) * factor, (size // factor + 1) * factor
    return lo if lo >= 1 and size - lo <= hi - size else hi


def two_adic(n: int) -> int:
    """Largest k with 2**k dividing n (n > 0)."""
    k = 0
    while n > 0 and n % 2 == 0:
        n //= 2
        k += 1
    return k


def unet_levels_that_fit(latent: Sequence[int]) -> int:
    """How many levels a diffusion UNet (which halves its input once per level after the first) can have on a latent
    of this spatial size: one more than the number of halvings every axis allows."""
    return 1 + min(two_adic(int(n)) for n in latent)


def decode_tile(sampling_tile: Optional[Sequence[int]], autoencoder_tile: Optional[Sequence[int]],
                pixel: bool = False) -> tuple[Optional[tuple[int, ...]], str]:
    """The exact tile sampling decodes in and the key that sets it: ``sampling.tile_size``, else
    ``autoencoder.tile_size`` (which a pixel-space model, ``pixel``, has no decoder for); ``(None, key)`` = whole
    volumes."""
    if sampling_tile is not None:
        return tuple(sampling_tile), "sampling.tile_size"
    if not pixel and autoencoder_tile is not None:
        return tuple(autoencoder_tile), "autoencoder.tile_size"
    return None, "sampling.tile_size"
