"""Reconstruction and generation quality per downsample factor, after the same training budget, on built-in data.

For each built-in dataset (``brain``, ``microtubules``) and each factor setting (4x = ``downsample_factors [2, 2]``,
8x = ``[4, 2]``, 16x = ``[8, 2]``) this runs the app's real pipeline, each run in its own folder under
``--work-dir``:

1. ``train_autoencoder`` (stage 1): the same autoencoder channels, the same data, seed and number of optimizer steps
   for every factor;
2. ``train_diffusion`` (stage 2, ``cache_latents=true``): a UNet of the same channels, with as many levels as the
   latent allows (each latent axis must be divisible by 2^(levels-1)), the same number of optimizer steps;
3. ``evaluate_pipeline`` (``evaluate --config``): stage-1 reconstruction metrics on the validation volumes, and
   generation metrics of as many samples as training volumes against the training volumes and against their
   reconstructions, with a PNG grid of real / reconstructed / generated mid-slices.

The budget is short and equal for every setting: the tables compare factors at that budget, they do not show
converged quality. Results: ``benchmarks/results/quality_<device>.json`` / ``.md`` and one PNG grid per run
(``quality_<device>_<dataset>_<factor>.png``).

Examples::

    python benchmarks/quality.py                                   # CPU default: ~39 CPU-minutes
    python benchmarks/quality.py --datasets brain --factors 4x 8x --stage1-steps 400
    python benchmarks/quality.py --device cuda --brain-size 96 112 96 --microtubules-size 128 128 32 \\
        --stage1-steps 4000 --stage2-steps 10000 --out benchmarks/results/quality_cuda
    python benchmarks/quality.py --render benchmarks/results/quality_cpu.json   # rewrite the .md from the .json
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# idle OpenMP threads sleep instead of spinning (see autoencoder_bench.worker_env); must be set before torch starts
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import yaml  # noqa: E402

import _common as common  # noqa: E402

# factor setting -> autoencoder.downsample_factors (one entry per downsampling level)
FACTORS: dict[str, list[int]] = {"4x": [2, 2], "8x": [4, 2], "16x": [8, 2]}
DATASETS = ("brain", "microtubules")
DEFAULT_SIZES = {"brain": [32, 48, 32], "microtubules": [64, 64, 16]}
# the UNet used for every factor; a latent that cannot be halved (levels - 1) times gets the first levels only
UNET_CHANNELS = [32, 64, 64]
UNET_ATTENTION = [False, True, True]
UNET_HEAD_CHANNELS = 32


def latent_size(voxel_size: list[int], factors: list[int]) -> list[int]:
    """Spatial size of the latent of ``voxel_size`` under per-level isotropic ``factors``."""
    total = math.prod(factors)
    return [v // total for v in voxel_size]


def unet_levels(latent: list[int], max_levels: int = len(UNET_CHANNELS)) -> int:
    """The most UNet levels (<= ``max_levels``) whose 2^(levels-1) divides every latent axis."""
    levels = 1
    while levels < max_levels and all(n % 2 ** levels == 0 for n in latent):
        levels += 1
    return levels


def dataset_size(args: argparse.Namespace, dataset: str) -> list[int]:
    """``data.voxel_size`` of a dataset: ``--brain-size``, ``--microtubules-size`` or, for ``--data-dir``,
    ``--data-size``."""
    return list(getattr(args, f"{dataset}_size" if dataset in DATASETS else "data_size"))


def check_sizes(args: argparse.Namespace) -> None:
    """Every dataset size must be divisible by every factor setting's total factor (before anything runs)."""
    for ds in args.datasets:
        size = dataset_size(args, ds)
        for f in args.factors:
            total = math.prod(FACTORS[f])
            bad = [v for v in size if v % total]
            if bad:
                flag = f"--{ds}-size" if ds in DATASETS else "--data-size"
                raise SystemExit(f"error: {flag} {size}: every axis must be divisible by {total} (the total "
                                 f"factor of {f}); {bad} is not")


def run_settings(args: argparse.Namespace, dataset: str, factor: str, run_dir: Path) -> dict[str, Any]:
    """The full settings of one run (written to ``<run_dir>/benchmark.yaml``)."""
    size = dataset_size(args, dataset)
    factors = FACTORS[factor]
    latent = latent_size(size, factors)
    levels = unet_levels(latent)
    heads = [0, UNET_HEAD_CHANNELS, UNET_HEAD_CHANNELS][:levels]
    heads[-1] = UNET_HEAD_CHANNELS  # the middle block always has attention at the last level
    steps_per_epoch_1 = math.ceil(args.num_train / args.batch_size)
    steps_per_epoch_2 = math.ceil(args.num_train / args.stage2_batch_size)
    epochs_1 = max(1, math.ceil(args.stage1_steps / steps_per_epoch_1))
    epochs_2 = max(1, math.ceil(args.stage2_steps / steps_per_epoch_2))
    ae_groups = math.gcd(*args.ae_channels, 8)
    if dataset in DATASETS:
        data = {
            "synthetic": {"enabled": True, "kind": dataset, "num_train": args.num_train, "num_val": args.num_val,
                          "seed": args.seed},
            # the built-in volumes are already in [0, 1]: min-max scaling keeps them as generated
            "intensity": {"lower_percentile": 0.0, "upper_percentile": 100.0, "clip": True},
        }
    else:  # your own volumes, with the app's default intensity scaling (0.5 / 99.5 percentiles)
        data = {"train_data_dir": str(args.data_dir.expanduser().resolve())}
        if args.val_dir:
            data["val_data_dir"] = str(args.val_dir.expanduser().resolve())
    data.update({"voxel_size": size, "crop_mode": "resize", "cache_rate": 1.0, "num_workers": 0})
    return {
        "data": data,
        "autoencoder": {
            "spatial_dims": 3,
            "num_channels": list(args.ae_channels),
            "downsample_factors": factors,
            "latent_channels": 3,
            "num_res_blocks": 1,
            "norm_num_groups": ae_groups,
            "attention_levels": [False] * len(args.ae_channels),
            "with_encoder_nonlocal_attn": True,
            "with_decoder_nonlocal_attn": True,
            "use_flash_attention": True,
            "training": {
                "n_epochs": epochs_1,
                "batch_size": args.batch_size,
                "learning_rate": args.stage1_lr,
                "adv_weight": args.adv_weight,
                "autoencoder_warm_up_n_epochs": max(1, epochs_1 // 4),
                "discriminator": {"num_layers_d": 2, "num_channels": 8},
                "val_interval": max(1, epochs_1 // 4),
                "save_interval": epochs_1,
            },
            "checkpoints": {"output_dir": str(run_dir / "autoencoder")},
            "logging": {"log_interval": max(1, steps_per_epoch_1), "visualize_interval": epochs_1,
                        "num_visualize_samples": 1},
        },
        "diffusion": {
            "spatial_dims": 3,
            "in_channels": 3,
            "out_channels": 3,
            "num_channels": UNET_CHANNELS[:levels],
            "attention_levels": UNET_ATTENTION[:levels],
            "num_head_channels": heads,
            "num_res_blocks": 1,
            "norm_num_groups": 8,
            "use_flash_attention": True,
            "training": {
                "n_epochs": epochs_2,
                "batch_size": args.stage2_batch_size,
                "learning_rate": args.stage2_lr,
                "cache_latents": True,
                "val_interval": max(1, epochs_2 // 4),
                "save_interval": epochs_2,
                "generate_samples_interval": epochs_2,
                "num_samples_to_generate": 1,
            },
            "checkpoints": {"autoencoder_path": str(run_dir / "autoencoder" / "best_model.pt"),
                            "output_dir": str(run_dir / "diffusion")},
            "logging": {"log_interval": max(1, steps_per_epoch_2 * 10)},
        },
        "sampling": {
            "num_inference_steps": args.inference_steps,
            "num_samples": args.num_samples or args.num_train,
            "batch_size": 4,
            "output_dir": str(run_dir / "samples"),
        },
        "device": {"use_cuda": args.device == "cuda", "mixed_precision": False},
        "seed": args.seed,
    }


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed(what: str, work) -> tuple[Any, dict[str, float]]:
    """Run ``work()`` and return its result with its wall and CPU seconds and the load average around it."""
    load0, c0, t0 = os.getloadavg()[0], _cpu_seconds(), time.perf_counter()
    result = work()
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    print(f"    {what}: {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    return result, {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_before": round(load0, 2),
                    "load_after": round(os.getloadavg()[0], 2)}


def _cli(main, argv: list[str], what: str) -> None:
    code = main(argv)
    if code != 0:
        raise SystemExit(f"error: {what} failed with exit code {code} (command: {' '.join(argv)})")


def _pick(block: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: block.get(k) for k in keys}


GEN_KEYS = ("c2st_accuracy", "mmd", "histogram_w1", "nn_ratio", "nn_ratio_min", "ms_ssim_diversity",
            "ms_ssim_diversity_real")


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """The figures the tables show, from an ``evaluate_pipeline`` report."""
    val = report["stage1_validation"]
    recon_block = report["recon_vs_real"]
    return {
        "stage1_validation": {k: val.get(k) for k in ("psnr", "ssim", "ms_ssim", "l1", "count")},
        "recon_vs_real": {**_pick(recon_block, GEN_KEYS),
                          "psnr": recon_block["reconstruction"]["psnr"],
                          "ssim": recon_block["reconstruction"]["ssim"]},
        "samples_vs_real": _pick(report["samples_vs_real"], GEN_KEYS),
        "samples_vs_recon": _pick(report["samples_vs_recon"], GEN_KEYS),
        "real_range": [report["real"]["min"], report["real"]["max"]],
        "samples_range": _pick(report["samples"], ("min", "max", "fraction_outside_real_range")),
        "recon_range": _pick(report["recon"], ("min", "max", "fraction_outside_real_range")),
        "c2st_split": {k: report["samples_vs_real"]["c2st"].get(k) for k in ("train_per_set", "test_per_set",
                                                                              "epochs", "input_shape")},
        "num_samples": report["samples"]["count"],
        "sampler": report["pipeline"]["sampler"],
        "sampling_steps": report["pipeline"]["steps"],
    }


def _parameters(path: Path) -> dict[str, int]:
    """Weights (parameters and buffers) of the UNet and of the autoencoder stored in a stage-2 checkpoint."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=False)

    def count(state: Any) -> int:
        return int(sum(v.numel() for v in state.values() if hasattr(v, "numel"))) if isinstance(state, dict) else 0

    counts = {name: count(state) for name, state in ckpt.get("state_dict", {}).items()}
    ae = ckpt.get("autoencoder")
    if isinstance(ae, dict) and isinstance(ae.get("state_dict"), dict):
        counts["autoencoder"] = count(ae["state_dict"])
    return counts


def run_one(args: argparse.Namespace, dataset: str, factor: str, run_dir: Path, data_from: Path | None) -> dict:
    """Stage 1, stage 2 and evaluation of one (dataset, factor) in ``run_dir``; returns the run's record."""
    from monai_diffusion.cli import train_autoencoder_main, train_diffusion_main
    from monai_diffusion.evaluation.pipeline import evaluate_pipeline
    from monai_diffusion.settings import load_settings

    run_dir.mkdir(parents=True)
    if data_from is not None and data_from.is_dir():  # same volumes (kept via the manifest), generated once per dataset
        shutil.copytree(data_from, run_dir / "synthetic_data")
    cfg = run_settings(args, dataset, factor, run_dir)
    config = run_dir / "benchmark.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    argv = ["--config", str(config)]
    print(f"  {dataset} {factor} in {run_dir}", flush=True)
    _, t1 = _timed("stage 1", lambda: _cli(train_autoencoder_main, argv, "train_autoencoder"))
    _, t2 = _timed("stage 2", lambda: _cli(train_diffusion_main, argv, "train_diffusion"))
    settings = load_settings(str(config))
    out = run_dir / "evaluation.json"
    (report, files), t3 = _timed("evaluate", lambda: evaluate_pipeline(
        settings, out=out, num_samples=args.num_samples or args.num_train, seed=args.seed))
    latent = latent_size(cfg["data"]["voxel_size"], FACTORS[factor])
    ckpt = run_dir / "diffusion" / "best_model.pt"
    record = {
        "dataset": dataset,
        "factor": factor,
        "downsample_factors": FACTORS[factor],
        "voxel_size": cfg["data"]["voxel_size"],
        "latent_shape": [3, *latent],
        "compression": math.prod(cfg["data"]["voxel_size"]) / (3 * math.prod(latent)),
        "unet_channels": cfg["diffusion"]["num_channels"],
        "unet_levels": len(cfg["diffusion"]["num_channels"]),
        "stage1_steps": cfg["autoencoder"]["training"]["n_epochs"] * math.ceil(args.num_train / args.batch_size),
        "stage2_steps": cfg["diffusion"]["training"]["n_epochs"] * math.ceil(args.num_train / args.stage2_batch_size),
        "parameters": _parameters(ckpt) if ckpt.is_file() else {},
        "run_dir": str(run_dir),
        "commands": [
            f"python monai_diffusion/3d_ldm/train_autoencoder.py --config {config}",
            f"python monai_diffusion/3d_ldm/train_diffusion.py --config {config}",
            f"python monai_diffusion/3d_ldm/evaluate.py --config {config} --num-samples "
            f"{args.num_samples or args.num_train} --seed {args.seed} --out {out}",
        ],
        "time": {"stage1": t1, "stage2": t2, "evaluate": t3},
        **summarise(report),
    }
    png = out.with_suffix(".png")
    if png.is_file():
        record["grid"] = str(png)
    return record


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def render_markdown(report: dict[str, Any]) -> str:
    """The Markdown summary of a benchmark report."""
    a = report["args"]
    m = report["machine"]
    partial = report.get("partial")
    lines = [
        f"# Quality per downsample factor: stage 1 and stage 2 after the same budget ({report['device']})",
        "",
        common.machine_line(m)
        + f" OMP_NUM_THREADS={m.get('omp_num_threads')}.",
        "",
        f"Command: `{report['command']}`  ",
        f"Total wall time {report['wall_s'] / 60:.1f} min; 1-min load average at the end "
        f"{report.get('loadavg_at_end', '-')}.",
        "",
    ]
    if partial:
        lines += [f"**Partial run**: {partial}", ""]
    lines += [
        "Each run: "
        + (f"the volumes in {a['data_dir']} ({a['num_train']} for training, resized to "
           f"{'x'.join(map(str, a['data_size']))})" if a.get("data_dir") else
           f"built-in dataset ({a['num_train']} training and {a['num_val']} validation volumes, seed {a['seed']})")
        + f"; autoencoder channels {tuple(a['ae_channels'])}, latent channels 3, one residual block per "
        f"level, non-local attention (SDPA) in encoder and decoder, L1 + 1e-6 KL"
        + (f" + {a['adv_weight']} adversarial" if a["adv_weight"] > 0 else " (no adversarial loss)")
        + f", Adam lr {a['stage1_lr']}, batch {a['batch_size']}; stage 2 on cached latents: DDPM (1000 steps, "
        f"scaled-linear betas, epsilon), UNet channels {UNET_CHANNELS} cut to the levels the latent allows, "
        f"Adam lr {a['stage2_lr']}, batch {a['stage2_batch_size']}; sampling with DDIM, {a['inference_steps']} "
        f"steps; evaluation with `evaluate_pipeline` (C2ST, MMD, histogram W1, nn_ratio, MS-SSIM diversity; "
        f"see `monai_diffusion/docs/evaluate.md`). fp32.",
        "",
        "Short, equal budget for every setting: the numbers compare factors after this budget, not converged "
        "quality.",
        "",
        "## Stage 1: reconstruction (validation volumes)",
        "",
    ]
    rows = []
    for r in report["results"]:
        v = r["stage1_validation"]
        rr = r["recon_vs_real"]
        rows.append([r["dataset"], r["factor"], "x".join(map(str, r["voxel_size"])), "x".join(map(str, r["latent_shape"])),
                     f"{r['compression']:.0f}", r["stage1_steps"], _f(v["psnr"], 2), _f(v["ssim"], 4),
                     _f(v["ms_ssim"], 4), _f(v["l1"], 4), _f(rr["histogram_w1"], 4), _f(rr["c2st_accuracy"], 2),
                     f"{r['recon_range']['min']:.2f} .. {r['recon_range']['max']:.2f} "
                     f"({100 * r['recon_range']['fraction_outside_real_range']:.1f}%)",
                     f"{r['parameters'].get('autoencoder', 0):,}"])
    lines.append(common.markdown_table(
        ["dataset", "factor", "volume", "latent", "compression", "steps", "val PSNR (dB)", "val SSIM", "val MS-SSIM",
         "val L1", "W1 recon vs real", "C2ST recon vs real", "recon range (outside real range)",
         "autoencoder params"], rows))
    lines += ["", "## Stage 2: generation", ""]
    rows = []
    for r in report["results"]:
        s, sr, rr = r["samples_vs_real"], r["samples_vs_recon"], r["recon_vs_real"]
        rows.append([r["dataset"], r["factor"], f"{r['unet_levels']} {tuple(r['unet_channels'])}",
                     f"{r['parameters'].get('unet', 0):,}", r["stage2_steps"],
                     _f(s["c2st_accuracy"], 2), _f(sr["c2st_accuracy"], 2), _f(s["mmd"], 4), _f(sr["mmd"], 4),
                     _f(s["histogram_w1"], 4), _f(rr["histogram_w1"], 4), _f(s["nn_ratio"], 2),
                     f"{_f(s['ms_ssim_diversity'], 3)} / {_f(s['ms_ssim_diversity_real'], 3)}",
                     f"{r['samples_range']['min']:.2f} .. {r['samples_range']['max']:.2f} "
                     f"({100 * r['samples_range']['fraction_outside_real_range']:.1f}%)"])
    lines.append(common.markdown_table(
        ["dataset", "factor", "UNet levels (channels)", "UNet params", "steps", "C2ST vs real", "C2ST vs recon", "MMD vs real",
         "MMD vs recon", "W1 samples vs real", "W1 recon vs real", "nn_ratio", "diversity samples / real",
         "sample range (outside real range)"], rows))
    n = report["results"][0] if report["results"] else None
    if n:
        c = n["c2st_split"]
        lines += ["", f"{n['num_samples']} samples per run ({n['sampler']}, {n['sampling_steps']} steps) against the "
                      f"{a['num_train']} training volumes and their reconstructions. C2ST: {c['train_per_set']} "
                      f"training and {c['test_per_set']} test volumes per set, {c['epochs']} epochs, input "
                      + ", ".join(sorted({f"{r['dataset']} " + "x".join(map(str, r["c2st_split"]["input_shape"]))
                                          for r in report["results"]}))
                      + f"; 0.5 = indistinguishable, 1.0 = separable (with "
                      f"{c['test_per_set']} test volumes per set one volume moves it by {0.5 / c['test_per_set']:.3f}). "
                      "Value range: the real volumes are in [0, 1]."]
    lines += ["", "## Time", ""]
    rows, cpu_total = [], 0.0
    for r in report["results"]:
        t = r["time"]
        cpu_total += sum(t[k]["cpu_s"] for k in ("stage1", "stage2", "evaluate"))
        rows.append([r["dataset"], r["factor"]] + [f"{t[k]['wall_s']:.0f} / {t[k]['cpu_s']:.0f}"
                                                   for k in ("stage1", "stage2", "evaluate")]
                    + [f"{t['stage1']['load_before']:.1f} .. {t['evaluate']['load_after']:.1f}"])
    lines.append(common.markdown_table(
        ["dataset", "factor", "stage 1 wall / CPU (s)", "stage 2 wall / CPU (s)", "evaluate wall / CPU (s)",
         "1-min load average"], rows))
    lines += ["", f"CPU time is user + system time of the benchmark process over all its threads ({cpu_total:.0f} s "
                  f"= {cpu_total / 60:.1f} CPU-minutes in all); wall time depends on what else ran (load average "
                  "column)."]
    lines += ["", "## Pictures", ""]
    for r in report["results"]:
        if r.get("grid_copy"):
            lines.append(f"- {r['dataset']} {r['factor']}: `{r['grid_copy']}` (real / reconstructed / generated "
                         "mid-slices)")
    lines += ["", "## Per-run commands", "", "Each run folder holds `benchmark.yaml`, the settings of that run; the "
              "benchmark runs the equivalent of:", ""]
    for r in report["results"][:1]:
        commands = [c.replace("monai-diffusion-evaluate ", "python monai_diffusion/3d_ldm/evaluate.py ")
                    for c in r["commands"]]
        lines += ["```bash", *commands, "```"]
    lines.append("")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--factors", nargs="+", default=list(FACTORS), choices=list(FACTORS))
    p.add_argument("--brain-size", type=int, nargs=3, default=DEFAULT_SIZES["brain"], metavar=("X", "Y", "Z"))
    p.add_argument("--microtubules-size", type=int, nargs=3, default=DEFAULT_SIZES["microtubules"],
                   metavar=("X", "Y", "Z"))
    p.add_argument("--data-dir", type=Path, help="your own folder of .nii/.nii.gz training volumes, instead of the "
                                                "built-in datasets (at least 8 volumes for the C2ST)")
    p.add_argument("--val-dir", type=Path, help="with --data-dir: a folder of validation volumes (default: the app "
                                                "holds some training volumes out)")
    p.add_argument("--data-size", type=int, nargs=3, default=[64, 64, 64], metavar=("X", "Y", "Z"),
                   help="with --data-dir: data.voxel_size (volumes are resized to it)")
    p.add_argument("--num-train", type=int, default=16, help="built-in training volumes (also the number of samples)")
    p.add_argument("--num-val", type=int, default=2, help="validation volumes")
    p.add_argument("--ae-channels", type=int, nargs=3, default=[16, 32, 32], help="autoencoder channels per level")
    p.add_argument("--stage1-steps", type=int, default=240, help="stage-1 optimizer steps per run")
    p.add_argument("--stage2-steps", type=int, default=1000, help="stage-2 optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=2, help="stage-1 batch size")
    p.add_argument("--stage2-batch-size", type=int, default=4)
    p.add_argument("--stage1-lr", type=float, default=1e-3)
    p.add_argument("--stage2-lr", type=float, default=1e-3)
    p.add_argument("--adv-weight", type=float, default=0.0, help="adversarial loss weight (0: none)")
    p.add_argument("--inference-steps", type=int, default=50, help="DDIM sampling steps")
    p.add_argument("--num-samples", type=int, default=None, help="samples per run (default: --num-train)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--work-dir", type=Path, help="a new folder for the runs (default: a new timestamped folder "
                                                 "under the system temp folder)")
    p.add_argument("--out", type=Path, help="output path without extension (default: results/quality_<device>)")
    p.add_argument("--render", type=Path, help="only rewrite the .md of this .json")
    return p.parse_args(argv)


def main(argv=None) -> None:
    import json

    args = parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text(encoding="utf-8"))
        common.write_text(args.render.with_suffix(".md"), render_markdown(report))
        print(f"wrote {args.render.with_suffix('.md')}")
        return
    if args.data_dir is not None:
        if not args.data_dir.expanduser().is_dir():
            raise SystemExit(f"error: --data-dir {args.data_dir} is not a folder")
        from monai_diffusion.data import discover_images

        n = len(discover_images(args.data_dir.expanduser()))
        # without --val-dir the app holds the last 10% (at least 1) of the training files out for validation
        args.num_train = n if args.val_dir else n - max(1, int(round(0.1 * n)))
        args.datasets = ["folder"]
    check_sizes(args)
    if args.num_train < 8:
        raise SystemExit(f"error: the C2ST needs at least 8 training volumes (4 to train and 4 to test per set), "
                         f"got {args.num_train}" + (f" in {args.data_dir}" if args.data_dir else " (--num-train)"))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = args.work_dir or Path(tempfile.gettempdir()) / "monai_diffusion_benchmarks" / f"quality-{stamp}"
    work = work.expanduser()
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"error: --work-dir {work} is not empty; nothing was changed. Choose a new folder.")
    out = args.out or common.RESULTS_DIR / f"quality_{args.device}"
    t0 = time.perf_counter()
    machine = common.machine_info(args.device)
    machine["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    report: dict[str, Any] = {
        "device": args.device,
        "machine": machine,
        "command": " ".join(["python benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "work_dir": str(work),
        "results": [],
    }
    total = len(args.datasets) * len(args.factors)

    def save(partial: str | None) -> None:
        report["wall_s"] = time.perf_counter() - t0
        report["loadavg_at_end"] = round(os.getloadavg()[0], 2)
        report["partial"] = partial
        common.write_results(out, report, render_markdown(report))

    for dataset in args.datasets:
        data_from = None
        for factor in args.factors:
            run_dir = work / f"{dataset}_{factor}"
            record = run_one(args, dataset, factor, run_dir, data_from)
            data_from = data_from or run_dir / "synthetic_data"
            if record.get("grid"):
                dest = out.parent / f"{out.name}_{dataset}_{factor}.png"
                shutil.copyfile(record["grid"], dest)
                record["grid_copy"] = str(dest.relative_to(common.REPO_ROOT)) if dest.is_relative_to(
                    common.REPO_ROOT) else str(dest)
            report["results"].append(record)
            done = len(report["results"])
            save(None if done == total else f"{done} of {total} runs finished")
            s = record["samples_vs_recon"]
            print(f"  -> val PSNR {record['stage1_validation']['psnr']:.2f} dB, C2ST vs recon "
                  f"{_f(s['c2st_accuracy'], 2)}, W1 {_f(record['samples_vs_real']['histogram_w1'], 4)} "
                  f"({done}/{total}, {(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({report['wall_s'] / 60:.1f} min); "
          f"runs in {work}")


if __name__ == "__main__":
    main()
