"""What to change when a stage does not fit a memory budget: a verdict per stage and config knobs, most effective
first, each as ready ``--set`` lines; knobs that are already set are not suggested."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..data import uses_random_patches
from ..settings import Settings, initial_downsample_factor, set_value, total_downsample_factor
from .geometry import (
    MIB,
    compact_factors,
    mib_text,
    per_level,
    per_level_factors,
    shape_text,
)

# attention advice goes first when its matrices are estimated at >= this share of the measured peak
_ATTENTION_SHARE_FIRST = 0.25
# stage 2: encoding is "the peak" when encoding alone reaches this share of the whole step's peak
_ENCODE_SHARE = 0.9
# what a CUDA process holds on the GPU besides the caching allocator's reserved memory: the CUDA context with the
# kernels of cuBLAS/cuDNN loaded, and their workspaces. Typically 0.3-1 GiB (it depends on the GPU, the driver, the
# CUDA version and lazy module loading); the allowance takes the upper end so that "fits" errs on the safe side.
CUDA_CONTEXT_MIB = 1024.0


def memory_need(m: dict[str, Any]) -> tuple[float, str]:
    """(MiB a measured step needs of the device's memory, how that was worked out) for a measurement ``m``.

    On CPU (no ``reserved_mib`` in ``m``) it is the measured peak. On CUDA the peak is
    ``torch.cuda.max_memory_allocated``: tensors only. The process also holds what the caching allocator has reserved
    beyond that (freed blocks kept for reuse, fragmentation) and the CUDA context, so the need is the peak reserved
    memory (at least the allocated peak) plus :data:`CUDA_CONTEXT_MIB`.
    """
    peak = float(m["peak_mib"])
    if m.get("reserved_mib") is None:
        return peak, "measured"
    reserved = max(peak, float(m["reserved_mib"]))
    return reserved + CUDA_CONTEXT_MIB, (f"measured on CUDA: reserved {reserved:.0f} MiB (allocated peak {peak:.0f} "
                                         f"MiB) + {CUDA_CONTEXT_MIB:.0f} MiB CUDA context allowance")


def _advice_entry(stage: str, key: str, text: str, sets: dict[str, Any] | None = None,
                  kind: str = "knob") -> dict[str, Any]:
    """One piece of advice about config ``key``: a knob to turn (``kind`` "knob") or a ``note``.

    ``sets`` maps every key that must change together to its new value; ``set`` has them as ``--set`` arguments
    (``KEY=VALUE``, YAML values), ready for ``load_settings(path, overrides=entry["set"])``.
    """
    sets = dict(sets or {})
    return {"stage": stage, "kind": kind, "key": key, "values": sets,
            "set": [f"{k}={set_value(v)}" for k, v in sets.items()], "text": text}


def _first_level_suggestion(s: Settings) -> tuple[list[Any], str] | None:
    """A first-level downsample factor of 4 with the same total (same latent); None where it is already >= 4."""
    ae = s.autoencoder
    factors = per_level_factors(ae)
    if len(factors) < 2:
        return None
    new = [list(f) for f in factors]
    changed = False
    for axis in range(ae.spatial_dims):
        first = factors[0][axis]
        total = math.prod(f[axis] for f in factors)
        if first >= 4 or total % 4 or 4 % first:
            continue
        k = 4 // first
        rest = [f[axis] for f in factors[1:]]
        for j in range(len(rest) - 1, -1, -1):  # take the extra factor from the lowest-resolution levels first
            g = math.gcd(rest[j], k)
            rest[j] //= g
            k //= g
        if k != 1:
            continue
        new[0][axis] = 4
        for j, r in enumerate(rest):
            new[j + 1][axis] = r
        changed = True
    if not changed:
        return None
    voxel = [v // f for v, f in zip(s.data.voxel_size, initial_downsample_factor(ae))]  # level 0's size
    shrink = math.prod(n // f for n, f in zip(new[0], factors[0]))
    text = (f"a larger first-level factor ({set_value(compact_factors(factors))} now): same total factor and "
            f"latent, level 1 runs at {shape_text([v // f for v, f in zip(voxel, new[0])])} instead of "
            f"{shape_text([v // f for v, f in zip(voxel, factors[0])])} ({shrink}x fewer voxels); retrains the "
            f"autoencoder")
    return compact_factors(new), text


def _halved(sizes: Sequence[int], multiple: Sequence[int]) -> list[int]:
    """About half of ``sizes`` per axis, a multiple of ``multiple`` (at least one multiple)."""
    return [max(m, (v // 2) // m * m) for v, m in zip(sizes, multiple)]


def _patch_size(s: Settings, multiple: Sequence[int]) -> list[int]:
    """About half of data.voxel_size per axis, a multiple of ``multiple``."""
    return _halved(s.data.voxel_size, multiple)


def _halved_channels(channels: Sequence[int], groups: int, prefix: str) -> dict[str, Any] | None:
    new = [c // 2 for c in channels]
    if min(new) < 1:
        return None
    sets: dict[str, Any] = {f"{prefix}.num_channels": new}
    g = math.gcd(groups, *new)
    if g != groups:
        sets[f"{prefix}.norm_num_groups"] = g
    return sets


def _stage1_knobs(s: Settings, plan: dict[str, Any]) -> list[dict[str, Any]]:
    ae, t = s.autoencoder, s.autoencoder.training
    st = plan["autoencoder"]
    peak = (st.get("measurement") or {}).get("peak_mib")
    knobs: list[dict[str, Any]] = []
    att_mib = sum(a["estimate_mib"] for a in st["attention"])
    attention_knob = None
    if not ae.use_flash_attention and st["attention"]:
        attention_knob = _advice_entry(
            "autoencoder", "autoencoder.use_flash_attention",
            f"attention via scaled_dot_product_attention: no N x N matrix in memory (now ~{mib_text(att_mib)} of "
            f"attention matrices at batch {plan['batch_size']}, {max(a['tokens'] for a in st['attention']):,} "
            f"tokens in the largest)", {"autoencoder.use_flash_attention": True})
    first = _first_level_suggestion(s)
    if first is not None:
        knobs.append(_advice_entry("autoencoder", "autoencoder.downsample_factors", first[1],
                                   {"autoencoder.downsample_factors": first[0]}))
    if plan["precision"] == "fp32":
        knobs.append(_advice_entry("autoencoder", "device.mixed_precision",
                                   "bf16 autocast: about half the activation memory (fp16 on GPUs without bf16)",
                                   {"device.mixed_precision": "bf16"}))
    if not t.use_gradient_checkpointing:
        knobs.append(_advice_entry("autoencoder", "autoencoder.training.use_gradient_checkpointing",
                                   "recompute each encoder/decoder block in backward instead of storing its "
                                   "activations (several times less activation memory, ~30% slower)",
                                   {"autoencoder.training.use_gradient_checkpointing": True}))
    if attention_knob is not None:
        if peak and att_mib >= _ATTENTION_SHARE_FIRST * peak:
            knobs.insert(0, attention_knob)
        else:
            knobs.append(attention_knob)
    high = [lv["level"] for lv in st["levels"][:-1] if lv["attention"]]
    if high:
        value = [bool(a) and i not in high for i, a in enumerate(ae.attention_levels)]
        knobs.append(_advice_entry("autoencoder", "autoencoder.attention_levels",
                                   f"no attention at the high-resolution level(s) {high} (keep it at the lowest one)",
                                   {"autoencoder.attention_levels": value}))
    total = total_downsample_factor(ae)
    multiple = [f * plan["diffusion"]["required_divisor"] for f in total]
    patch = _patch_size(s, multiple)
    fewer = math.prod(s.data.voxel_size) // max(1, math.prod(patch))
    if patch != list(s.data.voxel_size):
        if not uses_random_patches(s.data):
            knobs.append(_advice_entry(
                "autoencoder", "data.crop_mode",
                f"train on random {shape_text(patch)} patches ({fewer}x fewer voxels per step; multiples of "
                f"{shape_text(multiple)} so that stage 2's latents still fit the UNet; validation reconstructs whole "
                f"volumes tile by tile)", {"data.crop_mode": "random_patch", "data.voxel_size": patch}))
        else:
            knobs.append(_advice_entry("autoencoder", "data.voxel_size",
                                       f"smaller random patches ({fewer}x fewer voxels per step)",
                                       {"data.voxel_size": patch}))
    sets = _halved_channels(ae.num_channels, ae.norm_num_groups, "autoencoder")
    if sets is not None:
        knobs.append(_advice_entry("autoencoder", "autoencoder.num_channels",
                                   "half the channels (the full-resolution level's activations dominate; about 4x "
                                   "fewer parameters)", sets))
    return knobs


def _stage2_knobs(s: Settings, plan: dict[str, Any]) -> list[dict[str, Any]]:
    df, t = s.diffusion, s.diffusion.training
    st = plan["diffusion"]
    m = st.get("measurement") or {}
    peak = m.get("peak_mib")
    phases = m.get("phases") or {}
    knobs: list[dict[str, Any]] = []
    if not t.cache_latents and phases.get("encode", 0) >= _ENCODE_SHARE * phases.get("train step", math.inf):
        knobs.append(_advice_entry(
            "diffusion", "diffusion.training.cache_latents",
            f"encoding the volume alone ({mib_text(phases['encode'])}) reaches the step's peak: encode the training "
            f"set once and train on stored latents (no augmentation in stage 2)",
            {"diffusion.training.cache_latents": True}))
    att_mib = sum(a["estimate_mib"] for a in st["attention"])
    attention_knob = None
    if not df.use_flash_attention and st["attention"]:
        attention_knob = _advice_entry(
            "diffusion", "diffusion.use_flash_attention",
            f"attention via scaled_dot_product_attention (now ~{mib_text(att_mib)} of attention matrices at batch "
            f"{plan['batch_size']})", {"diffusion.use_flash_attention": True})
        if peak and att_mib >= _ATTENTION_SHARE_FIRST * peak:
            knobs.append(attention_knob)
            attention_knob = None
    if plan["precision"] == "fp32":
        knobs.append(_advice_entry("diffusion", "device.mixed_precision",
                                   "bf16 autocast: about half the activation memory (fp16 on GPUs without bf16)",
                                   {"device.mixed_precision": "bf16"}))
    if attention_knob is not None:
        knobs.append(attention_knob)
    if len(df.attention_levels) > 1 and df.attention_levels[0]:
        knobs.append(_advice_entry("diffusion", "diffusion.attention_levels",
                                   "no attention at the highest-resolution UNet level",
                                   {"diffusion.attention_levels": [False, *map(bool, df.attention_levels[1:])]}))
    sets = _halved_channels(df.num_channels, df.norm_num_groups, "diffusion")
    if sets is not None:
        new = sets["diffusion.num_channels"]
        heads = per_level(df.num_head_channels, len(new))
        new_heads = [math.gcd(h, c) if h > 0 else 0 for h, c in zip(heads, new)]
        if new_heads != heads:
            sets["diffusion.num_head_channels"] = new_heads
        knobs.append(_advice_entry("diffusion", "diffusion.num_channels",
                                   "half the UNet channels (about 4x fewer parameters, less activation memory)", sets))
    if any(r > 1 for r in per_level(df.num_res_blocks, len(df.num_channels))):
        knobs.append(_advice_entry("diffusion", "diffusion.num_res_blocks", "one residual block per level",
                                   {"diffusion.num_res_blocks": 1}))
    knobs.append(_advice_entry(
        "diffusion", "data.voxel_size",
        f"a smaller latent (UNet memory scales with its {math.prod(st['latent_shape'][2:]):,} voxels): a smaller "
        f"data.voxel_size or larger autoencoder.downsample_factors (retrains the autoencoder)"))
    return knobs


def _inference_knobs(s: Settings, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Exact tiles bound the autoencoder's memory outside training: tile the whole volumes, or use smaller tiles."""
    info = plan["inference"]
    total = total_downsample_factor(s.autoencoder)
    knobs: list[dict[str, Any]] = []
    tile = info["encode_tile"]
    new = _halved(info["volume"] if tile is None else tile, total)
    if tile is None:
        text = (f"encode and decode in exact tiles of {shape_text(new)} instead of whole "
                f"{shape_text(info['volume'])} volumes: the same numbers, memory bounded by the tile (about 3x the "
                f"compute)")
    else:
        text = f"smaller exact tiles ({shape_text(tile)} now): less memory, more recomputed halo"
    if new != tile:
        sets: dict[str, Any] = {"autoencoder.tile_size": new}
        if s.sampling.tile_size is not None:
            sets["sampling.tile_size"] = new
        knobs.append(_advice_entry("inference", "autoencoder.tile_size", text, sets))
    if info["sampling_batch_size"] > 1:
        knobs.append(_advice_entry("inference", "sampling.batch_size",
                                   f"decode one sample at a time ({info['sampling_batch_size']} now)",
                                   {"sampling.batch_size": 1}))
    return knobs


def _batch_note(stage: str, key: str, batch: int, measured: int) -> dict[str, Any] | None:
    if batch <= measured:
        return None
    section = key.rsplit(".", 1)[0]
    return _advice_entry(
        stage, key,
        f"measured at batch {measured} but {key} is {batch}: activations grow about {batch / measured:g}x; if that "
        f"does not fit, use {key}=1 with {section}.gradient_accumulation_steps={batch} (same effective batch)",
        kind="note")


def apply_budget(plan: dict[str, Any], settings: Settings, budget_gb: float | None) -> dict[str, Any]:
    """(Re)compute ``plan["verdicts"]`` and ``plan["advice"]`` for a memory budget in GiB, without measuring again.

    A stage fits when what its measured step needs (:func:`memory_need`: the peak on CPU; on CUDA the reserved memory
    plus the CUDA context) is at most the budget. Without a measurement nothing is claimed, except
    "does not fit" when the weights, gradients and Adam states alone (16 bytes per trainable parameter, 4 per frozen
    one) exceed the budget. Returns ``plan`` (changed in place).
    """
    plan["budget_gb"] = budget_gb
    plan["budget_mib"] = budget = None if budget_gb is None else budget_gb * 1024
    verdicts: dict[str, Any] = {}
    advice: list[dict[str, Any]] = []
    for stage, knobs_fn, batch_key in (("autoencoder", _stage1_knobs, "autoencoder.training.batch_size"),
                                      ("diffusion", _stage2_knobs, "diffusion.training.batch_size")):
        st = plan[stage]
        m = st.get("measurement")
        if budget is None:
            verdicts[stage] = None
            continue
        if m and m.get("ok"):
            need, basis = memory_need(m)
            fits = need <= budget
            verdicts[stage] = {"fits": fits, "peak_mib": m["peak_mib"], "need_mib": need, "budget_mib": budget,
                               "headroom_mib": budget - need, "basis": basis}
            if not fits:
                advice += knobs_fn(settings, plan)
        else:
            p = st["parameters"]
            lower = (16 * p.get("trainable", 0) + 4 * p.get("frozen_autoencoder", 0)) / MIB
            if lower > budget:
                verdicts[stage] = {"fits": False, "peak_mib": None, "lower_bound_mib": lower, "budget_mib": budget,
                                   "basis": "weights, gradients and Adam states alone, 16 bytes per parameter"}
                prefix = "autoencoder" if stage == "autoencoder" else "diffusion"
                group = settings.autoencoder if stage == "autoencoder" else settings.diffusion
                advice.append(_advice_entry(stage, f"{prefix}.num_channels",
                                            "fewer channels: the parameters alone exceed the budget",
                                            _halved_channels(group.num_channels, group.norm_num_groups, prefix)))
            else:
                error = (m or {}).get("error", "")
                basis = error if error.startswith("not measured") else "not measured" + (f" ({error})" if error else "")
                verdicts[stage] = {"fits": None, "peak_mib": None, "lower_bound_mib": lower, "budget_mib": budget,
                                   "basis": basis}
        note = _batch_note(stage, batch_key, st["training_batch_size"], plan["batch_size"])
        if note is not None:
            advice.append(note)
    inference = plan.get("inference")
    if inference is not None:  # plans written before inference was measured have none
        m = inference.get("measurement")
        if budget is None:
            verdicts["inference"] = None
        elif m and m.get("ok"):
            need, basis = memory_need(m)
            verdicts["inference"] = {"fits": need <= budget, "peak_mib": m["peak_mib"], "need_mib": need,
                                     "budget_mib": budget, "headroom_mib": budget - need, "basis": basis}
            if need > budget:
                advice += _inference_knobs(settings, plan)
        else:  # unmeasured: only the autoencoder's weights (4 bytes per parameter) are certain
            error = (m or {}).get("error", "")
            lower = 4 * plan["autoencoder"]["parameters"].get("autoencoder", 0) / MIB
            sure = lower > budget
            verdicts["inference"] = {"fits": False if sure else None, "peak_mib": None, "lower_bound_mib": lower,
                                     "budget_mib": budget, "lower_bound_what": "the autoencoder's weights alone need",
                                     "basis": "the autoencoder's weights alone, 4 bytes per parameter" if sure else
                                     "not measured" + (f" ({error})" if error else "")}
    plan["verdicts"] = verdicts
    plan["advice"] = advice
    return plan


