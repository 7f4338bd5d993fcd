"""Stage-2 epoch time with and without cached latents (``diffusion.training.cache_latents``).

Trains a small autoencoder once, then the same diffusion UNet for a few epochs twice: encoding every batch on the
fly, and from latents encoded once before training. Reports the median training time per epoch (first epoch
excluded) and the one-off time to build the cache.

    python benchmarks/latent_cache.py                      # quickstart sizes, CPU
    python benchmarks/latent_cache.py --voxel-size 64 64 64 --epochs 4
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import statistics
import tempfile
from pathlib import Path

from _common import machine_info, machine_line, write_results
from monai_diffusion.checkpoints import load_checkpoint
from monai_diffusion.settings import load_settings
from monai_diffusion.stage1 import train_autoencoder
from monai_diffusion.stage2 import train_diffusion

QUICKSTART = Path(__file__).resolve().parents[1] / "monai_diffusion" / "config" / "examples" / "quickstart.yaml"


def run(args: argparse.Namespace) -> dict:
    root = Path(tempfile.mkdtemp(prefix="latent_cache_"))
    voxel = list(args.voxel_size)
    common = [
        f"data.synthetic={{enabled: true, num_train: {args.num_train}, num_val: 2, seed: 0}}",
        f"data.voxel_size={voxel}",
        "device.use_cuda=false",
        "autoencoder.training.n_epochs=1",
        f"autoencoder.checkpoints.output_dir={root / 'ae'}",
        f"diffusion.checkpoints.autoencoder_path={root / 'ae' / 'best_model.pt'}",
        f"diffusion.training.n_epochs={args.epochs}",
        "diffusion.training.num_samples_to_generate=0",
        f"diffusion.training.batch_size={args.batch_size}",
    ]
    train_autoencoder(load_settings(QUICKSTART, common))
    results = {}
    for cache in (False, True):
        out = root / f"dm_cache_{cache}"
        settings = load_settings(
            QUICKSTART, [*common, f"diffusion.training.cache_latents={str(cache).lower()}", f"diffusion.checkpoints.output_dir={out}"]
        )
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            train_diffusion(settings)
        history = load_checkpoint(out / "latest_checkpoint.pt", "diffusion")["history"]
        seconds = [h["train_seconds"] for h in history]
        cache_time = re.search(r"cached \d+ training latents in ([\d.]+) s", captured.getvalue())
        results["cached" if cache else "on_the_fly"] = {
            "epoch_seconds": seconds,
            "median_epoch_seconds": statistics.median(seconds[1:] or seconds),
            "cache_build_seconds": float(cache_time.group(1)) if cache_time else 0.0,
        }
    fly, cached = results["on_the_fly"]["median_epoch_seconds"], results["cached"]["median_epoch_seconds"]
    results["speedup"] = fly / cached
    results["setup"] = {
        "voxel_size": voxel,
        "num_train": args.num_train,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "machine": machine_info("cpu"),
    }
    return results


def markdown(results: dict) -> str:
    s = results["setup"]
    rows = [
        "| stage-2 training | median epoch (s) | one-off cache build (s) |",
        "| --- | --- | --- |",
        f"| encode every batch | {results['on_the_fly']['median_epoch_seconds']:.2f} | - |",
        f"| cached latents | {results['cached']['median_epoch_seconds']:.2f} | {results['cached']['cache_build_seconds']:.2f} |",
        "",
        f"Speed-up per epoch: **{results['speedup']:.2f}x** ({'x'.join(map(str, s['voxel_size']))} volumes, "
        f"{s['num_train']} training volumes, batch {s['batch_size']}, median of epochs 2-{s['epochs']}; "
        f"{machine_line(s['machine'])})",
    ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxel-size", type=int, nargs=3, default=[32, 32, 32])
    parser.add_argument("--num-train", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "latent_cache_cpu")
    args = parser.parse_args()
    results = run(args)
    table = markdown(results)
    write_results(args.out, results, table)
    print(table)


if __name__ == "__main__":
    main()
