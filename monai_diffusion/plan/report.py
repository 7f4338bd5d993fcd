"""The plan as text: :func:`format_plan` turns a :func:`monai_diffusion.plan.make_plan` dict (or the same dict read
back from ``--json``) into the report ``monai-diffusion-plan`` prints."""

from __future__ import annotations

import math
from typing import Any

from ..settings import set_value
from .geometry import compact_factors, mib_text, shape_text


def _format_levels(levels: list[dict], attention_key: str = "attention") -> str:
    parts = []
    for lv in levels:
        text = f"{lv['level']}: {shape_text(lv['spatial'])} x {lv['channels']} ch"
        if lv.get(attention_key):
            text += " +attn"
        parts.append(text)
    return " | ".join(parts)


def _format_attention(entries: list[dict]) -> list[str]:
    lines = []
    for a in entries:
        kind = "flash (no N x N matrix)" if a["flash"] else f"materialised: ~{mib_text(a['estimate_mib'])} for backward"
        lines.append(f"    {a['where']}: {a['tokens']:,} tokens, {a['heads']} head(s), {a['blocks']} block(s), {kind}")
    return lines


def _format_measurement(m: dict | None) -> list[str]:
    if m is None:
        return ["  peak memory      not measured (--no-measure)"]
    if not m.get("ok"):
        return [f"  peak memory      {m.get('error')}"]
    lines = [f"  peak memory      {mib_text(m['peak_mib'])}  (models/inputs {mib_text(m['static_mib'])} + step "
             f"{mib_text(m['step_mib'])}; {m['precision']}, batch {m['batch']})"]
    if len(m.get("phases", {})) > 1:
        lines.append("    phases         " + ", ".join(f"{k} {mib_text(v)}" for k, v in m["phases"].items())
                     + " (encode: encoding the batch alone)")
    if "reserved_mib" in m:
        lines.append(f"    CUDA reserved  {mib_text(m['reserved_mib'])} (caching allocator; plus the CUDA context)")
    lines.append(f"  step time        {m['step_seconds']:.3f} s (warm-up step {m['first_step_seconds']:.3f} s; "
                 f"{m['steps']} step(s) measured after it)")
    for note in m.get("notes", []):
        lines.append(f"    note: {note}")
    return lines


def _format_verdict(v: dict | None) -> list[str]:
    if v is None:
        return []
    budget = mib_text(v["budget_mib"])
    need = v.get("need_mib", v.get("peak_mib"))  # plans written before need_mib: the peak
    how = f" ({v['basis']})" if v.get("basis", "measured") != "measured" else ""
    if v["fits"] is True:
        pct = 100 * v["headroom_mib"] / v["budget_mib"] if v["budget_mib"] else 0
        return [f"  budget           FITS: {mib_text(need)} of {budget} ({mib_text(v['headroom_mib'])}, "
                f"{pct:.0f}% headroom){how}"]
    if v["fits"] is False and v.get("peak_mib") is not None:
        return [f"  budget           DOES NOT FIT: {mib_text(need)} > {budget} "
                f"(over by {mib_text(-v['headroom_mib'])}){how}"]
    if v["fits"] is False:
        return [f"  budget           DOES NOT FIT: at least {mib_text(v['lower_bound_mib'])} > {budget} ({v['basis']})"]
    hint = "; measure (drop --no-measure) to know" if v["basis"] == "not measured" else ""
    what = v.get("lower_bound_what", "weights, gradients and Adam states alone need")
    return [f"  budget           unknown: {v['basis']}; {what} {mib_text(v['lower_bound_mib'])} of {budget}{hint}"]


def format_plan(plan: dict[str, Any]) -> str:
    """Human-readable report of a :func:`make_plan` dict (also works on the dict read back from ``--json``)."""
    s1, s2 = plan["autoencoder"], plan["diffusion"]
    out: list[str] = []
    title = "monai-diffusion plan" + (f": {plan['config']}" if plan.get("config") else "")
    out.append(title)
    if plan.get("overrides"):
        out.append("  overrides: " + " ".join(plan["overrides"]))
    precision = {"fp32": "fp32 (no autocast)", "fp16": "fp16 autocast", "bf16": "bf16 autocast"}[plan["precision"]]
    out.append(f"device: {plan['device_name']}; precision: {precision} "
               f"(device.mixed_precision={set_value(plan['precision_setting'])})")
    if plan.get("precision_note"):
        out.append(f"  note: {plan['precision_note']}")
    out.append("")

    # ---- stage 1
    p1 = s1["parameters"]
    savers = [name for name, on in (("gradient checkpointing", s1["gradient_checkpointing"]),
                                    ("flash attention", s1["flash_attention"]),
                                    (f"{plan['precision']} autocast", plan["precision"] != "fp32")) if on]
    out.append("Stage 1: autoencoder (AutoencoderKL)")
    out.append(f"  input            {tuple(s1['input_shape'])}   (config trains with batch_size "
               f"{s1['training_batch_size']}, gradient_accumulation_steps {s1['gradient_accumulation_steps']})")
    out.append(f"  latent           {tuple(s1['latent_shape'])}")
    initial = s1.get("initial_downsample_factor", [1])
    initial_text = ("" if set(initial) == {1}
                    else f"initial_downsample_factor {set_value(compact_factors([initial])[0])} x ")
    out.append(f"  total factor     {shape_text(s1['total_factor'])} per axis ({initial_text}downsample_factors "
               f"{set_value(compact_factors(s1['downsample_factors']))})")
    if s1["compression_ratio"]:
        out.append(f"  compression      {s1['compression_ratio']:.1f}x fewer values "
                   f"({math.prod(s1['input_shape'][1:]):,} -> {math.prod(s1['latent_shape'][1:]):,} per volume)")
    out.append("  encoder levels   " + _format_levels(s1["levels"])
               + ("" if s1["custom_upsample_factors"] else "  (decoder mirrors)"))
    if s1["attention"]:
        out.append("  attention")
        out += _format_attention(s1["attention"])
    out.append(f"  parameters       autoencoder {p1['autoencoder']:,}; discriminator {p1['discriminator']:,}")
    out.append(f"  memory savers    {', '.join(savers) if savers else 'none'}")
    out += _format_measurement(s1["measurement"])
    out += _format_verdict((plan.get("verdicts") or {}).get("autoencoder"))
    out.append("")

    # ---- stage 2
    p2 = s2["parameters"]
    out.append("Stage 2: latent diffusion UNet (DiffusionModelUNet)")
    out.append(f"  channels         in {s2['in_channels']} / out {s2['out_channels']} = latent_channels "
               f"{s2['latent_channels']}")
    latent = shape_text(s2["latent_shape"][2:])
    out.append(f"  latent           {latent}; {s2['num_levels']} level(s) halve it {s2['num_levels'] - 1} time(s), "
               f"so each axis must be divisible by {s2['required_divisor']}: it is (checked by settings validation)")
    out.append("  levels           " + _format_levels(s2["levels"]))
    if s2["attention"]:
        out.append("  attention")
        out += _format_attention(s2["attention"])
    extra = f"; frozen autoencoder {p2['frozen_autoencoder']:,}" if p2.get("frozen_autoencoder") else ""
    out.append(f"  parameters       UNet {p2['unet']:,}{extra}")
    out.append(f"  latents          {'encoded in every step' if s2['encodes_images'] else 'cached'}"
               f" (diffusion.training.cache_latents={set_value(not s2['encodes_images'])}); "
               f"training batch_size {s2['training_batch_size']}")
    out += _format_measurement(s2["measurement"])
    out += _format_verdict((plan.get("verdicts") or {}).get("diffusion"))
    out.append("")

    # ---- inference
    inf = plan.get("inference")
    if inf is not None:
        out.append("Inference: the autoencoder outside training")
        out.append(f"  encode           one {shape_text(inf['volume'])} volume (latent caching, stage 2, evaluate) "
                   + (f"in exact tiles of {shape_text(inf['encode_tile'])} (autoencoder.tile_size)"
                      if inf["encode_tile"] else "whole (autoencoder.tile_size=null)"))
        out.append(f"  decode           {inf['sampling_batch_size']} latent(s) (sampling.batch_size) "
                   + (f"in exact tiles of {shape_text(inf['decode_tile'])} ({inf['decode_tile_key']})"
                      if inf["decode_tile"] else "whole (sampling.tile_size and autoencoder.tile_size null)"))
        m = inf.get("measurement")
        if m is None:
            out.append("  peak memory      not measured (--no-measure)")
        elif not m.get("ok"):
            out.append(f"  peak memory      {m.get('error')}")
        else:
            out.append(f"  peak memory      {mib_text(m['peak_mib'])}  (encode {mib_text(m['phases']['encode'])}, "
                       f"decode {mib_text(m['phases']['decode'])}; weights {mib_text(m['static_mib'])}; "
                       f"{m['precision']})")
            out.append(f"  time             encode {m['seconds']['encode']:.2f} s, decode {m['seconds']['decode']:.2f} s "
                       f"(random weights, one pass each)")
        out += _format_verdict((plan.get("verdicts") or {}).get("inference"))
        out.append("")

    # ---- how it was measured, advice
    if plan.get("measure_method"):
        out.append(f"Memory: one training step per stage (engine.train_step on the real stage, after a warm-up step) "
                   f"at batch {plan['batch_size']}, each in a fresh process on {plan['device']}, measured as "
                   f"fast_dev_run measures its last step; inference: one encode and one decode pass in a fresh "
                   f"process; method: {plan['measure_method']}.")
    elif not plan["measured"]:
        out.append("Memory: not measured (--no-measure).")
    advice = plan.get("advice") or []
    knobs = [a for a in advice if a.get("kind", "knob") == "knob"]
    notes = [a for a in advice if a.get("kind") == "note"]
    if knobs:
        out.append("Advice (most effective first):")
        n = 0
        for stage, title in (("autoencoder", "stage 1"), ("diffusion", "stage 2"), ("inference", "inference")):
            items = [a for a in knobs if a["stage"] == stage]
            if not items:
                continue
            out.append(f"  {title}:")
            for a in items:
                n += 1
                head = " ".join(f"--set {x}" for x in a["set"]) if a["set"] else a["key"]
                out.append(f"    {n}. {head}: {a['text']}")
    verdicts = [v for v in (plan.get("verdicts") or {}).values()]
    if verdicts and all(v and v.get("fits") for v in verdicts):
        what = "Both stages and inference fit" if "inference" in plan.get("verdicts", {}) else "Both stages fit"
        out.append(f"{what} the {mib_text(plan['budget_mib'])} budget.")
    for a in notes:
        out.append(f"Note: {a['text']}")
    return "\n".join(out).rstrip() + "\n"


