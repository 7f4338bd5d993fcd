"""Where do two samplers' intensity histograms differ? The follow-up to ``benchmarks/sampling.py`` (issue 26, part 5).

``sampling.py`` reports one number per sampler for the histogram (W1 against the real volumes). This script takes
the models that ``sampling.py`` trained in its ``--work-dir`` and breaks that number down: it draws the samples
again (the same seeds, so the same samples as the benchmark's rows), decodes the training volumes' latents (the
reconstructions, which are what stage 2 learns to imitate), and for every set reports quantiles, the fraction of
bright voxels, the per-volume mean intensity and its spread, and the histogram W1 against the real volumes and
against the reconstructions, split into bands of the quantile function (W1 in 1D is the mean absolute difference
of the two quantile functions, so the bands add up to the total).

    python benchmarks/sampling.py --work-dir /tmp/sbench --steps 20 30 --rflow-seeds 2
    python benchmarks/sampling_histograms.py --work-dir /tmp/sbench      # writes results/sampling_histograms_cpu.*

Needs matplotlib for the picture (the table is written without it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _common import RESULTS_DIR, machine_info, machine_line, markdown_table, write_results

BANDS = [(0.0, 0.5, "p 0-50 % (background)"), (0.5, 0.9, "p 50-90 %"), (0.9, 0.99, "p 90-99 % (head)"),
         (0.99, 1.0, "p 99-100 % (rim, bright blobs)")]
GRID = 4096


def quantile_function(x: torch.Tensor) -> np.ndarray:
    """The quantile function of every voxel of ``x`` on a grid of :data:`GRID` probabilities (midpoints)."""
    p = (np.arange(GRID) + 0.5) / GRID
    return np.quantile(x.detach().float().flatten().numpy(), p)


def band_w1(q: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """W1 between two quantile functions and its part in each band of :data:`BANDS` (the parts add up to it)."""
    p = (np.arange(GRID) + 0.5) / GRID
    diff = np.abs(q - ref)
    out = {"total": float(diff.mean())}
    for lo, hi, name in BANDS:
        out[name] = float(diff[(p >= lo) & (p < hi)].sum() / GRID)
    out["signed_mean"] = float((q - ref).mean())  # > 0: the set is brighter overall than the reference
    return out


def describe(x: torch.Tensor) -> dict[str, float]:
    flat = x.detach().float().flatten()
    per_volume = x.detach().float().flatten(1).mean(dim=1)
    return {"mean": float(flat.mean()), "volume_mean_std": float(per_volume.std()),
            "volume_mean_min": float(per_volume.min()), "volume_mean_max": float(per_volume.max()),
            "q50": float(flat.quantile(0.5)), "q99": float(torch.quantile(flat[::7], 0.99)),
            "bright_fraction": float((flat > 0.5).float().mean())}


def load_real(folder: Path) -> torch.Tensor:
    import nibabel as nib

    files = sorted(folder.glob("train_*.nii.gz"))
    if not files:
        raise SystemExit(f"error: --data {folder}: no train_*.nii.gz (the quickstart's synthetic_data folder)")
    volumes = [torch.as_tensor(np.asarray(nib.load(str(f)).dataobj), dtype=torch.float32) for f in files]
    return torch.stack(volumes)[:, None]


def plot(sets: dict[str, torch.Tensor], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no picture (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    bins = np.linspace(0.0, 1.05, 106)
    for name, x in sets.items():
        v = x.flatten().numpy()
        axes[0].hist(v, bins=bins, histtype="step", label=name, log=True)
        axes[1].plot((np.arange(GRID) + 0.5) / GRID, quantile_function(x), label=name)
    axes[0].set_xlabel("intensity")
    axes[0].set_ylabel("voxels (log)")
    axes[0].set_title("intensity histograms", fontsize=9)
    axes[1].set_xlim(0.85, 1.0)
    axes[1].set_xlabel("probability p")
    axes[1].set_ylabel("quantile")
    axes[1].set_title("quantile functions, top 15 % (W1 = mean gap between curves)", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, required=True, help="sampling.py's --work-dir (its trained models)")
    p.add_argument("--data", type=Path, default=None, help="folder of the training volumes (default: "
                   "<work-dir>/synthetic_data, else runs/quickstart/synthetic_data)")
    p.add_argument("--rflow-steps", type=int, nargs="+", default=[20, 30])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="sampling batch (default 8, the quickstart's "
                   "sampling.batch_size: the same seed and batch give the same samples as sampling.py's rows)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "sampling_histograms_cpu")
    args = p.parse_args(argv)
    from monai_diffusion import DiffusionPipeline

    work = args.work_dir
    data = args.data or next((d for d in (work / "synthetic_data", Path("runs/quickstart/synthetic_data"))
                              if d.is_dir()), work / "synthetic_data")
    for needed in (work / "autoencoder" / "best_model.pt", work / "diffusion_ddpm" / "best_model.pt",
                   work / "diffusion_rflow" / "best_model.pt"):
        if not needed.is_file():
            print(f"error: {needed} is missing: run benchmarks/sampling.py --work-dir {work} first", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    real = load_real(data)
    ae = str(work / "autoencoder" / "best_model.pt")
    ddpm, rflow = (DiffusionPipeline.from_checkpoints(diffusion=str(work / f"diffusion_{kind}" / "best_model.pt"),
                                                      autoencoder=ae) for kind in ("ddpm", "rflow"))
    n = real.shape[0]
    sets: dict[str, torch.Tensor] = {"real": real, "reconstructions": ddpm.decode(ddpm.encode(real)).float()}
    print("drawing DDPM-1000 samples ...", flush=True)
    sets["ddpm 1000 steps"] = ddpm.generate(n, seed=args.seed, scheduler="ddpm", batch_size=args.batch_size,
                                            progress=False).as_tensor()
    sets["ddim 30 steps"] = ddpm.generate(n, seed=args.seed, scheduler="ddim", num_inference_steps=30,
                                          batch_size=args.batch_size, progress=False).as_tensor()
    for steps in args.rflow_steps:
        sets[f"rflow {steps} steps"] = rflow.generate(n, seed=args.seed, num_inference_steps=steps,
                                                     batch_size=args.batch_size, progress=False).as_tensor()
    q_real, q_recon = quantile_function(real), quantile_function(sets["reconstructions"])
    rows = []
    for name, x in sets.items():
        q = quantile_function(x)
        rows.append({"set": name, **describe(x), "w1_vs_real": band_w1(q, q_real), "w1_vs_recon": band_w1(q, q_recon)})
    report = {"machine": machine_info("cpu"), "command": " ".join(["python", "benchmarks/sampling_histograms.py",
                                                                   *(argv if argv is not None else sys.argv[1:])]),
              "seed": args.seed, "volumes_per_set": n, "rows": rows, "seconds": time.perf_counter() - t0}
    header = ["set", "mean", "volume means (min-max)", "bright > 0.5", "W1 vs real"] + \
             [f"vs real: {b[2]}" for b in BANDS] + ["signed (set - real)", "W1 vs recon", "signed (set - recon)"]
    table = [[r["set"], f"{r['mean']:.4f}", f"{r['volume_mean_min']:.3f}-{r['volume_mean_max']:.3f}",
              f"{100 * r['bright_fraction']:.2f}%", f"{r['w1_vs_real']['total']:.4f}",
              *[f"{r['w1_vs_real'][b[2]]:.4f}" for b in BANDS], f"{r['w1_vs_real']['signed_mean']:+.4f}",
              f"{r['w1_vs_recon']['total']:.4f}", f"{r['w1_vs_recon']['signed_mean']:+.4f}"] for r in rows]
    md = "\n".join([
        "# Where the samplers' intensity histograms differ (quickstart)", "",
        machine_line(report["machine"]) + "  ", f"Command: `{report['command']}`  ",
        f"{n} volumes per set, sampling seed {args.seed} (the same samples as `sampling.py`'s seed-{args.seed} rows). "
        "W1 is the mean absolute gap between two quantile functions; the band columns split it by probability "
        "and add up to it. `signed`: the mean of (set - reference) quantiles, > 0 = brighter.", "",
        markdown_table(header, table), ""])
    json_path, md_path = write_results(args.out, report, md)
    png = args.out.with_suffix(".png")
    drawn = plot(sets, png)
    print(md)
    print(f"results: {json_path}, {md_path}" + (f", {png}" if drawn else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
