"""Largest volume that trains at batch 1 within a memory budget, per recipe, by measured fit and extrapolation.

A binary search at the real budget would need the memory it is looking for (24 GiB on a 24 GiB machine swaps or
gets killed), so instead each recipe is measured at a few small sizes of the requested aspect and its peak memory is
fitted as a function of the voxel count V:

    M(V) = a + b * V + c * T(V)^2,     T(V) = V / (product of the total downsample factors)  (attention tokens)

``a`` is what does not grow with the volume (runtime, weights, optimizer state), ``b * V`` the activations of the
convolutional levels (linear in V), and ``c * T^2`` the attention matrices, which only exist without SDPA: with
``sdpa`` the model is linear (c = 0). Where the attention term is too small at the measured sizes to be estimated
(e.g. 8x without SDPA), ``c`` is taken from the 4x run of the same implementation and variant, whose attention
blocks are identical (same channels, same number of blocks) and which is measured for that purpose. One extra,
larger size is measured and compared with the fit's prediction (the fit error). The fit is then solved for the
budget.

Memory is the total of the training process: peak RSS on CPU, ``max_memory_allocated`` on CUDA (which leaves out
the CUDA context and allocator slack, typically a few hundred MiB to 1-2 GiB).

On CPU the measuring processes run with ``MALLOC_MMAP_THRESHOLD_=131072``: every allocation above 128 KiB (every
activation tensor) gets its own mmap and is returned to the system when freed, so the peak RSS follows the memory the
tensors really need. With glibc's default (an mmap threshold that grows up to 32 MiB as large blocks are freed) freed
tensors stay in the heap and the peak RSS also holds fragmentation that depends on the allocation history: measured
at 48/64/80/96^3, the bf16 recipes were off a straight line by up to 30%, and fits made from them missed the check
size by as much; with the setting, the same points lay on a line to within 1%. The setting slows the steps (every new
tensor is fresh pages) but times are not what this script reports. ``--malloc-default`` turns it off.

Examples::

    python benchmarks/max_volume.py                              # CPU, cubic volumes, 24 GiB budget
    python benchmarks/max_volume.py --aspect 4 4 1 --budget-gib 80 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import _common
import autoencoder_bench as common

DEFAULT_RECIPES = ["core-4x:fp32", "8x:fp32", "8x:sdpa+ckpt", "8x:recipe", "16x-8-2:sdpa+ckpt", "16x-8-2:recipe"]
# fraction of the fitted memory the attention term must reach at the largest fit size to be estimated from the fit
IDENTIFIABLE = 0.10


def shape_at(scale: float, aspect: list[int], factor: tuple[int, ...]) -> list[int]:
    """The volume ``scale * aspect`` with each axis rounded down to a multiple of that axis' total factor."""
    return [max(f, int(scale * a) // f * f) for a, f in zip(aspect, factor)]


def tokens(shape: list[int], factor: tuple[int, ...]) -> int:
    return math.prod(s // f for s, f in zip(shape, factor))


def malloc_env(args: argparse.Namespace) -> dict[str, str]:
    """On CPU, make glibc serve every allocation above 128 KiB with its own mmap (see the module docstring)."""
    if args.device != "cpu" or args.malloc_default:
        return {}
    return dict(common.CLEAN_MALLOC_ENV)


def measure(run: str, shape: list[int], args: argparse.Namespace) -> dict:
    """Peak memory (MiB, whole process) of training steps at one shape, in a fresh process."""
    setting, variant = common.parse_run(run)
    payload = {"setting": setting, "variant": variant, "size": shape, "steps": args.steps, "warmup": args.warmup,
               "device": args.device, "anatomy": False}
    r = common.run_worker_subprocess(Path(__file__).with_name("compression.py"), payload, timeout=args.timeout,
                                     extra_env=malloc_env(args))
    if "error" in r:
        raise RuntimeError(f"{run} at {shape}: {r['error']}")
    # total process memory on CPU; on CUDA the allocator peak (includes weights, optimizer state and input)
    r["memory_mib"] = r["peak_total_mib"]
    if args.warmup + args.steps == 1:
        r["adam_state_mib"] = common.adam_state_mib(r["parameters"])
        r["memory_mib"] += r["adam_state_mib"]
    return r


def fit(points: list[tuple[int, int, float]], quadratic: bool, fixed_c: float | None):
    """Least-squares fit of M = a + b V + c T^2 to (V, T, M) points; returns (a, b, c, how c was obtained)."""
    v = np.array([p[0] for p in points], dtype=float)
    t2 = np.array([p[1] for p in points], dtype=float) ** 2
    m = np.array([p[2] for p in points], dtype=float)
    if not quadratic:
        b, a = np.polyfit(v, m, 1)
        return float(a), float(b), 0.0, "none (SDPA: linear)"
    if fixed_c is not None:
        b, a = np.polyfit(v, m - fixed_c * t2, 1)
        return float(a), float(b), float(fixed_c), "from the 4x run"
    design = np.stack([np.ones_like(v), v, t2], axis=1)
    (a, b, c), *_ = np.linalg.lstsq(design, m, rcond=None)
    return float(a), float(b), float(c), "fitted"


def predict(coef, v: float, t: float) -> float:
    a, b, c = coef
    return a + b * v + c * t * t


def largest_shape(coef, aspect, factor, budget_mib: float) -> tuple[list[int], float]:
    """Largest ``scale * aspect`` shape (multiples of the factor) whose predicted memory fits the budget."""
    lo, hi = 1.0, 1.0
    while predict(coef, math.prod(shape_at(hi, aspect, factor)), tokens(shape_at(hi, aspect, factor), factor)) \
            <= budget_mib and hi < 1e5:
        lo, hi = hi, hi * 2
    for _ in range(60):  # bisection on the continuous scale
        mid = (lo + hi) / 2
        sh = shape_at(mid, aspect, factor)
        if predict(coef, math.prod(sh), tokens(sh, factor)) <= budget_mib:
            lo = mid
        else:
            hi = mid
    sh = shape_at(lo, aspect, factor)
    return sh, predict(coef, math.prod(sh), tokens(sh, factor))


def analyse_run(run: str, args: argparse.Namespace, fits: dict) -> dict:
    """Measure one recipe at the fit scales and the check scale, fit, validate and solve for the budget."""
    setting, variant = common.parse_run(run)
    factor = common.total_factor(*common.FACTOR_SETTINGS[setting][1:3])
    flags = common.parse_variant(variant)
    meas = []
    for scale in args.fit_scales + [args.check_scale]:
        shape = shape_at(scale, args.aspect, factor)
        r = measure(run, shape, args)
        meas.append({"shape": shape, "voxels": math.prod(shape), "tokens": tokens(shape, factor),
                     "memory_mib": r["memory_mib"], "median_step_s": r["median_step_s"]})
        print(f"    {run} {'x'.join(map(str, shape))}: {r['memory_mib']:.0f} MiB, {r['median_step_s']:.1f} s/step",
              flush=True)
    fit_pts = [(m["voxels"], m["tokens"], m["memory_mib"]) for m in meas[:-1]]
    quadratic = not flags["sdpa"]
    a, b, c, how = fit(fit_pts, quadratic, None)
    largest = fit_pts[-1]
    if quadratic and (c <= 0 or c * largest[1] ** 2 < IDENTIFIABLE * predict((a, b, c), largest[0], largest[1])):
        impl = common.FACTOR_SETTINGS[setting][0]
        donor = f"{'core-4x' if impl == 'core' else '4x'}:{variant}"
        if donor == run:
            how = "fitted (small attention term)"
        else:
            if donor not in fits:
                print(f"    attention term not identifiable for {run}; measuring {donor} for it", flush=True)
                fits[donor] = analyse_run(donor, args, fits)
            a, b, c, how = fit(fit_pts, True, fits[donor]["coef"][2])
            how = f"from {donor}"
    coef = (a, b, c)
    check = meas[-1]
    predicted = predict(coef, check["voxels"], check["tokens"])
    shape, mem = largest_shape(coef, args.aspect, factor, args.budget_gib * 1024)
    result = {
        "run": run,
        "label": common.FACTOR_SETTINGS[setting][3],
        **flags,
        "total_factor": list(factor),
        "measurements": meas,
        "coef": list(coef),
        "attention_term": how,
        "check_shape": check["shape"],
        "check_measured_mib": check["memory_mib"],
        "check_predicted_mib": predicted,
        "fit_error": predicted / check["memory_mib"] - 1,
        "max_shape": shape,
        "max_voxels": math.prod(shape),
        "max_predicted_mib": mem,
        "fixed_mib": a,
        "mib_per_mvoxel_linear": b * 1e6,
    }
    fits[run] = result
    return result


def add_derived(report: dict) -> None:
    """From each fit: the largest volume for the other aspects asked for, and the memory of reference shapes.

    Valid because the fitted M depends only on the voxel count and the number of attention tokens, and both follow
    from the shape alone for a given factor setting.
    """
    a = report["args"]
    budget = a["budget_gib"] * 1024
    for r in report["results"]:
        coef, factor = r["coef"], tuple(r["total_factor"])
        r["other_aspects"] = []
        for aspect in a.get("also_aspects") or []:
            shape, mem = largest_shape(coef, aspect, factor, budget)
            r["other_aspects"].append(
                {"aspect": aspect, "shape": shape, "voxels": math.prod(shape), "predicted_mib": mem}
            )
        r["reference_shapes"] = []
        for ref in a.get("reference") or []:
            shape = [s // f * f for s, f in zip(ref, factor)]
            mem = predict(coef, math.prod(shape), tokens(shape, factor))
            r["reference_shapes"].append({"shape": shape, "predicted_mib": mem, "fits": mem <= budget})


def render_markdown(report: dict) -> str:
    a = report["args"]
    lines = [
        f"# Largest trainable volume within {a['budget_gib']:g} GiB ({report['device']}, batch 1)",
        "",
        _common.machine_line(report["machine"]),
        "",
        f"Command: `{report['command']}`  ",
        f"Aspect {':'.join(map(str, a['aspect']))}; fitted on scales {a['fit_scales']}, checked at scale "
        f"{a['check_scale']} (each axis rounded down to a multiple of its total factor). Memory = "
        + ("peak `max_memory_allocated`" if report["device"] == "cuda" else
           "peak RSS of the whole process ("
           + ("glibc default allocator" if a.get("malloc_default")
              else "`MALLOC_MMAP_THRESHOLD_=131072`, so freed tensors leave the RSS")
           + ")")
        + f", single training step{' + Adam state' if a['warmup'] + a['steps'] == 1 else 's'}"
        + ", fitted as M = a + b V + c T^2 (V voxels, T attention tokens; c = 0 with SDPA). "
        f"Extrapolated, not measured at the budget. Total wall time {report['wall_s'] / 60:.1f} min.",
        "",
    ]
    rows = []
    for r in report["results"]:
        rows.append([
            f"`{r['run']}`", "x".join(map(str, r["total_factor"])), r["precision"], "yes" if r["sdpa"] else "no",
            "yes" if r["ckpt"] else "no",
            ", ".join(f"{'x'.join(map(str, m['shape']))}: {m['memory_mib']:.0f}" for m in r["measurements"][:-1]),
            f"{r['fixed_mib']:.0f}", f"{r['mib_per_mvoxel_linear']:.0f}",
            r["attention_term"] + (f": {r['coef'][2] * common.MIB / 4:.1f} matrices" if r["coef"][2] else ""),
            f"{'x'.join(map(str, r['check_shape']))}: {r['check_measured_mib']:.0f} vs {r['check_predicted_mib']:.0f} "
            f"({100 * r['fit_error']:+.1f}%)",
            "x".join(map(str, r["max_shape"])), f"{r['max_voxels'] / 1e6:.1f}",
            *("x".join(map(str, o["shape"])) for o in r.get("other_aspects", [])),
            *(f"{m['predicted_mib'] / 1024:.1f}" for m in r.get("reference_shapes", [])),
        ])
    extra = [f"largest {':'.join(map(str, o))} (same fit)" for o in a.get("also_aspects") or []]
    extra += [f"predicted at {'x'.join(map(str, m))} (GiB)" for m in a.get("reference") or []]
    lines.append(_common.markdown_table(
        ["recipe", "total factor", "precision", "SDPA", "ckpt", "measured (MiB)", "a (MiB)", "b (MiB per Mvoxel)",
         "attention term c", "check: measured vs fit (MiB)", f"largest {':'.join(map(str, a['aspect']))} in "
         f"{a['budget_gib']:g} GiB", "Mvoxels", *extra], rows))
    lines += [
        "",
        "a: memory that does not grow with the volume (Python, torch, weights, optimizer state); b: linear growth "
        "(activations of the convolutional levels); c: attention matrices without SDPA, given as the number of fp32 "
        "tokens x tokens matrices it amounts to.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, help="setting:variant runs (default: %(default)s)")
    p.add_argument("--budget-gib", type=float, default=24.0)
    p.add_argument("--aspect", type=int, nargs=3, default=[1, 1, 1], metavar=("X", "Y", "Z"),
                   help="volume shape = scale * aspect (default cubic; e.g. 4 4 1 for 256x256x64-like volumes)")
    p.add_argument("--fit-scales", type=float, nargs="+", default=[48, 64, 80], help="scales measured for the fit")
    p.add_argument("--check-scale", type=float, default=96, help="larger scale measured to check the fit")
    p.add_argument("--steps", type=int, default=1,
                   help="measured steps per size (after --warmup; default: %(default)s)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed steps first (default: %(default)s; with a single step in all, Adam's state is added)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--also-aspects", type=int, nargs=3, action="append", metavar=("X", "Y", "Z"),
                   default=None, help="also report the largest volume of this aspect from the same fit "
                                      "(repeatable; default: 4 4 1)")
    p.add_argument("--reference", type=int, nargs=3, action="append", metavar=("X", "Y", "Z"), default=None,
                   help="also report the predicted memory of this shape (repeatable; default: 256 256 64)")
    p.add_argument("--render", type=Path, metavar="JSON", help="only recompute the derived columns and the Markdown "
                                                               "of an existing JSON")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--malloc-default", action="store_true",
                   help="CPU: keep glibc's default allocator settings (peak RSS then includes heap fragmentation)")
    p.add_argument("--out", type=Path, help="output path without extension (default: results/max_volume_<device>)")
    args = p.parse_args(argv)
    args.also_aspects = args.also_aspects or [[4, 4, 1]]
    args.reference = args.reference or [[256, 256, 64]]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text(encoding="utf-8"))
        for key in ("also_aspects", "reference"):  # options added later than the JSON, or changed on the command line
            if getattr(args, key) != parse_args([]).__dict__[key] or key not in report["args"]:
                report["args"][key] = getattr(args, key)
        add_derived(report)
        _common.write_results(args.render, report, render_markdown(report))
        return
    t0 = time.perf_counter()
    machine = _common.machine_info(args.device)
    machine["omp_wait_policy"] = common.worker_env()["OMP_WAIT_POLICY"]  # what the measuring processes use
    fits: dict = {}
    results = []
    for run in [":".join(common.parse_run(r)) for r in args.recipes]:
        print(f"{run}:", flush=True)
        r = fits.get(run) or analyse_run(run, args, fits)
        print(f"  fit error {100 * r['fit_error']:+.1f}% at {r['check_shape']}; largest in {args.budget_gib} GiB: "
              f"{'x'.join(map(str, r['max_shape']))}", flush=True)
        results.append(r)
    for run, r in fits.items():  # donors measured on the way
        if r not in results:
            results.append(r)
    report = {
        "device": args.device,
        "machine": machine,
        "command": " ".join(["python benchmarks/max_volume.py", *sys.argv[1:]]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "wall_s": time.perf_counter() - t0,
    }
    add_derived(report)
    out = args.out or _common.RESULTS_DIR / f"max_volume_{args.device}"
    _common.write_results(out, report, render_markdown(report))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({report['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
