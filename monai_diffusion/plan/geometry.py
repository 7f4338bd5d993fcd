"""What a config's networks look like, without running them: shapes, downsample factors, levels, attention sizes
and parameter counts of both stages.

Everything here reads validated settings; a config that does not fit (volume not divisible by the total factor,
a UNet whose levels do not fit the latent) never gets here, because settings validation refuses it first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .. import geometry
from ..settings import (
    AutoencoderSettings,
    Settings,
    initial_downsample_factor,
    sampling_tile,
    total_downsample_factor,
)

MIB = 2**20


# ------------------------------------------------------------------------------------------------ small helpers
def shape_text(sizes: Sequence[int]) -> str:
    """``[32, 32, 16]`` -> ``"32x32x16"``."""
    return "x".join(str(int(s)) for s in sizes)


def mib_text(x: float) -> str:
    """A size in MiB as a short human text (GiB from 10 GiB on)."""
    if x >= 10 * 1024:
        return f"{x / 1024:,.1f} GiB"
    if x >= 100:
        return f"{x:,.0f} MiB"
    return f"{x:,.1f} MiB"


def per_level_factors(ae: AutoencoderSettings) -> list[list[int]]:
    """Downsample factor of every level of the ``autoencoder`` settings, one int per axis (None = 2 per level)."""
    return [list(f) for f in geometry.per_level_factors(ae.downsample_factors, len(ae.num_channels) - 1,
                                                        ae.spatial_dims)]


def per_level(value: Any, levels: int) -> list[int]:
    """An int-or-list setting as one value per level."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def compact_factors(factors: Sequence[Sequence[int]]) -> list[Any]:
    """``[[4, 4, 4], [2, 2, 1]]`` -> ``[4, [2, 2, 1]]``: isotropic levels as one int, as a user writes them."""
    return [f[0] if len(set(f)) == 1 else list(f) for f in factors]


def latent_spatial(s: Settings) -> list[int]:
    """The latent's spatial size: ``data.voxel_size`` over the autoencoder's total downsample factor."""
    return geometry.divided(s.data.voxel_size, total_downsample_factor(s.autoencoder))


def attention_entry(where: str, spatial: Sequence[int], heads: int, blocks: int, flash: bool,
                    batch: int) -> dict[str, Any]:
    """Size of the attention at one place of a network: tokens, heads, blocks and, when the N x N matrix is
    materialised (no flash attention), an estimate of what backward keeps of it."""
    tokens = math.prod(spatial)
    matrix_mib = batch * heads * tokens * tokens * 4 / MIB  # one fp32 attention matrix (softmax runs in fp32)
    return {
        "where": where,
        "spatial": list(spatial),
        "tokens": tokens,
        "heads": heads,
        "blocks": blocks,
        "flash": flash,
        "matrix_mib": matrix_mib,
        # materialised attention keeps ~2 N x N matrices per head for backward (scores and softmax); flash keeps none
        "estimate_mib": 0.0 if flash else 2 * blocks * matrix_mib,
    }


# ------------------------------------------------------------------------------------------------ stage 1
def stage1_info(s: Settings, batch: int) -> dict[str, Any]:
    """Input and latent shape, factors, compression, levels and attention of the autoencoder at ``batch``."""
    ae, t = s.autoencoder, s.autoencoder.training
    factors = per_level_factors(ae)
    voxel = list(s.data.voxel_size)
    latent = latent_spatial(s)
    levels = []
    initial = list(initial_downsample_factor(ae))
    # the first level works after the patchify convolution
    resolutions = geometry.level_resolutions(voxel, initial, factors)
    res_blocks = per_level(ae.num_res_blocks, len(ae.num_channels))
    for i, ch in enumerate(ae.num_channels):
        levels.append({"level": i, "spatial": list(resolutions[i]), "channels": ch, "res_blocks": res_blocks[i],
                       "attention": bool(ae.attention_levels[i]) if i < len(ae.attention_levels) else False})
    attention = []
    for lv in levels:
        if lv["attention"]:
            # encoder: one block per res block; decoder: one per res block of the mirrored level
            attention.append(attention_entry(f"encoder+decoder level {lv['level']}", lv["spatial"], 1,
                                             2 * lv["res_blocks"], ae.use_flash_attention, batch))
    nonlocal_blocks = int(ae.with_encoder_nonlocal_attn) + int(ae.with_decoder_nonlocal_attn)
    if nonlocal_blocks:
        attention.append(attention_entry("non-local (latent level)", levels[-1]["spatial"], 1, nonlocal_blocks,
                                         ae.use_flash_attention, batch))
    n_in = ae.in_channels * math.prod(voxel)
    n_lat = ae.latent_channels * math.prod(latent)
    return {
        "input_shape": [batch, ae.in_channels, *voxel],
        "latent_shape": [batch, ae.latent_channels, *latent],
        "total_factor": list(total_downsample_factor(ae)),
        "downsample_factors": factors,
        "initial_downsample_factor": initial,
        "custom_upsample_factors": ae.upsample_factors is not None,
        "compression_ratio": n_in / n_lat,
        "levels": levels,
        "attention": attention,
        "spatial_dims": ae.spatial_dims,
        "gradient_checkpointing": t.use_gradient_checkpointing,
        "flash_attention": ae.use_flash_attention,
        "adversarial": t.adv_weight > 0,
        "perceptual": t.use_perceptual_loss,
        "training_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "crop_mode": s.data.crop_mode,
    }


# ------------------------------------------------------------------------------------------------ stage 2
def stage2_info(s: Settings, batch: int) -> dict[str, Any]:
    """How the UNet meets the latent (levels, required divisor), its levels and attention at ``batch``.

    The fit itself is checked once, by settings validation (``settings.unet_fit_problems``); these are its facts.
    """
    ae, df = s.autoencoder, s.diffusion
    latent = latent_spatial(s)
    levels = len(df.num_channels)
    heads = per_level(df.num_head_channels, levels)
    res_blocks = per_level(df.num_res_blocks, levels)
    level_info = []
    attention = []
    # every UNet level after the first halves the latent
    resolutions = geometry.level_resolutions(latent, [1] * len(latent), [[2] * len(latent)] * (levels - 1))
    for i, ch in enumerate(df.num_channels):
        spatial = list(resolutions[i])
        att = bool(df.attention_levels[i])
        h = heads[i] if heads[i] > 0 else ch
        n_heads = max(1, ch // h)
        level_info.append({"level": i, "spatial": list(spatial), "channels": ch, "attention": att,
                           "heads": n_heads if att or i == levels - 1 else 0})
        if att:
            # down block: one per res block; up block: one per (res blocks + 1)
            attention.append(attention_entry(f"level {i}", spatial, n_heads, 2 * res_blocks[i] + 1,
                                             df.use_flash_attention, batch))
        if i == levels - 1:
            attention.append(attention_entry("middle block", spatial, n_heads, 1, df.use_flash_attention, batch))
    cond = df.conditioning
    return {
        "latent_shape": [batch, ae.latent_channels, *latent],
        "latent_channels": ae.latent_channels,
        "in_channels": df.in_channels,
        "out_channels": df.out_channels,
        "num_levels": levels,
        "required_divisor": 2 ** (levels - 1),
        "levels": level_info,
        "attention": attention,
        "flash_attention": df.use_flash_attention,
        "encodes_images": not df.training.cache_latents,
        "conditioning": {"num_classes": cond.num_classes if cond.class_key is not None else None,
                         "num_covariates": len(cond.covariate_keys)},
        "training_batch_size": df.training.batch_size,
        "ema": df.training.ema_decay is not None,
    }


# ------------------------------------------------------------------------------------------------ parameters
def parameter_counts(s: Settings) -> tuple[dict[str, int], dict[str, int]]:
    """Parameter counts of both stages' networks, built on the CPU from the settings (no optimizers).

    Returns:
        ``({"autoencoder", "discriminator", "trainable"}, {"unet", "trainable", "frozen_autoencoder"})``; the
        frozen autoencoder counts only when stage 2 encodes images in every step (no ``cache_latents``).
    """
    from ..runtime import count_parameters
    from ..models import build_autoencoder, build_unet, unet_args
    from ..stage1 import build_discriminator

    def trainable(m: Any) -> int:
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    ae_cfg, t, df = s.autoencoder, s.autoencoder.training, s.diffusion
    # built on the CPU: the meta device would save the memory, but its init ops import torch._dynamo (seconds)
    ae = build_autoencoder(ae_cfg)
    disc = build_discriminator(ae_cfg.spatial_dims, ae_cfg.out_channels, t.discriminator.num_layers_d,
                               t.discriminator.num_channels)
    p1 = {"autoencoder": count_parameters(ae), "discriminator": count_parameters(disc),
          "trainable": trainable(ae) + trainable(disc)}
    unet = build_unet(unet_args(df, df.conditioning.num_classes, len(df.conditioning.covariate_keys)))
    p2 = {"unet": count_parameters(unet), "trainable": trainable(unet),
          "frozen_autoencoder": 0 if df.training.cache_latents else p1["autoencoder"]}
    return p1, p2


def inference_info(s: Settings) -> dict[str, Any]:
    """The autoencoder outside training: the exact tiles of encoding (``autoencoder.tile_size``: latent caching,
    stage 2's encoding, evaluate) and of sampling's decoding (``sampling.tile_size``, else ``autoencoder.tile_size``);
    None = whole volumes."""
    enc = s.autoencoder.tile_size
    dec, dec_key = sampling_tile(s)
    return {"encode_tile": None if enc is None else list(enc), "decode_tile": None if dec is None else list(dec),
            "decode_tile_key": dec_key,
            "volume": list(s.data.voxel_size), "sampling_batch_size": s.sampling.batch_size, "measurement": None}
