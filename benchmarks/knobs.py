"""The execution knobs, measured: one training step's time and peak memory with ``device.channels_last``,
``device.compile``, bf16 autocast (``device.mixed_precision``) and SDPA attention (``use_flash_attention``), each
alone and in the best combination, as ratios to the plain configuration (fp32, contiguous, eager, the config's own
attention) measured in the same run.

Networks: the quickstart's autoencoder (32^3, batch 2) and UNet (its 3 x 8^3 cached latents, batch 4, EMA), and the
8x autoencoder of ``examples/ldm_config_8x_downsample.yaml`` (channels 32/64/64, factors [4, 2], attention at the
deepest level, gradient checkpointing as that config has it) at a CPU-feasible ``--large-size``. Every measurement
is a fresh process (``plan``'s own build and step: ``plan.measure.build_stage`` / ``measure_stage``): a warm-up step
(with torch.compile: the compiling), then ``--steps`` timed steps whose median is the step time; the peak is the
largest of those steps (``memory.PeakMeter``). bf16 is measured a second time with oneDNN and ATen held to AVX2
(``ONEDNN_MAX_CPU_ISA=AVX2``, ``ATEN_CPU_CAPABILITY=avx2``), as a CPU without avx512_bf16/AMX runs it, against fp32
under the same limit. With ``--repeats N`` the whole series runs N times (interleaved) and medians are reported.
The 1-minute load average is recorded around each measurement (the machine may be shared); on the CPU each
measurement uses one torch thread and times a step by the process's CPU time, which a shared machine disturbs far
less than wall time (``--threads``, ``--timing``).

    python benchmarks/knobs.py [--device cuda] [--steps 5] [--repeats 1] [--large-size 64 64 32] [--threads N]
                               [--timing cpu|wall] [--models NAME ...] [--variants NAME ...] [--out STEM]

Results: ``benchmarks/results/knobs_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from _common import REPO_ROOT, RESULTS_DIR, machine_info, machine_line, markdown_table, write_results

CONFIGS = REPO_ROOT / "monai_diffusion" / "config" / "examples"
# data paths are not read by a measured step; settings validation wants them to exist
_NO_DATA = ["data.train_data_dir=null", "data.val_data_dir=null", "data.datalist=null",
            "data.synthetic={enabled: true}", "diffusion.checkpoints.autoencoder_path=null",
            "device.mixed_precision=false", "device.channels_last=false", "device.compile=false"]
# (name, config, stage, batch, overrides); the large autoencoder's size is added from --large-size
MODELS = [
    ("quickstart autoencoder", "quickstart.yaml", "autoencoder", 2, []),
    ("quickstart UNet", "quickstart.yaml", "diffusion", 4, []),
    ("8x autoencoder", "ldm_config_8x_downsample.yaml", "autoencoder", 1, []),
]
# variant -> what it changes: channels_last, compile, bf16, sdpa (flip the config's use_flash_attention), env
SINGLE = {
    "fp32": {},
    "channels_last": {"channels_last": True},
    "bf16": {"bf16": True},
    "compile": {"compile": True},
    "sdpa": {"sdpa": True},
}
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
EMULATED = {"fp32 (AVX2 only)": {"env": AVX2_ENV}, "bf16 (AVX2 only)": {"bf16": True, "env": AVX2_ENV}}
WIN = 0.97  # a knob "wins" when its median step time is below this fraction of fp32's


def _flip_attention(settings: Any, section: str) -> str:
    current = getattr(settings, section).use_flash_attention
    return f"{section}.use_flash_attention={'false' if current else 'true'}"


def worker(request: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process: build the stage as ``plan`` does, with the variant's knobs."""
    import torch

    from monai_diffusion.plan.measure import build_stage, measure_stage
    from monai_diffusion.runtime import Runtime
    from monai_diffusion.settings import load_settings

    knobs = request["knobs"]
    overrides = _NO_DATA + request["overrides"]
    s = load_settings(CONFIGS / request["config"], overrides=overrides, check_paths=False, require_data=False)
    if knobs.get("sdpa"):
        section = "autoencoder" if request["stage"] == "autoencoder" else "diffusion"
        s = load_settings(CONFIGS / request["config"], overrides=overrides + [_flip_attention(s, section)],
                          check_paths=False, require_data=False)
    if request.get("threads"):
        torch.set_num_threads(request["threads"])
    device = torch.device(request["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    runtime = Runtime(device, torch.bfloat16 if knobs.get("bf16") else None,
                      channels_last=bool(knobs.get("channels_last")), compile=bool(knobs.get("compile")))
    stage, batch, epoch, notes = build_stage(request["stage"], s, runtime, request["batch"])
    clip = getattr(s, request["stage"]).training.grad_clip_norm
    result = measure_stage(stage, batch, epoch, runtime, steps=request["steps"], grad_clip_norm=clip)
    result["fell_back"] = any(c.eager for c in getattr(stage, "compiled", {}).values())
    result["notes"] = notes
    result["torch_threads"] = torch.get_num_threads()
    return result


def measure(model: tuple, variant: str, knobs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run one (model, variant) measurement in a fresh process; the result with the load average around it."""
    name, config, stage, batch, overrides = model
    if name == "8x autoencoder":
        overrides = overrides + [f"data.voxel_size={list(args.large_size)}"]
    request = {"config": config, "stage": stage, "batch": batch, "overrides": overrides, "steps": args.steps,
               "device": args.device, "knobs": {k: v for k, v in knobs.items() if k != "env"}, "threads": args.threads}
    env = {**os.environ, **knobs.get("env", {})}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(request)], capture_output=True, text=True,
                          env=env, timeout=args.timeout)
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {"model": name, "variant": variant, "knobs": request["knobs"], "env": knobs.get("env", {}),
                           "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
                           "process_seconds": round(wall, 1)}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        out.update(ok=False, error=tail[:300])
    else:
        out.update(ok=True, **json.loads(lines[-1][len("RESULT "):]))
        out["step_wall_median_seconds"] = statistics.median(out["step_seconds_each"])
        out["step_cpu_median_seconds"] = statistics.median(out["step_cpu_seconds_each"])
        # the figure ratios are taken of: CPU time on the CPU (steady on a shared machine), else wall time
        out["step_median_seconds"] = out["step_cpu_median_seconds" if args.timing == "cpu" else
                                         "step_wall_median_seconds"]
    print(f"{name:24s} {variant:18s} " + (f"step {out['step_median_seconds']:.3f} s ({args.timing}; wall "
          f"{out['step_wall_median_seconds']:.3f} s), first {out['first_step_seconds']:.1f} s, "
          f"peak {out['peak_mib']:.0f} MiB" if out["ok"] else f"FAILED: {out['error']}")
          + f" (load {out['load_before']} -> {out['load_after']})", flush=True)
    return out


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get("ok")]
    return statistics.median(values) if values else None


def summarise(results: list[dict[str, Any]], model: str, variant: str, base: str = "fp32") -> dict[str, Any] | None:
    """Medians over repeats of one (model, variant) and its ratios to ``base`` of the same model."""
    runs = [r for r in results if r["model"] == model and r["variant"] == variant]
    ref = [r for r in results if r["model"] == model and r["variant"] == base]
    step, first, peak = (_median(runs, k) for k in ("step_median_seconds", "first_step_seconds", "peak_mib"))
    ref_step, ref_first, ref_peak = (_median(ref, k) for k in ("step_median_seconds", "first_step_seconds", "peak_mib"))
    if step is None or ref_step is None:
        return None
    return {"model": model, "variant": variant, "base": base, "repeats": len([r for r in runs if r.get("ok")]),
            "step_seconds": step, "first_step_seconds": first, "peak_mib": peak,
            "time_ratio": step / ref_step, "peak_ratio": peak / ref_peak,
            "extra_first_step_seconds": first - ref_first,
            "fell_back": any(r.get("fell_back") for r in runs if r.get("ok")),
            "load": [r["load_before"] for r in runs]}


def best_knobs(results: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """The knobs that won alone (step time below WIN x fp32's), combined."""
    combo: dict[str, Any] = {}
    for variant in ("channels_last", "bf16", "compile", "sdpa"):
        row = summarise(results, model, variant)
        if row is not None and row["time_ratio"] < WIN and not row["fell_back"]:
            combo.update(SINGLE[variant])
    return combo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (after the warm-up)")
    parser.add_argument("--repeats", type=int, default=1, help="times the whole series runs; medians are reported")
    parser.add_argument("--large-size", type=int, nargs=3, default=[64, 64, 32],
                        help="volume size of the 8x autoencoder (each axis divisible by 8)")
    parser.add_argument("--models", nargs="*", default=[m[0] for m in MODELS])
    parser.add_argument("--variants", nargs="*", default=None,
                        help="measure only these variants (fp32 is always measured: the ratios need it)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per measurement process")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per measurement (default: 1 on the CPU, torch's own on CUDA)")
    parser.add_argument("--timing", choices=("cpu", "wall"), default=None,
                        help="step time as the process's CPU time or wall time (default: cpu on the CPU, wall on "
                             "CUDA)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    on_cpu = args.device == "cpu"
    args.threads = args.threads if args.threads is not None else (1 if on_cpu else 0)
    args.timing = args.timing or ("cpu" if on_cpu else "wall")
    models = [m for m in MODELS if m[0] in args.models]
    variants = dict(SINGLE)
    if args.device == "cpu":
        variants.update(EMULATED)
    if args.variants is not None:
        unknown = sorted(set(args.variants) - set(variants))
        if unknown:
            parser.error(f"--variants {unknown}: expected some of {list(variants)}")
        keep = {"fp32", *args.variants} | ({"fp32 (AVX2 only)"} if "bf16 (AVX2 only)" in args.variants else set())
        variants = {k: v for k, v in variants.items() if k in keep}
    report: dict[str, Any] = {"machine": machine_info(args.device), "steps": args.steps, "repeats": args.repeats,
                              "threads": args.threads or None, "timing": args.timing,
                              "large_size": args.large_size, "win_threshold": WIN, "runs": []}
    started = time.perf_counter()
    for _ in range(args.repeats):
        for model in models:
            for variant, knobs in variants.items():
                report["runs"].append(measure(model, variant, knobs, args))
    combos = {}
    for model in models:
        combos[model[0]] = best_knobs(report["runs"], model[0])
        label = "best: " + (" + ".join(k for k in ("channels_last", "bf16", "compile", "sdpa") if combos[model[0]].get(k))
                            or "fp32")
        if len([k for k in combos[model[0]] if k != "env"]) >= 2:  # a single winner was measured already
            for _ in range(args.repeats):
                report["runs"].append(measure(model, label, combos[model[0]], args))
        combos[model[0]] = {"label": label, **combos[model[0]]}
    report["best"] = combos
    report["seconds"] = round(time.perf_counter() - started, 1)

    rows, summary = [], []
    for model in models:
        labels = list(dict.fromkeys(r["variant"] for r in report["runs"] if r["model"] == model[0]))
        for variant in labels:
            base = "fp32 (AVX2 only)" if variant == "bf16 (AVX2 only)" else "fp32"
            row = summarise(report["runs"], model[0], variant, base)
            if row is None:
                failed = next((r for r in report["runs"] if r["model"] == model[0] and r["variant"] == variant), {})
                rows.append([model[0], variant, "failed", "", "", "", "", failed.get("error", "")[:80]])
                continue
            summary.append(row)
            rows.append([model[0], variant + ("" if base == "fp32" else f" (vs {base})"),
                         f"{row['step_seconds']:.3f}", f"**{row['time_ratio']:.2f}**", f"{row['peak_mib']:,.0f}",
                         f"{row['peak_ratio']:.2f}", f"{row['first_step_seconds']:.1f}",
                         ("fell back to eager" if row["fell_back"] else "")
                         + (f"compile + warm-up {row['extra_first_step_seconds']:+.1f} s vs fp32's first step"
                            if variant == "compile" else "")])
    report["summary"] = summary
    table = markdown_table(["network", "variant", f"step s ({args.timing}, median)", "time / fp32", "peak MiB", "peak / fp32",
                            "first step s", "note"], rows)
    loads = [r["load_before"] for r in report["runs"]] + [r["load_after"] for r in report["runs"]]
    md = (f"# Execution knobs: one training step ({args.device})\n\n{machine_line(report['machine'])}\n\n"
          f"Each row: a fresh process, `plan`'s build of the stage and its training step; a warm-up step (with "
          f"compile: the compiling), then {args.steps} timed steps, median; {args.repeats} repeat(s), medians over "
          f"repeats; {args.threads or 'default'} torch thread(s); step time as "
          f"{'the process CPU time (steadier than wall time on a shared machine)' if args.timing == 'cpu' else 'wall time'}"
          f"; first step in wall time. Ratios are to the plain configuration (fp32, contiguous, eager, the config's own attention) of "
          f"the same network in the same run; \"AVX2 only\" rows hold oneDNN and ATen to AVX2 (a CPU without "
          f"avx512_bf16/AMX) and are compared with fp32 under the same limit. sdpa flips the config's "
          f"`use_flash_attention` (quickstart: explicit matrix -> SDPA; 8x: SDPA -> explicit matrix). The 8x "
          f"autoencoder runs at {'x'.join(map(str, args.large_size))}, batch 1. Best: the knobs whose step time was "
          f"below {WIN} x fp32's alone, combined. 1-min load average during the run: {min(loads):.1f} to "
          f"{max(loads):.1f} on {report['machine']['cpu_cores']} cores; whole run {report['seconds']:.0f} s.\n\n"
          f"{table}\n")
    write_results(args.out or RESULTS_DIR / f"knobs_{args.device.split(':')[0]}", report, md)
    print(md)


if __name__ == "__main__":
    main()
