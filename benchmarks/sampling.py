"""Sample quality and time against the number of sampling steps: DDPM-trained (DDIM, and DDPM at all 1000 steps)
against rectified flow (RFlowScheduler), on the quickstart.

One stage-1 autoencoder is trained with the quickstart config; then two stage-2 models with the same UNet, data,
seed and number of optimizer steps, one per objective (``diffusion.scheduler.type: ddpm`` and ``rflow``). For every
sampler and step count, ``evaluate --config`` draws as many samples as there are training volumes and measures them
against the training volumes and their reconstructions; the sampling wall time and the number of network
evaluations (NFE) go beside the metrics. DDPM at 1000 steps is evaluated with two sampling seeds, so that its
run-to-run noise shows next to the differences between samplers.

Examples::

    python benchmarks/sampling.py                               # quickstart sizes, writes results/sampling_cpu.*
    python benchmarks/sampling.py --steps 5 10 20 --work-dir /tmp/sampling_bench --reuse

Needs matplotlib for the plot (``pip install matplotlib``); without it the table is still written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from _common import machine_info, machine_line, write_results

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "monai_diffusion" / "config" / "examples" / "quickstart.yaml"
RESULTS = Path(__file__).resolve().parent / "results"
HEADLINE = [("samples_vs_recon", "c2st_accuracy"), ("samples_vs_real", "histogram_w1"),
            ("samples_vs_recon", "histogram_w1"), ("samples_vs_real", "mmd"),
            ("samples_vs_real", "nn_ratio"), ("samples_vs_real", "ms_ssim_diversity")]


def overrides(work: Path, kind: str, extra: list[str]) -> list[str]:
    return [
        f"autoencoder.checkpoints.output_dir={work / 'autoencoder'}",
        f"diffusion.checkpoints.autoencoder_path={work / 'autoencoder' / 'best_model.pt'}",
        f"diffusion.checkpoints.output_dir={work / f'diffusion_{kind}'}",
        f"diffusion.scheduler.type={kind}",
        f"sampling.output_dir={work / f'samples_{kind}'}",
        *extra,
    ]


def argv(sets: list[str]) -> list[str]:
    out = ["--config", str(QUICKSTART)]
    for s in sets:
        out += ["--set", s]
    return out


def train(work: Path, extra: list[str], reuse: bool) -> None:
    from monai_diffusion.cli import train_autoencoder_main, train_diffusion_main

    if not (reuse and (work / "autoencoder" / "best_model.pt").exists()):
        if train_autoencoder_main(argv(overrides(work, "ddpm", extra))) != 0:
            raise SystemExit("stage 1 failed")
    for kind in ("ddpm", "rflow"):
        if reuse and (work / f"diffusion_{kind}" / "best_model.pt").exists():
            continue
        if train_diffusion_main(argv(overrides(work, kind, extra))) != 0:
            raise SystemExit(f"stage 2 ({kind}) failed")


def measure(work: Path, kind: str, sampler: str, steps: int, seed: int, extra: list[str]) -> dict:
    from monai_diffusion.evaluation.pipeline import evaluate_pipeline
    from monai_diffusion.settings import load_settings

    # the ddpm sampler always runs every training timestep; the others take the step count
    steps_set = [] if sampler == "ddpm" else [f"sampling.num_inference_steps={steps}"]
    sets = overrides(work, kind, [*extra, f"sampling.scheduler={sampler}", *steps_set])
    settings = load_settings(QUICKSTART, sets, stage="sampling")
    out = work / "reports" / f"{kind}_{sampler}_{steps}_seed{seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report, _ = evaluate_pipeline(settings, out=out, seed=seed, overwrite=True)
    row = {"objective": kind, "sampler": sampler, "steps": report["pipeline"]["steps"], "seed": seed,
           "nfe": report["pipeline"]["steps"], "evaluate_seconds": time.perf_counter() - t0,
           "sampling_seconds": report["pipeline"]["sampling_seconds"],
           "fraction_outside": report["samples"]["fraction_outside_real_range"],
           "w1_recon": report["recon_vs_real"]["histogram_w1"], "report": str(out)}
    for block, key in HEADLINE:
        row[f"{block}.{key}"] = report[block][key]
    return row


def render(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Sampling steps: quality and time (quickstart)", "",
        machine_line(m) + "  ",
        f"Command: `{result['command']}`  ",
        f"{result['samples']} samples per row against {result['samples']} training volumes; NFE = network "
        "evaluations per sample (classifier-free guidance off). `c2st vs recon`: held-out accuracy of a classifier "
        "telling samples from the autoencoder's reconstructions (0.5 = indistinguishable). Definitions: "
        "monai_diffusion/docs/evaluate.md.", "",
        "| objective | sampler | NFE | seed | c2st vs recon | histogram W1 | W1 vs recon | MMD | nn_ratio | "
        "MS-SSIM diversity | outside range | sampling s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['objective']} | {r['sampler']} | {r['nfe']} | {r['seed']} | "
            f"{r['samples_vs_recon.c2st_accuracy']:.3f} | {r['samples_vs_real.histogram_w1']:.4f} | "
            f"{r['samples_vs_recon.histogram_w1']:.4f} | {r['samples_vs_real.mmd']:.4f} | "
            f"{r['samples_vs_real.nn_ratio']:.3f} | "
            f"{r['samples_vs_real.ms_ssim_diversity']:.3f} | {100 * r['fraction_outside']:.2f}% | "
            f"{r['sampling_seconds']:.1f} |"
        )
    lines += ["", f"Reconstructions against the training volumes: histogram W1 {result['rows'][0]['w1_recon']:.4f} "
                  "(the floor a latent model can reach).", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    series: dict[str, list[dict]] = {}
    for r in result["rows"]:
        if r["seed"] == result["seed"]:
            series.setdefault(f"{r['objective']} / {r['sampler']}", []).append(r)
    for name, rows in series.items():
        rows = sorted(rows, key=lambda r: r["nfe"])
        x = [r["nfe"] for r in rows]
        style = "o-" if len(rows) > 1 else "s"
        axes[0].plot(x, [r["samples_vs_recon.c2st_accuracy"] for r in rows], style, label=name)
        axes[1].plot(x, [r["samples_vs_real.histogram_w1"] for r in rows], style, label=name)
        axes[2].plot(x, [r["sampling_seconds"] for r in rows], style, label=name)
    titles = ["C2ST accuracy vs reconstructions (0.5 best)", "histogram W1 vs real (lower better)",
              "sampling wall time (s)"]
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per sample")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].axhline(0.5, color="grey", lw=0.8)
    axes[1].axhline(result["rows"][0]["w1_recon"], color="grey", lw=0.8, ls="--", label="reconstructions")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv_: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/monai_diffusion_sampling_bench"))
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rflow-seeds", type=int, default=1,
                   help="sampling seeds per rectified-flow row (seed, seed+1, ...): its run-to-run noise beside DDPM's")
    p.add_argument("--reuse", action="store_true", help="reuse trained checkpoints found in --work-dir")
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra config override (repeatable)")
    p.add_argument("--out", type=Path, default=RESULTS / "sampling_cpu")
    args = p.parse_args(argv_)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_info("cuda" if torch.cuda.is_available() else "cpu"), "command": " ".join(["python", "benchmarks/sampling.py", *(argv_ or sys.argv[1:])]),
              "seed": args.seed, "rows": []}
    t0 = time.perf_counter()
    train(args.work_dir, args.extra, args.reuse)
    result["training_seconds"] = time.perf_counter() - t0
    plan = [("ddpm", "ddim", s, args.seed) for s in args.steps]
    plan += [("rflow", "rflow", s, args.seed + k) for s in args.steps for k in range(max(1, args.rflow_seeds))]
    plan += [("ddpm", "ddpm", 0, args.seed)]  # all training timesteps
    for kind, sampler, steps, seed in plan:
        print(f"== {kind} / {sampler} / {steps} steps / seed {seed}", flush=True)
        result["rows"].append(measure(args.work_dir, kind, sampler, steps, seed, args.extra))
    print("== ddpm / ddpm / all steps, second seed (run-to-run noise)", flush=True)
    result["rows"].append(measure(args.work_dir, "ddpm", "ddpm", 0, args.seed + 1, args.extra))
    result["samples"] = json.loads(Path(result["rows"][0]["report"]).read_text())["samples"]["count"]
    result["wall_seconds"] = time.perf_counter() - t0
    write_results(args.out, result, render(result))
    plot(result, args.out.with_suffix(".png"))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
