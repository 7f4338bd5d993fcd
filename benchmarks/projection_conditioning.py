"""Does a projection-conditioned model follow its condition?

Train a small pixel-space model conditioned on the z-projection (``diffusion.condition_channels``) of the built-in
microtubules (``--data microtubules``) or of volumes holding 1-3 Gaussian blobs at random places (``--data blobs``,
written as NIfTI files by this script). Then draw samples for the projections of validation volumes with the
condition (guidance 1 and 3) and with it dropped (guidance 0: the unconditional model that classifier-free dropout
trains alongside), from the same noise, and compare their projection consistency
(``evaluate.projection_consistency``).

Writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` (rows: one validation volume each; columns: the condition,
which is the real volume's own projection, then the projections of the samples with guidance 1, with guidance 3 and
without the condition).

    python benchmarks/projection_conditioning.py [--data blobs] [--epochs 60] [--size 24 24 8] [--out ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from _common import REPO_ROOT as ROOT
from _common import machine_info, machine_line, write_results
from monai_diffusion.conditioning import projection
from monai_diffusion.data import build_datasets
from monai_diffusion.evaluation import projection_consistency
from monai_diffusion.generate import Sampler
from monai_diffusion.pictures import image_panel, tile_panels
from monai_diffusion.settings import settings_from_dict
from monai_diffusion.stage2 import train_diffusion


def write_blobs(folder: Path, count: int, size: list[int], seed: int) -> None:
    """``count`` NIfTI volumes of ``size``, each with 1-3 Gaussian blobs (sigma 1.5 voxels) at random places."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in size], indexing="ij"))
    for i in range(count):
        volume = np.zeros(size, np.float32)
        for _ in range(int(rng.integers(1, 4))):
            centre = np.array([rng.uniform(2, n - 3) for n in size], np.float32).reshape(3, 1, 1, 1)
            volume = np.maximum(volume, np.exp(-((grid - centre) ** 2).sum(0) / (2 * 1.5**2)))
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(folder / f"blobs_{i:03d}.nii.gz"))


def data_section(data: str, work: Path, size: list[int], num_train: int, num_val: int) -> dict:
    if data == "microtubules":
        return {"synthetic": {"enabled": True, "kind": "microtubules", "num_train": num_train, "num_val": num_val,
                              "seed": 0}, "voxel_size": size, "num_workers": 0}
    return {"train_data_dir": str(work / "data" / "train"), "val_data_dir": str(work / "data" / "val"),
            "voxel_size": size, "num_workers": 0, "intensity": {"lower_percentile": 0.0, "upper_percentile": 100.0}}


def config(work: Path, size: list[int], epochs: int, num_train: int, num_val: int, guidance: float = 1.0,
           data: str = "microtubules", prediction_type: str = "epsilon", concat: bool = True) -> dict:
    return {
        "data": data_section(data, work, size, num_train, num_val),
        "autoencoder": {"spatial_dims": 3, "in_channels": 1},
        "diffusion": {
            "space": "pixel", "spatial_dims": 3, "in_channels": 1, "out_channels": 1,
            "num_channels": [16, 32, 32], "attention_levels": [False, True, True], "num_head_channels": 16,
            "norm_num_groups": 8, "condition_channels": 1, "condition_embed_dim": 32, "projection_axis": 2,
            "condition_encoder_channels": [16, 32], "condition_concat": concat,
            "conditioning": {"dropout": 0.1},
            "scheduler": {"num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 0.0005,
                          "beta_end": 0.0195, "prediction_type": prediction_type},
            "training": {"n_epochs": epochs, "batch_size": 4, "learning_rate": 1e-3,
                         "val_interval": max(1, epochs // 4),
                         "save_interval": epochs, "generate_samples_interval": epochs, "num_samples_to_generate": 0,
                         "ema_decay": 0.99},
            "checkpoints": {"output_dir": str(work / "dm")},
        },
        "sampling": {"num_inference_steps": 50, "batch_size": num_val, "guidance_scale": guidance,
                     "output_dir": str(work / "samples")},
        "device": {"use_cuda": False},
        "seed": 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["microtubules", "blobs"], default="microtubules")
    parser.add_argument("--size", type=int, nargs=3, default=[24, 24, 8])
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"], default="epsilon")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--no-concat", action="store_true",
                        help="cross-attention tokens only (diffusion.condition_concat false, the seed's network)")
    parser.add_argument("--num-train", type=int, default=32)
    parser.add_argument("--num-val", type=int, default=8)
    parser.add_argument("--work", default="/tmp/projection_conditioning")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "projection_conditioning_cpu"))
    args = parser.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = config(work, args.size, args.epochs, args.num_train, args.num_val, data=args.data,
                 prediction_type=args.prediction_type, concat=not args.no_concat)
    if args.data == "blobs" and not (work / "data").exists():
        write_blobs(work / "data" / "train", args.num_train, args.size, seed=0)
        write_blobs(work / "data" / "val", args.num_val, args.size, seed=1)

    started = time.perf_counter()
    if not (work / "dm" / "latest_checkpoint.pt").is_file():
        train_diffusion(settings_from_dict(cfg, stage="diffusion"))
    train_seconds = time.perf_counter() - started

    s = settings_from_dict(cfg, stage="sampling")
    _, val_ds, _ = build_datasets(s.data, spatial_dims=3, in_channels=1, work_dir=work)
    volumes = torch.stack([val_ds[i]["image"].as_subclass(torch.Tensor).float() for i in range(len(val_ds))])
    conditions = projection(volumes, 2)
    ckpt = work / "dm" / "latest_checkpoint.pt"
    results, samples = {}, {}
    for name, guidance in (("guidance 1", 1.0), ("guidance 3", 3.0), ("condition dropped", 0.0)):
        sampler = Sampler(settings_from_dict(config(work, args.size, args.epochs, args.num_train, args.num_val,
                                                    guidance, args.data, args.prediction_type, not args.no_concat),
                                             stage="sampling"),
                          ckpt, condition=conditions)
        t0 = time.perf_counter()
        samples[name] = sampler.sample(len(conditions), seed=1, progress=False)
        results[name] = projection_consistency(samples[name], conditions, 2)
        results[name]["sampling_seconds"] = round(time.perf_counter() - t0, 1)
    # the reference: real volumes against their own projections (1 by construction) and against another's
    results["real volumes"] = projection_consistency(volumes, conditions, 2)

    panels = []
    for i in range(len(conditions)):
        panels.append(image_panel(conditions[i]))
        for name in ("guidance 1", "guidance 3", "condition dropped"):
            panels.append(image_panel(projection(samples[name][i], 2)))
    canvas = tile_panels(panels, columns=4)
    from PIL import Image

    Image.fromarray(canvas.mul(255).round().byte().numpy(), mode="L").save(out.with_suffix(".png"))

    meta = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine_line(machine_info("cpu")),
            "torch": torch.__version__, "data": args.data, "prediction_type": args.prediction_type, "condition_concat": not args.no_concat, "size": args.size,
            "epochs": args.epochs,
            "num_train": args.num_train, "num_val": args.num_val, "train_seconds": round(train_seconds, 1)}
    lines = [f"# Projection consistency ({meta['command']})", "",
             f"{meta['machine']}", "", f"{args.data} {args.size}, {args.num_train} training volumes, "
             f"{args.epochs} epochs ({train_seconds / 60:.1f} min), prediction {args.prediction_type}, "
             f"condition_concat {str(not args.no_concat).lower()}; {args.num_val} validation projections as "
             "conditions, 50 DDIM steps, the same noise in every row.", "",
             "| samples | Pearson r with their condition (mean) | with another volume's condition | min | max |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['mean']:.3f} | {r['mismatched_mean']:.3f} | {min(r['per_sample']):.3f} | "
                     f"{max(r['per_sample']):.3f} |")
    write_results(out, {"meta": meta, "results": results}, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
