"""Memory and speed of one autoencoder training step per downsample factor, precision, attention and checkpointing.

Each configuration (a factor setting plus a variant) is measured in its own Python process so that peak memory
starts from a clean state. The step is the stage-1 generator step without the adversarial part: forward pass,
L1 + 1e-6 * KL loss, backward pass, Adam step, at batch 1. Ratios are taken against MONAI core's AutoencoderKL at
its default 4x compression in fp32, measured in the same run.

On CPU, time ratios use the process CPU time per step (robust to other jobs sharing the cores; wall time is
reported too), and memory comes from a second, untimed single-step process run with ``MALLOC_MMAP_THRESHOLD_``
set so that freed tensors leave the RSS (see ``add_clean_memory``). On CUDA both come from the timed process:
synchronised wall time and ``torch.cuda.max_memory_allocated``.

Examples::

    python benchmarks/compression.py                      # default CPU run, writes results/compression_cpu.*
    python benchmarks/compression.py --device cuda --size 256 256 64 --variants bf16 fp16 sdpa ckpt recipe
    python benchmarks/compression.py --runs core-4x 8x:recipe 8x:bf16+sdpa --steps 5

Factor settings: see ``autoencoder_bench.FACTOR_SETTINGS``. Variants: ``fp32`` | ``bf16`` | ``fp16`` (CUDA only),
optionally joined with ``+sdpa`` (torch scaled-dot-product attention) and ``+ckpt`` (gradient checkpointing);
``recipe`` = ``bf16+sdpa+ckpt``, what ``ldm_config_8x_downsample.yaml`` sets.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import _common
import autoencoder_bench as common

DEFAULT_SIZE = [64, 64, 64]
DEFAULT_FACTORS = ["core-4x", "4x", "8x", "16x-8-2", "16x-4-4", "aniso"]
DEFAULT_VARIANTS = ["bf16", "sdpa+ckpt", "bf16+sdpa", "recipe", "fp16", "fp16+sdpa+ckpt"]  # fp16: CUDA only
DEFAULT_VARIANT_FACTORS = ["8x"]
DEFAULT_EXTRA = ["4x:sdpa", "16x-8-2:sdpa+ckpt"]
MEM_TARGET, TIME_TARGET, FORK_TOLERANCE = 0.38, 0.71, 1.10


def default_runs(args: argparse.Namespace) -> list[str]:
    """fp32 rows for every factor setting, then each variant for the variant factor settings, then extras."""
    runs = [f"{s}:fp32" for s in args.factors]
    runs += [f"{s}:{v}" for s in args.variant_factors for v in args.variants]
    runs += args.extra
    if args.device == "cpu":
        runs = [r for r in runs if "fp16" not in r]
    out: list[str] = []
    for r in runs:  # keep order, drop duplicates
        s, v = common.parse_run(r)
        if f"{s}:{v}" not in out:
            out.append(f"{s}:{v}")
    if common.BASELINE not in out:
        out.insert(0, common.BASELINE)
    return out


def memory_anatomy(size: list[int]) -> list[list]:
    """Back-of-envelope sizes of the tensors that dominate memory, per factor setting (fp32 bytes).

    One first-level activation is CHANNELS[0] x all input voxels; one attention matrix is tokens x tokens where the
    tokens are the voxels of the last (attention) level. The encoder and decoder each hold two attention blocks
    (one at the last level, one non-local), and without SDPA every block keeps its softmax output for backward.
    """
    voxels = math.prod(size)
    rows = []
    for name, (impl, factors, extra, label) in common.FACTOR_SETTINGS.items():
        if name == "core-4x-fc":
            continue
        f = common.total_factor(factors, extra)
        tokens = math.prod(s // a for s, a in zip(size, f))
        first = voxels * common.CHANNELS[0] * 4 / common.MIB
        attn = tokens * tokens * 4 / common.MIB
        rows.append([name, "x".join(map(str, f)), f"{first:.0f}", tokens, f"{attn:.1f}", f"{4 * attn:.0f}"])
    return rows


def fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def render_markdown(report: dict) -> str:
    """The results as Markdown: machine, command, main table, target checks, memory anatomy."""
    size = report["size"]
    lines = [
        f"# Autoencoder training step per downsample factor ({report['device']})",
        "",
        _common.machine_line(report["machine"]),
        "",
        f"Command: `{report['command']}`  ",
        f"Input 1 x 1 x {' x '.join(map(str, size))}, batch 1; channels {list(common.CHANNELS)}, latent_channels 3, "
        "num_res_blocks 1, norm_num_groups 32, attention only at the last level + non-local attention in encoder and "
        f"decoder. Median of {report['steps']} steps after {report['warmup']} warm-up step(s)"
        + (
            f" in each of {report['repeats']} processes per configuration (run round-robin); memory = median over "
            "those processes of "
            if report.get("repeats", 1) > 1
            else ", each configuration in its own process; memory = "
        )
        + (
            "peak `torch.cuda.max_memory_allocated` minus the allocation after building model, optimizer and input."
            if report["device"] == "cuda"
            else (
                "peak RSS (`ru_maxrss`) minus the RSS after building model, optimizer and input, measured in a second, "
                "untimed process that runs one step with `MALLOC_MMAP_THRESHOLD_=131072` (every large tensor on its "
                "own mmap, so freed memory leaves the RSS and the peak is repeatable to ~1%), plus Adam's state; the "
                "column 'peak RSS, default malloc' is the same quantity from the timed process, which also holds "
                "heap fragmentation (varies by up to ~10% between identical runs)."
                if str(report.get("memory_basis", "")).startswith("separate")
                else "peak RSS (`ru_maxrss`) minus the RSS after building model, optimizer and input."
            )
        )
        + f" Ratios against `{common.BASELINE}` from this run. "
        + (
            "Time ratio = ratio of median process CPU time per step (user + system seconds of all threads), "
            "which is robust to other processes sharing the cores; wall ratio = ratio of median wall-clock step "
            "times, comparable only when the load average stayed below the core count. "
            if report["device"] == "cpu"
            else "Time ratio = ratio of median wall-clock step times (CUDA-synchronised). "
        )
        + f"Total wall time {report['wall_s'] / 60:.1f} min.",
        "",
    ]
    header = [
        "run",
        "model",
        "total factor",
        "precision",
        "SDPA",
        "ckpt",
        "latent shape",
        "latent elems",
        "compression",
        "params",
        "median wall (s)",
        "median CPU (s)",
        "time ratio",
        "wall ratio",
        "peak (MiB)",
        "memory ratio",
        "peak RSS, default malloc (MiB)",
        "load before/after",
    ]
    rows = []
    for r in report["results"]:
        if "error" in r:
            cells = [f"`{r['run']}`", r.get("label", ""), *([""] * 8), "error", "", "", "", r["error"][:80]]
            rows.append(cells + [""] * (len(header) - len(cells)))
            continue
        rows.append(
            [
                f"`{r['run']}`",
                r["label"],
                "x".join(map(str, r["total_factor"])),
                r["precision"],
                "yes" if r["sdpa"] else "no",
                "yes" if r["ckpt"] else "no",
                "x".join(map(str, r["latent_shape"])),
                r["latent_elements"],
                f"{r['compression']:.0f}",
                f"{r['parameters']:,}",
                fmt(r["median_step_s"]),
                fmt(r["median_cpu_s"]) if report["device"] == "cpu" else "-",
                fmt(r.get("time_ratio")),
                fmt(r.get("wall_ratio")),
                f"{r['peak_mib']:.0f}",
                fmt(r.get("memory_ratio")),
                fmt(r.get("peak_mib_default_malloc"), 0),
                f"{r['loadavg_1min_before']:.1f}/{r['loadavg_1min_after']:.1f}",
            ]
        )
    lines += [_common.markdown_table(header, rows), ""]
    checks = report.get("checks", [])
    if checks:
        lines += ["## Checks", ""]
        lines += [f"- {c}" for c in checks]
        lines.append("")
    anatomy = [r for r in report["results"] if r.get("saved_for_backward_mib")]
    if anatomy:
        groups = ["full resolution", "attention matrices", "lower-resolution levels", "parameters"]
        rows = []
        for r in anatomy:
            b = r["saved_for_backward_mib"]
            total = sum(b.values())
            rows.append([f"`{r['run']}`", *(f"{b[g]:.0f} ({100 * b[g] / total:.0f}%)" for g in groups), f"{total:.0f}",
                         f"{r['peak_mib']:.0f}"])
        lines += [
            "## Where the memory goes (measured)",
            "",
            "Tensors the forward pass keeps for backward (distinct storages, via `torch.autograd.graph."
            "saved_tensors_hooks`), grouped by where they live. This is what is held when backward starts; the peak "
            "adds gradients and temporaries on top (and, on CPU, allocator overhead). Runs with checkpointing are left "
            "out (their blocks save only their inputs).",
            "",
            _common.markdown_table(["run", *(f"{g} (MiB)" for g in groups), "total saved (MiB)", "measured peak (MiB)"],
                                  rows),
            "",
        ]
    lines += [
        "## Sizes of the dominant tensors (arithmetic, fp32)",
        "",
        "One full-resolution activation with 32 channels (encoder first level; the decoder's last level also holds "
        "64-channel full-resolution tensors after its upsampling) and one attention matrix at the last level "
        "(tokens x tokens); without SDPA each of the 4 attention blocks keeps at least one such matrix for backward.",
        "",
        _common.markdown_table(
            ["setting", "total factor", "first-level activation (MiB)", "attention tokens",
             "one attention matrix (MiB)", "4 matrices (MiB)"],
            memory_anatomy(size),
        ),
        "",
    ]
    return "\n".join(lines)


def target_checks(results: list[dict]) -> list[str]:
    """Sentences on the fork-vs-core tolerance and on the 0.38x memory / 0.71x time targets (primary time ratio)."""
    by_run = {r["run"]: r for r in results if "error" not in r and r.get("time_ratio") is not None}
    out = []
    fork = by_run.get("4x:fp32")
    if fork and common.BASELINE in by_run:
        t, m = fork["time_ratio"], fork["memory_ratio"]
        ok = t <= FORK_TOLERANCE and m <= FORK_TOLERANCE
        out.append(
            f"fork 4x vs MONAI core 4x (fp32): time {t:.2f}x (wall {fork['wall_ratio']:.2f}x), memory {m:.2f}x -> "
            f"{'within' if ok else 'NOT within'} {FORK_TOLERANCE:.2f}x"
        )

    def verdict(value: float, target: float) -> str:
        return "met" if value <= target else f"missed by {value / target:.2f}x"

    for run, r in by_run.items():
        if run == common.BASELINE:
            continue
        met = r["memory_ratio"] <= MEM_TARGET and r["time_ratio"] <= TIME_TARGET
        if met or run == "8x:recipe":
            name = "8x recipe as in ldm_config_8x_downsample.yaml (bf16 + SDPA + checkpointing)" if run == "8x:recipe" \
                else f"`{run}`"
            out.append(
                f"{name}: memory {r['memory_ratio']:.2f}x "
                f"(target {MEM_TARGET}: {verdict(r['memory_ratio'], MEM_TARGET)}), "
                f"time {r['time_ratio']:.2f}x (target {TIME_TARGET}: {verdict(r['time_ratio'], TIME_TARGET)}; "
                f"wall {r['wall_ratio']:.2f}x)" + (" -> meets both targets" if met else "")
            )
    if not any("meets both" in c for c in out):
        out.append("no measured configuration meets both targets in this run")
    return out


def clean_memory(args: argparse.Namespace) -> bool:
    """Whether memory comes from a separate single-step process with the mmap allocator setting (CPU default)."""
    return args.device == "cpu" and not args.malloc_default


def add_clean_memory(r: dict, payload: dict, args: argparse.Namespace) -> dict:
    """Measure the peak of one more, single training step with ``CLEAN_MALLOC_ENV`` and make it the memory figure.

    The timing process runs with glibc's default allocator, whose peak RSS also holds heap fragmentation that
    changes from process to process (the 4x baseline at 64^3 measured 1465, 1603 and 1620 MiB in three runs). With
    every large allocation on its own mmap, freed tensors leave the RSS at once and the peak follows what the
    tensors need (repeatable to about 1%), but each new tensor costs fresh pages, so that process is not timed.
    """
    single_step = {**payload, "steps": 1, "warmup": 0, "anatomy": False}
    mem = common.run_worker_subprocess(Path(__file__), single_step, timeout=args.timeout,
                                       extra_env=common.CLEAN_MALLOC_ENV)
    if "error" in mem:
        return {**r, "error": "memory process: " + mem["error"]}
    r = dict(r)
    r["peak_mib_default_malloc"] = r["peak_mib"]
    r["adam_state_mib"] = common.adam_state_mib(r["parameters"])
    r["peak_mib"] = mem["peak_mib"] + r["adam_state_mib"]
    r["peak_total_mib"] = mem["peak_total_mib"] + r["adam_state_mib"]
    r["base_mib"] = mem["base_mib"]
    r["wall_s"] += mem["wall_s"]
    r["memory_basis"] = "single step, MALLOC_MMAP_THRESHOLD_=131072, + Adam state"
    return r


def merge_repeats(run: str, measurements: list[dict]) -> dict:
    """Combine the processes that measured one configuration: medians over all their timed steps and peaks."""
    ok = [m for m in measurements if "error" not in m]
    if not ok:
        return {**measurements[-1], "run": run}
    merged = dict(ok[0])
    merged["step_times_s"] = [t for m in ok for t in m["step_times_s"]]
    merged["cpu_times_s"] = [t for m in ok for t in m["cpu_times_s"]]
    merged["median_step_s"] = statistics.median(merged["step_times_s"])
    merged["median_cpu_s"] = statistics.median(merged["cpu_times_s"])
    merged["peak_mib_per_process"] = [m["peak_mib"] for m in ok]
    merged["peak_mib"] = statistics.median(merged["peak_mib_per_process"])
    merged["peak_total_mib"] = statistics.median(m["peak_total_mib"] for m in ok)
    merged["base_mib"] = statistics.median(m["base_mib"] for m in ok)
    if all("peak_mib_default_malloc" in m for m in ok):
        merged["peak_mib_default_malloc"] = statistics.median(m["peak_mib_default_malloc"] for m in ok)
    merged["wall_s"] = sum(m["wall_s"] for m in measurements)
    merged["loadavg_1min_before"] = min(m["loadavg_1min_before"] for m in ok)
    merged["loadavg_1min_after"] = max(m["loadavg_1min_after"] for m in ok)
    merged["processes"] = len(ok)
    merged["failed_processes"] = [m["error"] for m in measurements if "error" in m]
    merged["run"] = run
    return merged


def run_sweep(args: argparse.Namespace) -> dict:
    """Measure every requested configuration in subprocesses (round-robin over --repeats); add ratios and checks."""
    runs = [":".join(common.parse_run(r)) for r in args.runs] if args.runs else default_runs(args)
    machine = _common.machine_info(args.device)
    machine["omp_wait_policy"] = common.worker_env()["OMP_WAIT_POLICY"]  # what the measuring processes use
    t0 = time.perf_counter()
    per_run: dict[str, list[dict]] = {run: [] for run in runs}
    for rep in range(args.repeats):
        for i, run in enumerate(runs, 1):
            setting, variant = common.parse_run(run)
            payload = {"setting": setting, "variant": variant, "size": args.size, "steps": args.steps,
                       "warmup": args.warmup, "device": args.device, "batch": args.batch}
            print(f"[{rep + 1}/{args.repeats}: {i}/{len(runs)}] {run} ...", end=" ", flush=True)
            r = common.run_worker_subprocess(Path(__file__), payload, timeout=args.timeout)
            if "error" not in r and clean_memory(args):
                r = add_clean_memory(r, payload, args)
            if "error" in r:
                r["label"] = common.FACTOR_SETTINGS[setting][3]
                print("ERROR:", r["error"])
            else:
                print(f"wall {r['median_step_s']:.2f} s/step, CPU {r['median_cpu_s']:.2f} s/step, "
                      f"peak {r['peak_mib']:.0f} MiB ({r['wall_s']:.0f} s)", flush=True)
            per_run[run].append(r)
    results = [merge_repeats(run, per_run[run]) for run in runs]
    base = next((r for r in results if r["run"] == common.BASELINE and "error" not in r), None)
    time_key = "median_cpu_s" if args.device == "cpu" else "median_step_s"  # see render_markdown
    for r in results:
        if base and "error" not in r:
            r["time_ratio"] = r[time_key] / base[time_key]
            r["wall_ratio"] = r["median_step_s"] / base["median_step_s"]
            r["memory_ratio"] = r["peak_mib"] / base["peak_mib"]
    report = {
        "device": args.device,
        "machine": machine,
        "command": " ".join(["python benchmarks/compression.py", *sys.argv[1:]]),
        "size": args.size,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "batch": args.batch,
        "baseline": common.BASELINE,
        "targets": {"memory": MEM_TARGET, "time": TIME_TARGET, "fork_vs_core": FORK_TOLERANCE},
        "time_ratio_basis": "process CPU time" if args.device == "cpu" else "wall-clock time",
        "memory_basis": (
            "separate single-step process, MALLOC_MMAP_THRESHOLD_=131072, + Adam state" if clean_memory(args)
            else "the timed process"
        ),
        "results": results,
        "wall_s": time.perf_counter() - t0,
    }
    report["checks"] = target_checks(results)
    return report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, nargs=3, default=DEFAULT_SIZE, metavar=("X", "Y", "Z"),
                   help="input spatial size (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1,
                   help="processes per configuration, run round-robin over all configurations so that slow "
                        "phases of a shared machine hit every configuration alike (default: %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--factors", nargs="+", default=DEFAULT_FACTORS, choices=list(common.FACTOR_SETTINGS),
                   help="factor settings measured in fp32 (default: %(default)s)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                   help="variants measured for each --variant-factors setting (default: %(default)s)")
    p.add_argument("--variant-factors", nargs="+", default=DEFAULT_VARIANT_FACTORS,
                   choices=list(common.FACTOR_SETTINGS), help="settings that get --variants (default: %(default)s)")
    p.add_argument("--extra", nargs="*", default=DEFAULT_EXTRA, help="additional setting:variant runs")
    p.add_argument("--runs", nargs="+", help="measure exactly these setting:variant runs (overrides the above)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration before giving up")
    p.add_argument("--out", type=Path, help="output path without extension (default: results/compression_<device>)")
    p.add_argument("--malloc-default", action="store_true",
                   help="CPU: take memory from the timed process (glibc default allocator) instead of a separate "
                        "single-step process with MALLOC_MMAP_THRESHOLD_=131072")
    p.add_argument("--render", type=Path, metavar="JSON", help="only rewrite the Markdown next to an existing JSON")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        payload = json.loads(args.worker)
        print(json.dumps(common.measure_training(**payload)))
        return
    if args.render:
        report = json.loads(args.render.read_text(encoding="utf-8"))
        report["checks"] = target_checks(report["results"])
        _common.write_results(args.render, report, render_markdown(report))
        return
    if args.device == "cpu":
        args.variants = [v for v in args.variants if "fp16" not in v]
    report = run_sweep(args)
    out = args.out or _common.RESULTS_DIR / f"compression_{args.device}"
    _common.write_results(out, report, render_markdown(report))
    print("\n".join(report["checks"]))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({report['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
