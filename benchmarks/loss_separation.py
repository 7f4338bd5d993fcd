"""How well each reconstruction loss separates a useless reconstruction from good ones on sparse volumes.

Scores three stand-in reconstructions of built-in microtubule volumes (scaled to [0, 1] by the data pipeline's
default percentiles 0.5-99.5) with every ``reconstruction_loss_type`` at its default keys: all zeros (what an
autoencoder trained with plain L1 on sparse data tends to output), the target plus N(0, noise) clipped to [0, 1],
and the target at half intensity. Also reports the foreground fraction at a few thresholds. No training.

    python benchmarks/loss_separation.py                           # 4 volumes of 128x128x32, CPU, ~30 s
    python benchmarks/loss_separation.py --voxel-size 256 256 64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from monai.transforms import ScaleIntensityRangePercentiles

from _common import machine_info, machine_line, write_results
from monai_diffusion.losses import ReconstructionLoss
from monai_diffusion.synthetic import generate_volume

LOSSES = {
    "l1": ReconstructionLoss("l1"),
    "mse": ReconstructionLoss("mse"),
    "weighted (l1, fg 20, bg 1, threshold 0.1)": ReconstructionLoss("weighted"),
    "dice": ReconstructionLoss("dice"),
    "combined (1, 1, fg 20)": ReconstructionLoss("combined"),
}


def run(args: argparse.Namespace) -> dict:
    scale = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)
    volumes = [torch.as_tensor(scale(torch.from_numpy(
        generate_volume("microtubules", args.voxel_size, seed=args.seed, index=i))[None])) for i in range(args.volumes)]
    target = torch.stack(volumes).float()
    generator = torch.Generator().manual_seed(args.seed)
    candidates = {
        "all zeros": torch.zeros_like(target),
        f"target + N(0, {args.noise}), clipped": (target + args.noise * torch.randn(target.shape, generator=generator))
        .clamp(0, 1),
        "target * 0.5": target * 0.5,
    }
    return {
        "foreground_fraction": {str(t): (target > t).float().mean().item() for t in (0.05, 0.1, 0.3)},
        "mean_intensity": target.mean().item(),
        "scores": {name: {c: loss(x, target)[0].item() for c, x in candidates.items()} for name, loss in LOSSES.items()},
        "setup": {
            "voxel_size": list(args.voxel_size),
            "volumes": args.volumes,
            "seed": args.seed,
            "machine": machine_info("cpu"),
        },
    }


def markdown(results: dict) -> str:
    scores = results["scores"]
    columns = list(next(iter(scores.values())))
    s = results["setup"]
    fractions = ", ".join(f"{100 * v:.1f} % above {t}" for t, v in results["foreground_fraction"].items())
    rows = [
        "| loss (default keys) | " + " | ".join(columns) + " |",
        "| --- |" + " --- |" * len(columns),
        *(f"| {name} | " + " | ".join(f"{v:.4f}" for v in row.values()) + " |" for name, row in scores.items()),
        "",
        f"{s['volumes']} microtubule volumes of {'x'.join(map(str, s['voxel_size']))} (seed {s['seed']}): foreground "
        f"{fractions}; mean intensity {results['mean_intensity']:.3f}. {machine_line(s['machine'])}",
    ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxel-size", type=int, nargs=3, default=[128, 128, 32])
    parser.add_argument("--volumes", type=int, default=4)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "loss_separation_cpu")
    args = parser.parse_args()
    results = run(args)
    table = markdown(results)
    write_results(args.out, results, table)
    print(table)


if __name__ == "__main__":
    main()
