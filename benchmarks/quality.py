"""Reconstruction quality per downsample factor after the same fixed training budget.

Every factor setting trains the same autoencoder architecture (channels (32, 64, 64), latent_channels 3, attention
at the last level) from the same seed, on the same data and batch order, for the same number of optimizer steps,
with L1 + kl_weight * KL (no adversarial or perceptual loss, to keep it quick). Then the validation volumes are
reconstructed from the latent mean and scored with MONAI's PSNR and SSIM (data range 1, outputs clipped to [0, 1]).

The numbers compare factors under a short, equal budget; they are not converged quality. For context the table also
scores the trivial reconstruction that fills every voxel with the volume's mean, and lists the validation PSNR every
``--eval-every`` steps, which shows whether the ranking is still moving.

Examples::

    python benchmarks/quality.py                                  # synthetic phantoms, writes results/quality_cpu.*
    python benchmarks/quality.py --data-dir /data/brains --voxel-size 96 96 64 --steps 2000 --device cuda
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

# idle OpenMP threads sleep instead of spinning (see autoencoder_bench.worker_env); must be set before torch starts
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import autoencoder_bench as common  # noqa: E402

DEFAULT_SETTINGS = ["4x", "8x", "16x-8-2"]


def _plain(t) -> torch.Tensor:
    """A plain float tensor from a (possibly MONAI MetaTensor) batch entry."""
    return (t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)).float()


def build_data(args: argparse.Namespace):
    """Training and validation loaders from the synthetic phantoms (default) or a folder of NIfTI volumes."""
    from monai_diffusion.data import build_datasets, build_loaders

    cfg = {"voxel_size": list(args.voxel_size), "cache_rate": 1.0, "num_workers": 0}
    if args.data_dir:
        cfg["train_data_dir"] = str(args.data_dir)
        if args.val_dir:
            cfg["val_data_dir"] = str(args.val_dir)
    else:
        cfg["synthetic"] = {"enabled": True, "num_train": args.num_train, "num_val": args.num_val, "seed": args.seed}
    work_dir = args.work_dir or Path(tempfile.gettempdir()) / "monai_diffusion_benchmarks"
    train_ds, val_ds, info = build_datasets(cfg, spatial_dims=3, in_channels=1, work_dir=work_dir)
    train_loader, val_loader = build_loaders(train_ds, val_ds, batch_size=args.batch_size, seed=args.seed,
                                             val_batch_size=1)
    return train_loader, val_loader, info


def evaluate(model, val_loader, device) -> dict:
    """Mean validation PSNR / SSIM / L1 of the model's reconstructions (latent mean, clipped to [0, 1])."""
    from monai.metrics import PSNRMetric, SSIMMetric

    psnr, ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=3, data_range=1.0)
    l1 = []
    model.eval()
    with torch.no_grad():
        for batch in val_loader:
            x = _plain(batch["image"]).to(device)
            recon = model.reconstruct(x).clamp(0, 1)
            psnr(recon, x)
            ssim(recon, x)
            l1.append((recon - x).abs().mean().item())
    model.train()
    return {"psnr": psnr.aggregate().item(), "ssim": ssim.aggregate().item(), "l1": sum(l1) / len(l1)}


def mean_image_baseline(val_loader) -> dict:
    """Scores of the trivial reconstruction that fills every voxel with the volume's mean intensity."""
    from monai.metrics import PSNRMetric, SSIMMetric

    psnr, ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=3, data_range=1.0)
    for batch in val_loader:
        x = _plain(batch["image"])
        const = torch.full_like(x, x.mean().item())
        psnr(const, x)
        ssim(const, x)
    return {"psnr": psnr.aggregate().item(), "ssim": ssim.aggregate().item()}


def train_setting(setting: str, train_loader, val_loader, args: argparse.Namespace) -> dict:
    """Train one factor setting for ``args.steps`` optimizer steps and score it on the validation set."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = common.build_autoencoder(setting, args.variant).to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    precision = common.parse_variant(args.variant)["precision"]
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    # the same batch order for every setting
    if getattr(train_loader, "generator", None) is not None:
        train_loader.generator.manual_seed(args.seed)
    losses, curve, step, t0 = [], [], 0, time.perf_counter()
    eval_s = 0.0
    while step < args.steps:
        for batch in train_loader:
            x = _plain(batch["image"]).to(device)
            loss, z_mu = common.train_step(model, optimizer, x, precision, scaler, kl_weight=args.kl_weight)
            losses.append(float(loss))
            step += 1
            if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                e0 = time.perf_counter()
                curve.append({"step": step, **evaluate(model, val_loader, device)})
                eval_s += time.perf_counter() - e0
                print(f"  {setting} step {step}/{args.steps}: train loss {sum(losses[-10:]) / len(losses[-10:]):.4f}, "
                      f"val PSNR {curve[-1]['psnr']:.2f} dB", flush=True)
            if step >= args.steps:
                break
    train_s = time.perf_counter() - t0 - eval_s
    scores = evaluate(model, val_loader, device)
    curve.append({"step": step, **scores})
    f = common.total_factor(common.FACTOR_SETTINGS[setting][1])
    return {
        "setting": setting,
        "label": common.FACTOR_SETTINGS[setting][3],
        "total_factor": list(f),
        "latent_shape": [3, *(s // a for s, a in zip(args.voxel_size, f))],
        "compression": math.prod(args.voxel_size) / (3 * math.prod(s // a for s, a in zip(args.voxel_size, f))),
        "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_s": train_s,
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "loss_curve": losses[:: max(1, len(losses) // 50)],
        "val_curve": curve,
        **scores,
    }


def render_markdown(report: dict) -> str:
    a = report["args"]
    lines = [
        f"# Reconstruction quality per downsample factor ({report['device']})",
        "",
        common.machine_line(report["machine"]),
        "",
        f"Command: `{report['command']}`  ",
        f"Data: {report['data']}. Voxel size {' x '.join(map(str, a['voxel_size']))}. Each setting: {a['steps']} Adam "
        f"steps (lr {a['lr']}, batch {a['batch_size']}, {a['variant']}), L1 + {a['kl_weight']} x KL, seed {a['seed']}, "
        f"same batch order; validation on {report['n_val']} volume(s), reconstruction from the latent mean clipped to "
        f"[0, 1], PSNR/SSIM with data range 1. Total wall time {report['wall_s'] / 60:.1f} min.",
        "",
    ]
    rows = [
        [f"`{r['setting']}`", r["label"], "x".join(map(str, r["latent_shape"])), f"{r['compression']:.0f}",
         f"{r['parameters']:,}", f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", f"{r['l1']:.4f}",
         f"{r['final_train_loss']:.4f}",
         f"{r['train_s']:.0f}", " / ".join(f"{c['psnr']:.1f}" for c in r.get("val_curve", []))]
        for r in report["results"]
    ]
    b = report["mean_image_baseline"]
    rows.append(["(mean image)", "every voxel = the volume's mean", "-", "-", "-", f"{b['psnr']:.2f}",
                 f"{b['ssim']:.4f}", "-", "-", "-", "-"])
    first_curve = report["results"][0].get("val_curve", []) if report["results"] else []
    steps_axis = " / ".join(str(c["step"]) for c in first_curve)
    lines.append(common.markdown_table(
        ["setting", "model", "latent", "compression", "params", "val PSNR (dB)", "val SSIM", "val L1",
         "train loss (last 10)", "train time (s)", f"val PSNR after {steps_axis} steps"], rows))
    lines += ["", "Short, equal budget: the differences show how much harder each compression is to learn in "
              f"{a['steps']} steps on this data, not the quality after full training.", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(common.FACTOR_SETTINGS),
                   help="factor settings to train (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, help="folder of .nii/.nii.gz training volumes (default: synthetic)")
    p.add_argument("--val-dir", type=Path, help="folder of validation volumes (default: hold out ~10%% of --data-dir)")
    p.add_argument("--voxel-size", type=int, nargs=3, default=[32, 32, 32], metavar=("X", "Y", "Z"))
    p.add_argument("--num-train", type=int, default=16, help="synthetic training volumes")
    p.add_argument("--num-val", type=int, default=4, help="synthetic validation volumes")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per setting (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--variant", default="fp32", help="precision/attention/checkpointing variant, e.g. fp32 or recipe")
    p.add_argument("--eval-every", type=int, default=50,
                   help="also score the validation set every N steps (0: only at the end; default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--work-dir", type=Path, help="where the synthetic phantoms are written (default: a temp folder)")
    p.add_argument("--out", type=Path, help="output path without extension (default: results/quality_<device>)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    machine = common.machine_info(args.device)
    train_loader, val_loader, info = build_data(args)
    print(f"data: {info['source_description']}", flush=True)
    results = []
    for setting in args.settings:
        print(f"training {setting} ...", flush=True)
        r = train_setting(setting, train_loader, val_loader, args)
        print(f"  {setting}: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f} ({r['train_s']:.0f} s)", flush=True)
        results.append(r)
    report = {
        "device": args.device,
        "machine": machine,
        "command": " ".join(["python benchmarks/quality.py", *sys.argv[1:]]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": info["source_description"],
        "n_train": info["n_train"],
        "n_val": info["n_val"],
        "mean_image_baseline": mean_image_baseline(val_loader),
        "results": results,
        "wall_s": time.perf_counter() - t0,
    }
    out = args.out or common.RESULTS_DIR / f"quality_{args.device}"
    common.write_json(out.with_suffix(".json"), report)
    out.with_suffix(".md").write_text(render_markdown(report), encoding="utf-8")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({report['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
