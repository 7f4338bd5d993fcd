"""Cross-field checks of typed settings, and the values they derive (total downsample factor, latent channels, the
decode tile), found before any data is read or any network is built:

* list lengths that do not match ``spatial_dims`` / the number of levels,
* a ``data.voxel_size`` (or tile, or window) the autoencoder cannot divide (with the nearest valid sizes),
* a diffusion UNet that does not fit the autoencoder's latent (:func:`unet_fit_problems`, with the ``--set`` lines
  that fix it), scheduler and sampler pairs, conditioning, losses,
* missing or conflicting data sources and (with ``check_paths``) folders/files that do not exist.

All problems found in one pass are reported together, as one :class:`ConfigError`. The arithmetic of sizes is
:mod:`monai_diffusion.geometry`'s; this module words what it finds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .. import geometry
from ..errors import ConfigError
from .messages import key_path, num, set_value, short
from .schema import (
    SAMPLERS,
    AutoencoderSettings,
    DataSettings,
    DiffusionSettings,
    Settings,
    VQVAESettings,
    synthetic_params,
)
from .synthetic_kinds import make_params

__all__ = [
    "validate",
    "check_data_section",
    "unet_fit_problems",
    "total_downsample_factor",
    "initial_downsample_factor",
    "vq_sampling_parameters",
    "sampling_tile",
    "latent_channels_of",
    "latent_channels_key",
]


# --------------------------------------------------------------------------------------------------------------------
# what validated settings say about sizes and channels
# --------------------------------------------------------------------------------------------------------------------


def initial_downsample_factor(autoencoder: AutoencoderSettings) -> tuple[int, ...]:
    """``autoencoder.initial_downsample_factor`` as one int per axis. Assumes validated settings."""
    return geometry.per_axis(autoencoder.initial_downsample_factor, autoencoder.spatial_dims,
                             "initial_downsample_factor")


def vq_sampling_parameters(vq: VQVAESettings) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """The VQ-VAE's downsample and upsample parameters, one tuple per level (the defaults filled in)."""
    return geometry.vq_parameters(len(vq.num_channels), vq.downsample_parameters, vq.upsample_parameters)


def total_downsample_factor(autoencoder: AutoencoderSettings) -> tuple[int, ...]:
    """Total downsample factor of the autoencoder per spatial axis: initial_downsample_factor times the product of
    downsample_factors (None = 2 per level, with len(num_channels) - 1 levels); for a VQ-VAE the product of its
    downsampling strides. Assumes validated settings."""
    if autoencoder.type == "vq":
        return geometry.vq_total_factor(vq_sampling_parameters(autoencoder.vqvae)[0], autoencoder.spatial_dims)
    return geometry.kl_total_factor(autoencoder.initial_downsample_factor, autoencoder.downsample_factors,
                                    len(autoencoder.num_channels) - 1, autoencoder.spatial_dims)


def sampling_tile(s: Settings, pixel: bool = False) -> tuple[Optional[tuple[int, ...]], str]:
    """The exact tile sampling decodes in and the key that sets it: ``sampling.tile_size``, else
    ``autoencoder.tile_size`` (which a pixel-space model, ``pixel``, has no decoder for); ``(None, key)`` = whole
    volumes (:func:`monai_diffusion.geometry.decode_tile`)."""
    return geometry.decode_tile(s.sampling.tile_size, s.autoencoder.tile_size, pixel)


def latent_channels_of(autoencoder: AutoencoderSettings) -> int:
    """Channels of the stage-1 latent: ``latent_channels`` (kl) or ``vqvae.embedding_dim`` (vq)."""
    return autoencoder.vqvae.embedding_dim if autoencoder.type == "vq" else autoencoder.latent_channels


def latent_channels_key(autoencoder: AutoencoderSettings) -> str:
    """The key (under ``autoencoder.``) that sets the latent channels: ``latent_channels`` or
    ``vqvae.embedding_dim``."""
    return "vqvae.embedding_dim" if autoencoder.type == "vq" else "latent_channels"


# --------------------------------------------------------------------------------------------------------------------
# cross-field checks
# --------------------------------------------------------------------------------------------------------------------


def _level_factors(
    factors: Optional[Sequence[Any]], levels: int, spatial_dims: int, key: str, problems: list[tuple[str, str]]
) -> Optional[list[tuple[int, ...]]]:
    """Per-level factors expanded to one tuple per level (:func:`geometry.per_level_factors`) once their shape is
    right; each shape problem is reported under ``key``; None when they cannot be expanded."""
    if factors is None:
        return geometry.per_level_factors(None, levels, spatial_dims)
    ok = True
    if len(factors) != levels:
        problems.append(
            (key, f"expected len(num_channels) - 1 = {levels} entries (one per resampling level), "
                  f"got {len(factors)}: {short(factors)}")
        )
        ok = False
    for i, f in enumerate(factors):
        if not isinstance(f, int) and len(f) != spatial_dims:
            problems.append(
                (key_path(key, i), f"expected an integer or a list of spatial_dims = {spatial_dims} integers "
                                   f"(one per axis), got {len(f)}: {short(f)}")
            )
            ok = False
    return geometry.per_level_factors(factors, levels, spatial_dims, key) if ok else None


def _check_unet_lists(
    prefix: str, num_channels: Sequence[int], attention_levels: Sequence[bool], num_res_blocks: Any,
    norm_num_groups: int, problems: list[tuple[str, str]],
) -> None:
    levels = len(num_channels)
    if levels == 0:
        problems.append((f"{prefix}.num_channels", "expected at least one level, got an empty list"))
        return
    if len(attention_levels) != levels:
        problems.append(
            (f"{prefix}.attention_levels", f"expected one entry per level of num_channels ({levels}), "
                                           f"got {len(attention_levels)}: {short(attention_levels)}")
        )
    if isinstance(num_res_blocks, tuple) and len(num_res_blocks) != levels:
        problems.append(
            (f"{prefix}.num_res_blocks", f"expected an integer or one entry per level of num_channels ({levels}), "
                                         f"got {len(num_res_blocks)}: {short(num_res_blocks)}")
        )
    bad = [c for c in num_channels if c % norm_num_groups]
    if bad:
        # the largest group count <= the requested one that divides every level's channels
        fit = max(g for g in range(1, norm_num_groups + 1) if all(c % g == 0 for c in num_channels))
        problems.append(
            (f"{prefix}.num_channels", f"every entry must be divisible by {prefix}.norm_num_groups "
                                       f"({norm_num_groups}); {short(bad)} are not: "
                                       f"--set {prefix}.norm_num_groups={fit} (or change the channels)")
        )


def _check_autoencoder(s: Settings, problems: list[tuple[str, str]]) -> Optional[tuple[int, ...]]:
    """Autoencoder checks; returns the total downsample factor per axis when it is well defined."""
    ae = s.autoencoder
    if ae.spatial_dims not in (2, 3):
        problems.append(("autoencoder.spatial_dims", f"expected 2 or 3, got {ae.spatial_dims}"))
        return None
    if ae.type == "vq":
        return _check_vqvae(ae, problems)
    _check_unet_lists("autoencoder", ae.num_channels, ae.attention_levels, ae.num_res_blocks, ae.norm_num_groups,
                      problems)
    levels = len(ae.num_channels) - 1
    if levels < 0:
        return None
    dims = ae.spatial_dims
    down = _level_factors(ae.downsample_factors, levels, dims, "autoencoder.downsample_factors", problems)
    if ae.upsample_factors is not None:
        up = _level_factors(ae.upsample_factors, levels, dims, "autoencoder.upsample_factors", problems)
        if up is not None and down is not None:
            up_total, down_total = geometry.product_per_axis(up, dims), geometry.product_per_axis(down, dims)
            if up_total != down_total:
                problems.append(
                    ("autoencoder.upsample_factors",
                     f"multiply to {list(up_total)} per axis but autoencoder.downsample_factors "
                     f"multiply to {list(down_total)}; the decoder must restore the input size")
                )
    initial = ae.initial_downsample_factor
    if not isinstance(initial, int) and len(initial) != ae.spatial_dims:
        problems.append(
            ("autoencoder.initial_downsample_factor",
             f"expected an integer or a list of spatial_dims = {ae.spatial_dims} integers (one per axis), "
             f"got {len(initial)}: {short(initial)}")
        )
        return None
    return None if down is None else geometry.product_per_axis([initial_downsample_factor(ae), *down], dims)


def _check_vq_parameters(params: Sequence[Sequence[int]], levels: int, key: str, up: bool,
                         problems: list[tuple[str, str]]) -> bool:
    """Shape of ``autoencoder.vqvae.{down,up}sample_parameters`` and, per level, whether the (transposed)
    convolution changes the size by exactly its stride; True when every entry is usable."""
    names = "[stride, kernel, dilation, padding, output_padding]" if up else "[stride, kernel, dilation, padding]"
    width = 5 if up else 4
    if len(params) != levels:
        problems.append((key, f"expected len(autoencoder.vqvae.num_channels) = {levels} entries (every VQ-VAE level "
                              f"resamples once), got {len(params)}: {short(params)}"))
        return False
    ok = True
    for i, p in enumerate(params):
        where = key_path(key, i)
        if len(p) != width:
            problems.append((where, f"expected {width} integers {names}, got {len(p)}: {short(p)}"))
            ok = False
            continue
        stride, kernel, dilation, padding = p[:4]
        if min(stride, kernel, dilation) < 1:
            problems.append((where, f"stride, kernel and dilation must be >= 1, got {short(p)}"))
            ok = False
            continue
        reach = dilation * (kernel - 1) + 1  # voxels one kernel application covers
        if not up:
            # exact n -> n / stride for every n divisible by stride needs 2 * padding = reach - stride
            if (reach - stride) % 2 or reach < stride:
                problems.append((where, f"a kernel reaching {reach} voxels (kernel {kernel}, dilation {dilation}) "
                                        f"cannot shrink a size by exactly the stride {stride}: choose kernel and "
                                        f"stride with dilation*(kernel-1)+1-stride even and >= 0, e.g. "
                                        f"[{stride}, {2 * stride}, 1, {stride // 2}] for an even stride"))
                ok = False
            elif 2 * padding != reach - stride:
                fixed = [stride, kernel, dilation, (reach - stride) // 2]
                problems.append((where, f"padding {padding} makes this level shrink a size by other than the stride "
                                        f"{stride}; use padding {fixed[3]}: {short(fixed)}"))
                ok = False
        else:
            # a transposed convolution gives (n - 1) * stride - 2 * padding + reach + output_padding: n * stride needs
            out_pad = stride + 2 * padding - reach
            if p[4] != out_pad:
                if 0 <= out_pad < max(stride, dilation):
                    fix = f"use output_padding {out_pad}: {short([*p[:4], out_pad])}"
                else:
                    fix = f"use padding {max(0, (reach - stride) // 2)} and output_padding {(reach - stride) % 2}"
                problems.append((where, f"this level does not enlarge a size by exactly the stride {stride} "
                                        f"(output_padding {p[4]}); {fix}"))
                ok = False
    return ok


def _check_vqvae(ae: AutoencoderSettings, problems: list[tuple[str, str]]) -> Optional[tuple[int, ...]]:
    """VQ-VAE checks (``autoencoder.type: vq``); returns the total downsample factor per axis when well defined."""
    vq, key = ae.vqvae, "autoencoder.vqvae"
    levels = len(vq.num_channels)
    if levels == 0:
        problems.append((f"{key}.num_channels", "expected at least one level, got an empty list"))
        return None
    if isinstance(vq.num_res_channels, tuple) and len(vq.num_res_channels) != levels:
        problems.append((f"{key}.num_res_channels", f"expected an integer or one entry per level of num_channels "
                                                    f"({levels}), got {len(vq.num_res_channels)}: "
                                                    f"{short(vq.num_res_channels)}"))
    down, up = vq_sampling_parameters(vq)
    ok = _check_vq_parameters(down, levels, f"{key}.downsample_parameters", False, problems)
    ok = _check_vq_parameters(up, levels, f"{key}.upsample_parameters", True, problems) and ok
    if not ok:
        return None
    (total_down,), (total_up,) = geometry.vq_total_factor(down, 1), geometry.vq_total_factor(up, 1)
    if total_down != total_up:
        problems.append((f"{key}.upsample_parameters",
                         f"strides multiply to {total_up} but downsample_parameters' strides multiply to "
                         f"{total_down}; the decoder must restore the input size"))
        return None
    return geometry.vq_total_factor(down, ae.spatial_dims)


def _check_data_shape(s: Settings, total: Optional[tuple[int, ...]], problems: list[tuple[str, str]]) -> None:
    check_data_section(s.data, s.autoencoder.spatial_dims, total, problems)


def _check_divisible(key: str, sizes: Sequence[int], total: Sequence[int], problems: list[tuple[str, str]]) -> None:
    """One problem per axis of ``sizes`` (the key's value) that the autoencoder's total factor does not divide."""
    for axis, size, factor in geometry.indivisible_axes(sizes, total):
        problems.append(
            (key, f"axis {axis}: {size} is not divisible by {factor} (the autoencoder's total downsample factor "
                  f"on that axis: initial_downsample_factor x the product of downsample_factors); nearest valid "
                  f"sizes are {' and '.join(map(str, geometry.nearest_multiples(size, factor)))}")
        )


def check_data_section(d: DataSettings, dims: int, total: Optional[tuple[int, ...]],
                        problems: list[tuple[str, str]]) -> None:
    if len(d.voxel_size) != dims:
        problems.append(
            ("data.voxel_size", f"expected autoencoder.spatial_dims = {dims} entries (one per axis), "
                                f"got {len(d.voxel_size)}: {short(d.voxel_size)}")
        )
    elif total is not None:
        _check_divisible("data.voxel_size", d.voxel_size, total, problems)
    if d.spacing is not None and len(d.spacing) != dims:
        problems.append(
            ("data.spacing", f"expected autoencoder.spatial_dims = {dims} entries (mm per axis) or null, "
                             f"got {len(d.spacing)}: {short(d.spacing)}")
        )
    if d.orientation is not None:
        code = d.orientation.upper()
        pairs = [set("LR"), set("AP"), set("SI")]
        used = [next((i for i, p in enumerate(pairs) if c in p), None) for c in code]
        # 2D takes two letters, or three of which the first two are used (so the default RAS serves both)
        if len(code) not in ((2, 3) if dims == 2 else (3,)) or None in used or len(set(used)) != len(used):
            problems.append(
                ("data.orientation", f"expected {dims} axis codes" + (" (or 3, of which the first 2 are used)"
                                                                      if dims == 2 else "")
                 + f", one from each of L/R, A/P, S/I (e.g. {'RAS'[:dims]!r}), got {d.orientation!r}")
            )
    if d.intensity.lower_percentile >= d.intensity.upper_percentile:
        problems.append(
            ("data.intensity.lower_percentile", f"must be below data.intensity.upper_percentile "
                                                f"({num(d.intensity.upper_percentile)}), "
                                                f"got {num(d.intensity.lower_percentile)}")
        )
    rng = d.intensity.range
    if rng is not None:
        if len(rng) != 2:
            problems.append(("data.intensity.range", f"expected [min, max] (2 numbers) or null, got {len(rng)}: "
                                                     f"{short(rng)}"))
        elif not rng[0] < rng[1]:
            problems.append(("data.intensity.range", f"min must be below max, got [{num(rng[0])}, {num(rng[1])}]"))
    if d.voxel_resize is not None:
        if len(d.voxel_resize) != dims:
            problems.append(
                ("data.voxel_resize", f"expected an integer or autoencoder.spatial_dims = {dims} entries (one per "
                                      f"axis) or null, got {len(d.voxel_resize)}: {short(d.voxel_resize)}")
            )
        elif len(d.voxel_size) == dims:
            small = [a for a in range(dims) if d.voxel_resize[a] < d.voxel_size[a]]
            if small:
                problems.append(
                    ("data.voxel_resize",
                     f"{short(d.voxel_resize)} is smaller than data.voxel_size {short(d.voxel_size)} on "
                     f"{'axes' if len(small) > 1 else 'axis'} {', '.join(map(str, small))}: the crop to voxel_size would pad there; make voxel_resize at "
                     "least voxel_size on every axis, or set it to null")
                )
    aug = d.augmentation
    if aug.enabled and aug.random_rotate_prob > 0 and len(d.voxel_size) >= 2 and d.voxel_size[0] != d.voxel_size[1]:
        problems.append(
            ("data.augmentation.random_rotate_prob",
             f"is {num(aug.random_rotate_prob)}: 90-degree turns in the plane of the first two axes swap them, but "
             f"data.voxel_size {short(d.voxel_size)} differs on them, so the shape would change; make "
             "data.voxel_size[0] == data.voxel_size[1] or set random_rotate_prob to 0")
        )


def _check_diffusion(s: Settings, total: Optional[tuple[int, ...]], problems: list[tuple[str, str]]) -> None:
    ae, df = s.autoencoder, s.diffusion
    if df.spatial_dims != ae.spatial_dims:
        problems.append(
            ("diffusion.spatial_dims",
             f"must equal autoencoder.spatial_dims ({ae.spatial_dims}), got {df.spatial_dims}"
             + (" (in pixel space autoencoder.spatial_dims still states the images' axes: set both)"
                if df.space == "pixel" else ""))
        )
    _check_unet_lists("diffusion", df.num_channels, df.attention_levels, df.num_res_blocks, df.norm_num_groups,
                      problems)
    levels = len(df.num_channels)
    heads = df.num_head_channels
    if isinstance(heads, tuple) and len(heads) != levels:
        problems.append(
            ("diffusion.num_head_channels", f"expected an integer or one entry per level of num_channels ({levels}), "
                                            f"got {len(heads)}: {short(heads)}")
        )
    elif levels and len(df.attention_levels) == levels:
        per_level = heads if isinstance(heads, tuple) else (heads,) * levels
        # the middle block always has attention with the last level's head size
        needs = [i for i in range(levels) if df.attention_levels[i] or i == levels - 1]
        for i in needs:
            key = f"diffusion.num_head_channels[{i}]" if isinstance(heads, tuple) else "diffusion.num_head_channels"
            h, c = per_level[i], df.num_channels[i]
            why = "attention is on at this level" if df.attention_levels[i] else "the middle block always has attention"
            if h < 1:
                problems.append((key, f"must be >= 1 because {why}, got {h}"))
            elif c % h:
                problems.append((key, f"must divide diffusion.num_channels[{i}] ({c}) because {why}, got {h}"))
    if df.space == "pixel":
        if len(s.data.voxel_size) == ae.spatial_dims:
            problems += unet_fit_problems(df, ae.in_channels, ae.spatial_dims, s.data.voxel_size,
                                          (1,) * ae.spatial_dims, space="pixel")
        if df.training.cache_latents:
            problems.append(("diffusion.training.cache_latents",
                             "is true, but diffusion.space is pixel: there is no autoencoder, so no latents to cache "
                             "(the images themselves are cached by data.cache_rate); "
                             "--set diffusion.training.cache_latents=false"))
    elif (total is not None and len(s.data.voxel_size) == ae.spatial_dims
            and all(v % t == 0 for v, t in zip(s.data.voxel_size, total))):
        problems += unet_fit_problems(df, latent_channels_of(ae), ae.spatial_dims, s.data.voxel_size, total,
                                      latent_key=latent_channels_key(ae))
    cond = df.conditioning
    if (cond.class_key is None) != (cond.num_classes is None):
        problems.append(
            ("diffusion.conditioning.num_classes",
             "class_key and num_classes must be given together (a categorical condition needs both)")
        )
    if (cond.class_key is not None or cond.covariate_keys) and s.data.datalist is None:
        problems.append(
            ("diffusion.conditioning", "conditions are read from datalist entries: set data.datalist")
        )
    if cond.covariate_keys and not any(df.attention_levels):
        problems.append(
            ("diffusion.attention_levels",
             "covariate conditioning uses cross-attention: switch attention on at one level at least")
        )
    _check_projection_conditioning(s, problems)
    if s.sampling.covariates is not None and len(s.sampling.covariates) != len(cond.covariate_keys):
        problems.append(
            ("sampling.covariates",
             f"expected one value per diffusion.conditioning.covariate_keys {list(cond.covariate_keys)}, "
             f"got {list(s.sampling.covariates)}")
        )
    if (s.sampling.class_label is not None and cond.num_classes is not None
            and s.sampling.class_label >= cond.num_classes):
        problems.append(
            ("sampling.class_label", f"must be < diffusion.conditioning.num_classes ({cond.num_classes}), "
                                     f"got {s.sampling.class_label}")
        )
    if s.sampling.save_format == "png" and ae.spatial_dims != 2:
        problems.append(("sampling.save_format", f"png holds 2D images, but autoencoder.spatial_dims is "
                                                 f"{ae.spatial_dims}; use nifti or npy (or auto)"))
    if s.sampling.save_format in ("pointcloud", "both") and ae.out_channels != 1:
        problems.append(("sampling.save_format", f"{s.sampling.save_format} exports single-channel samples, but "
                                                 f"autoencoder.out_channels is {ae.out_channels}; use nifti or npy"))
    sch = df.scheduler
    if s.sampling.scheduler != "auto" and s.sampling.scheduler not in SAMPLERS[sch.type]:
        problems.append(
            ("sampling.scheduler", f"{s.sampling.scheduler} cannot sample a model trained with "
                                   f"diffusion.scheduler.type={sch.type}; use one of "
                                   f"{', '.join(('auto',) + SAMPLERS[sch.type])}")
        )
    if sch.beta_start >= sch.beta_end:
        problems.append(
            ("diffusion.scheduler.beta_start",
             f"must be below diffusion.scheduler.beta_end ({sch.beta_end}), got {sch.beta_start}")
        )
    if s.sampling.num_inference_steps > sch.num_train_timesteps:
        problems.append(
            ("sampling.num_inference_steps",
             f"must be <= diffusion.scheduler.num_train_timesteps ({sch.num_train_timesteps}), "
             f"got {s.sampling.num_inference_steps}")
        )


def _check_tile_size(key: str, tile: Optional[Sequence[int]], s: Settings, total: Optional[tuple[int, ...]],
                     problems: list[tuple[str, str]]) -> None:
    """``autoencoder.tile_size`` / ``sampling.tile_size``: exact tiling exists for the KL autoencoder's encoder and
    decoder; one size per spatial axis, each a multiple of that axis's total factor."""
    if tile is None:
        return
    ae = s.autoencoder
    if key == "sampling.tile_size" and s.diffusion.space == "pixel":
        problems.append((key, "tiles the autoencoder's decoding, but diffusion.space is pixel (no decoder); set "
                              f"{key}=null"))
    elif ae.type == "vq":
        problems.append((key, f"exact tiled encoding and decoding is for the KL autoencoder; the VQ-VAE runs whole "
                              f"volumes: set {key}=null"))
    elif len(tile) != ae.spatial_dims:
        problems.append((key, f"expected {ae.spatial_dims} sizes (one per spatial axis), got {list(tile)}"))
    elif total is not None:
        _check_divisible(key, tile, total, problems)


def _check_logging(s: Settings, total: Optional[tuple[int, ...]], problems: list[tuple[str, str]]) -> None:
    """The tiles of inference (``autoencoder.tile_size``, ``sampling.tile_size``), the sliding windows of stage 1's
    validation and the sampling steps of stage 2's pictures."""
    for tile_key, tile in (("autoencoder.tile_size", s.autoencoder.tile_size),
                           ("sampling.tile_size", s.sampling.tile_size)):
        _check_tile_size(tile_key, tile, s, total, problems)
    roi, dims = s.autoencoder.logging.sliding_window_roi_size, s.autoencoder.spatial_dims
    key = "autoencoder.logging.sliding_window_roi_size"
    if roi is not None and len(roi) != dims:
        problems.append((key, f"expected autoencoder.spatial_dims = {dims} entries (one per axis) or null "
                              f"(= data.voxel_size), got {len(roi)}: {short(roi)}"))
    elif roi is not None and total is not None:
        _check_divisible(key, roi, total, problems)
    steps, timesteps = s.diffusion.logging.num_inference_steps, s.diffusion.scheduler.num_train_timesteps
    if steps is not None and steps > timesteps:
        problems.append(("diffusion.logging.num_inference_steps",
                         f"must be <= diffusion.scheduler.num_train_timesteps ({timesteps}), got {steps}"))


def _check_projection_conditioning(s: Settings, problems: list[tuple[str, str]]) -> None:
    """``diffusion.condition_channels``: the condition is the sum-projection of a 3D image along an axis of
    ``data.voxel_size``, with the image's channels, given to the UNet as cross-attention context (MONAI's middle block
    always has cross-attention once ``with_conditioning`` is on, so no attention level is required)."""
    df, ae = s.diffusion, s.autoencoder
    if df.condition_channels is None:
        return
    if ae.spatial_dims != 3:
        problems.append(("diffusion.condition_channels",
                         f"projection conditioning sums a 3D volume to a 2D image, but autoencoder.spatial_dims is "
                         f"{ae.spatial_dims}; --set diffusion.condition_channels=null"))
    elif df.projection_axis >= 3:
        problems.append(("diffusion.projection_axis",
                         f"must be 0, 1 or 2 (an axis of data.voxel_size {list(s.data.voxel_size)}), got "
                         f"{df.projection_axis}"))
    if df.condition_channels != ae.in_channels:
        problems.append(("diffusion.condition_channels",
                         f"the condition is the image's projection, with the image's {ae.in_channels} channel(s) "
                         f"(autoencoder.in_channels), got {df.condition_channels}; --set "
                         f"diffusion.condition_channels={ae.in_channels}"))
    if df.conditioning.covariate_keys:
        problems.append(("diffusion.conditioning.covariate_keys",
                         f"{list(df.conditioning.covariate_keys)} and diffusion.condition_channels both need the "
                         "UNet's cross-attention context; use one of them (--set diffusion.conditioning."
                         "covariate_keys=[] or --set diffusion.condition_channels=null)"))




def unet_fit_problems(
    df: DiffusionSettings, latent_channels: int, spatial_dims: int, voxel_size: Sequence[int],
    total_factor: Sequence[int], autoencoder_source: str = "autoencoder", space: str = "latent",
    latent_key: str = "latent_channels",
) -> list[tuple[str, str]]:
    """Does the diffusion UNet fit the autoencoder's latent (or, in pixel space, the images)? One ``(key, message)``
    per problem, each with the ``--set`` lines that fix it.

    The one place this is checked: settings validation calls it with the YAML's autoencoder, stage 2 with the
    autoencoder stored in its checkpoint (``autoencoder_source`` names it in the messages).

    Args:
        df: the ``diffusion`` settings.
        latent_channels: channels of the autoencoder's latent.
        spatial_dims: the autoencoder's number of spatial axes.
        voxel_size: the volumes' spatial size (divisible by ``total_factor``).
        total_factor: the autoencoder's total downsample factor per axis.
        autoencoder_source: how the messages name the autoencoder: ``"autoencoder"`` (the settings section) or
            e.g. ``"the autoencoder in runs/ae/best_model.pt"``.
        space: ``"latent"``, or ``"pixel"``: the UNet works on the images, ``latent_channels`` is then the image
            channels (``autoencoder.in_channels``) and ``total_factor`` is 1 on every axis.
        latent_key: the autoencoder's key of the latent channels (``"vqvae.embedding_dim"`` for a VQ-VAE).
    """
    problems: list[tuple[str, str]] = []

    def of(name: str) -> str:
        return f"autoencoder.{name}" if autoencoder_source == "autoencoder" else f"{name} of {autoencoder_source}"

    if df.spatial_dims != spatial_dims:
        problems.append(("diffusion.spatial_dims", f"must equal {of('spatial_dims')} ({spatial_dims}), got "
                                                   f"{df.spatial_dims}: --set diffusion.spatial_dims={spatial_dims}"))
    pixel = space == "pixel"
    channels_key, works_on = ("in_channels", "the images (diffusion.space is pixel)") if pixel else \
        (latent_key, "latents")
    for name in ("in_channels", "out_channels"):
        if getattr(df, name) != latent_channels:
            problems.append((f"diffusion.{name}", f"must equal {of(channels_key)} ({latent_channels}) because "
                                                  f"the UNet works on {works_on}, got {getattr(df, name)}: "
                                                  f"--set diffusion.{name}={latent_channels}"))
    levels = len(df.num_channels)
    if not levels:
        return problems
    latent = geometry.divided(voxel_size, total_factor)
    need = 2 ** (levels - 1)
    bad = [(axis, size) for axis, size in enumerate(latent) if size % need]
    if not bad:
        return problems
    fixes = []
    keep = geometry.unet_levels_that_fit(latent)
    if keep < levels:
        channels = list(df.num_channels[:keep])
        sets = [f"--set diffusion.num_channels={set_value(channels)}",
                f"--set diffusion.attention_levels={set_value(list(df.attention_levels[:keep]))}"]
        if isinstance(df.num_head_channels, tuple):
            heads = list(df.num_head_channels[:keep])
            # the last level always has attention (middle block): its head size must divide its channels
            if heads[-1] < 1 or channels[-1] % heads[-1]:
                last = df.num_head_channels[-1]
                heads[-1] = last if last >= 1 and channels[-1] % last == 0 else channels[-1]
            sets.append(f"--set diffusion.num_head_channels={set_value(heads)}")
        if isinstance(df.num_res_blocks, tuple):
            sets.append(f"--set diffusion.num_res_blocks={set_value(list(df.num_res_blocks[:keep]))}")
        fixes.append(f"use {keep} UNet level(s): " + " ".join(sets))
    step = [t * need for t in total_factor]
    sizes = [geometry.nearest_multiple(v, m) for v, m in zip(voxel_size, step)]
    if pixel:
        fixes.append(f"or make every axis a multiple of {need}: --set data.voxel_size={set_value(sizes)}")
        where = ", ".join(f"axis {a} is {n}" for a, n in bad)
        problems.append(("diffusion.num_channels",
                         f"{levels} UNet levels halve the image {levels - 1} time(s) (diffusion.space is pixel), so "
                         f"each axis of data.voxel_size must be divisible by {need}, but {where}; " + "; ".join(fixes)))
        return problems
    fixes.append(f"or make every latent axis a multiple of {need}: --set data.voxel_size={set_value(sizes)}")
    where = ", ".join(f"axis {a} is {n} (data.voxel_size {voxel_size[a]} / total factor {total_factor[a]})"
                      for a, n in bad)
    problems.append(("diffusion.num_channels",
                     f"{levels} UNet levels halve the latent {levels - 1} time(s), so each latent axis must be "
                     f"divisible by {need}, but latent {where}; " + "; ".join(fixes)))
    return problems


def _check_perceptual(s: Settings, check_paths: bool, problems: list[tuple[str, str]]) -> None:
    t = s.autoencoder.training
    if t.perceptual_network.startswith("medicalnet_") and s.autoencoder.spatial_dims != 3:
        problems.append(
            ("autoencoder.training.perceptual_network",
             f"{t.perceptual_network!r} needs autoencoder.spatial_dims 3; use 'squeeze', 'alex' or 'vgg' for 2D")
        )
    if not t.use_perceptual_loss:
        return
    key = "autoencoder.training.perceptual_weights_path"
    if t.perceptual_weights_path is None:
        problems.append(
            (key, f"autoencoder.training.use_perceptual_loss is true but no weights file is given; pretrained "
                  f"weights cannot be downloaded here: pass a local state-dict file of the "
                  f"{t.perceptual_network!r} network, e.g. --set {key}=/path/to/weights.pth, or set "
                  f"autoencoder.training.use_perceptual_loss false")
        )
    elif check_paths and not Path(t.perceptual_weights_path).expanduser().is_file():
        problems.append(
            (key, f"file not found: {t.perceptual_weights_path!r} (resolved to "
                  f"{Path(t.perceptual_weights_path).expanduser().resolve()}); pretrained weights cannot be "
                  f"downloaded here, pass an existing local weights file")
        )


_HOW_TO_GIVE_DATA = (
    "set data.train_data_dir (a folder of .nii/.nii.gz volumes, optionally with data.val_data_dir), "
    "or data.datalist (a decathlon-style JSON), or data.synthetic.enabled: true (built-in synthetic volumes, "
    "e.g. --set data.synthetic.enabled=true)"
)


def _check_data_sources(s: Settings, check_paths: bool, require_data: bool, problems: list[tuple[str, str]]) -> None:
    d = s.data
    if d.synthetic.enabled:
        try:  # cross-parameter checks of the chosen kind (e.g. min_filaments <= max_filaments)
            make_params(d.synthetic.kind, synthetic_params(d.synthetic))
        except ValueError as exc:
            problems.append(("data.synthetic", str(exc)))
        if s.autoencoder.in_channels != 1:
            problems.append(("autoencoder.in_channels", f"the built-in datasets have 1 channel, got "
                                                        f"{s.autoencoder.in_channels}"))
    given = [name for name, on in (("data.train_data_dir", d.train_data_dir is not None),
                                   ("data.datalist", d.datalist is not None),
                                   ("data.synthetic.enabled", d.synthetic.enabled)) if on]
    if len(given) > 1:
        problems.append(
            ("data", f"give exactly one data source, got {len(given)}: {', '.join(given)}; "
                     f"remove (set to null/false) all but one")
        )
    if d.val_data_dir is not None and d.train_data_dir is None:
        problems.append(
            ("data.val_data_dir", "is set but data.train_data_dir is not; a validation folder goes with a training "
                                  "folder (a datalist has its own \"validation\" list)")
        )
    if not require_data:
        return
    if not given and check_paths:
        problems.append(("data", f"no data source given; {_HOW_TO_GIVE_DATA}"))
    if not check_paths:
        return
    for key, value, want_dir in (("data.train_data_dir", d.train_data_dir, True),
                                 ("data.val_data_dir", d.val_data_dir, True),
                                 ("data.datalist", d.datalist, False)):
        if value is None:
            continue
        p = Path(value).expanduser()
        if want_dir and not p.is_dir():
            what = "is a file, expected a folder" if p.exists() else "folder not found"
            problems.append((key, f"{what}: {value!r} (resolved to {p.resolve()}); point it at a folder of "
                                  f".nii/.nii.gz volumes, e.g. --set {key}=/path/to/folder"))
        elif not want_dir and not p.is_file():
            what = "is a folder, expected a JSON file" if p.exists() else "file not found"
            problems.append((key, f"{what}: {value!r} (resolved to {p.resolve()}); point it at a decathlon-style "
                                  f"JSON datalist, e.g. --set {key}=/path/to/datalist.json"))


def _check_checkpoints(s: Settings, check_paths: bool, problems: list[tuple[str, str]]) -> None:
    for section in ("autoencoder", "diffusion"):
        c = getattr(s, section).checkpoints
        if c.init_from is not None and c.resume_from is not None:
            problems.append((f"{section}.checkpoints.init_from",
                             f"cannot be combined with {section}.checkpoints.resume_from (resuming restores the "
                             "weights already); set one of them to null"))
        if c.start_fresh_if_none and c.resume_from != "latest":
            problems.append((f"{section}.checkpoints.start_fresh_if_none",
                             f"applies only with {section}.checkpoints.resume_from: latest (it is "
                             f"{c.resume_from!r}); set it to false or resume_from to latest"))
        for name in ("init_from", "resume_from"):
            path = getattr(c, name)
            if name == "resume_from" and path == "latest":
                continue  # the newest complete checkpoint in output_dir, found when the run starts
            if check_paths and path is not None and not Path(path).expanduser().is_file():
                problems.append((f"{section}.checkpoints.{name}",
                                 f"file not found: {path!r} (resolved to {Path(path).expanduser().resolve()})"))


def _check_stage(s: Settings, stage: Optional[str], check_paths: bool, problems: list[tuple[str, str]]) -> None:
    """Checks that only one command needs: stage 2 learns whole volumes from a stage-1 checkpoint (or, in pixel space,
    without one); a pixel-space config has no stage 1."""
    if stage in ("autoencoder", "diffusion") and getattr(s, stage).logging.tracker == "mlflow":
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            problems.append((f"{stage}.logging.tracker", 'is mlflow, but the mlflow package is not installed: '
                                                         'pip install -e ".[mlflow]" (or pip install mlflow)'))
    if stage == "autoencoder" and s.diffusion.space == "pixel":
        problems.append(("diffusion.space", "is pixel: the UNet learns the images directly and no autoencoder is "
                                            "trained; run train_diffusion.py with this config (or --set "
                                            "diffusion.space=latent to train a latent pipeline's autoencoder)"))
    if stage != "diffusion":
        return
    if s.data.crop_mode == "random_patch":
        problems.append(("data.crop_mode", "random_patch is for stage 1 only: the diffusion model learns whole "
                                           "volumes; use --set data.crop_mode=resize or pad_crop"))
    elif s.data.augmentation.use_patch_based:
        problems.append(("data.augmentation.use_patch_based",
                         "random patches are for stage 1 only: the diffusion model learns whole volumes; use --set "
                         "data.augmentation.use_patch_based=false (and data.crop_mode resize or pad_crop)"))
    path = s.diffusion.checkpoints.autoencoder_path
    key = "diffusion.checkpoints.autoencoder_path"
    if s.diffusion.space == "pixel":
        if path is not None:
            problems.append((key, f"is {path!r}, but diffusion.space is pixel: the UNet learns the images directly, "
                                  f"without an autoencoder; --set {key}=null (or --set diffusion.space=latent)"))
        return
    if path is None:
        pixel_hint = ""
        if s.diffusion.in_channels == s.autoencoder.in_channels:
            pixel_hint = (f"; or, since diffusion.in_channels equals the image channels ({s.autoencoder.in_channels}),"
                          " train on the images without an autoencoder: --set diffusion.space=pixel")
        problems.append((key, f"is not set: point it at the stage-1 checkpoint, e.g. --set {key}="
                              f"{Path(s.autoencoder.checkpoints.output_dir) / 'best_model.pt'}" + pixel_hint))
    elif check_paths and not Path(path).expanduser().is_file():
        problems.append((key, f"file not found: {path!r} (resolved to {Path(path).expanduser().resolve()}); "
                              "train stage 1 first, or point it at its best_model.pt"))


def _check_losses(s: Settings, problems: list[tuple[str, str]]) -> None:
    """Stage 1's reconstruction loss and the input corruption of both stages (docs/losses.md)."""
    weighted = s.autoencoder.training.loss.weighted
    if weighted.recon_loss_type is not None and weighted.recon_loss_type != weighted.loss_type != "l1":
        problems.append(("autoencoder.training.loss.weighted.recon_loss_type",
                         f"names the same thing as weighted.loss_type but differs: {weighted.recon_loss_type!r} vs "
                         f"{weighted.loss_type!r}; give one of them"))
    combined = s.autoencoder.training.loss.combined
    if combined.dice_weight == 0 and combined.recon_weight == 0:
        problems.append(("autoencoder.training.loss.combined.dice_weight",
                         "dice_weight and recon_weight are both 0, so the combined loss is 0: make one positive"))
    for key, c in (("autoencoder.training.denoising", s.autoencoder.training.denoising),
                   ("diffusion.training.input_noise", s.diffusion.training.input_noise)):
        if c.dropout_prob >= 1:
            problems.append((f"{key}.dropout_prob",
                             f"must be below 1 (1 zeroes every voxel), got {num(c.dropout_prob)}"))
    if s.diffusion.training.input_noise.enabled and s.diffusion.training.cache_latents:
        problems.append(("diffusion.training.input_noise.enabled",
                         "input noise corrupts the images before they are encoded, but diffusion.training."
                         "cache_latents encodes them once, uncorrupted; use --set diffusion.training.cache_latents="
                         "false (or --set diffusion.training.input_noise.enabled=false)"))


def _check_auto_batch(s: Settings, problems: list[tuple[str, str]]) -> None:
    """``batch_size: auto`` goes with ``effective_batch_size`` and sets ``gradient_accumulation_steps`` itself."""
    for section, t in (("autoencoder.training", s.autoencoder.training), ("diffusion.training", s.diffusion.training)):
        if t.batch_size == "auto":
            if t.effective_batch_size is None:
                problems.append((f"{section}.effective_batch_size",
                                 "batch_size: auto needs the batch each optimizer step should see, e.g. --set "
                                 f"{section}.effective_batch_size=16"))
            if t.gradient_accumulation_steps != 1:
                problems.append((f"{section}.gradient_accumulation_steps",
                                 f"batch_size: auto sets it from effective_batch_size; got "
                                 f"{t.gradient_accumulation_steps}: leave it at 1"))
        elif t.effective_batch_size is not None:
            problems.append((f"{section}.effective_batch_size",
                             f"applies with batch_size: auto only (batch_size is {t.batch_size}); set "
                             f"{section}.batch_size=auto or remove it"))


def validate(s: Settings, check_paths: bool, require_data: bool, stage: Optional[str] = None) -> None:
    problems: list[tuple[str, str]] = []
    _check_auto_batch(s, problems)
    total = _check_autoencoder(s, problems)
    if s.diffusion.space == "pixel":
        total = None  # no autoencoder downsamples the images: the UNet's own fit is checked in _check_diffusion
    _check_data_shape(s, total, problems)
    _check_logging(s, total, problems)
    _check_diffusion(s, total, problems)
    _check_losses(s, problems)
    _check_perceptual(s, check_paths, problems)
    _check_data_sources(s, check_paths, require_data, problems)
    _check_checkpoints(s, check_paths, problems)
    _check_stage(s, stage, check_paths, problems)
    if problems:
        raise ConfigError(problems=problems)
