"""Which stage-1 knob keeps the quickstart phantoms' small blobs (issue 26, part 6)?

The quickstart (``monai_diffusion/config/examples/quickstart.yaml``) trains a tiny KL autoencoder whose
reconstructions lose the phantoms' 1-3.5 voxel blobs. Each *variant* here is a list of ``--set`` overrides of that
config (:data:`VARIANTS`; ``--combo a+b`` joins two). For each variant, stage 1 is trained with the app's own
settings loader and entry point (``load_settings`` + ``stage1.train_autoencoder``), in its own folder under
``--work-dir``, in up to three phases:

1. ``probe``: a few epochs, only to measure seconds per optimizer step (the mean ``train_seconds`` of the epochs
   after the first, from the loop's history, over the steps per epoch). The adversarial warm-up is set to 0 in the
   probe so that variants with a discriminator are timed with it.
2. ``budget``: the number of epochs that fits the stage-1 budget: ``budget_ratio`` (default 120 s / 50 s: stage 1
   may grow from the quickstart's 50 s on an idle 2-core CPU to about 2 minutes) times the baseline's 320 steps at
   the baseline's probed s/step, divided by the variant's probed s/step, rounded to whole epochs. Only ratios of
   times measured in this run are used, so the budget holds on any machine as far as those ratios do.
3. ``base``: the baseline's step count (``--base-steps``, 320), when the budget differs from it.

Every trained model (its ``best_model.pt``, what the quickstart's stage 2 uses) is measured:

* validation PSNR / SSIM on the validation phantoms (``evaluation.reconstruction_metrics``);
* evaluate's reconstruction metrics on the training phantoms: the C2ST accuracy of reconstructions against the
  real volumes (``evaluation.c2st_accuracy``, evaluate's settings) and the histogram W1 (``evaluation.histogram_w1``);
* the blob contrast kept: for each blob of each training and validation phantom (``synthetic.phantom_blobs``:
  core = voxels more than half this blob; shell = voxels within ``--shell`` voxels of the core, inside the head,
  less than 10% of any blob), ``(mean recon in core - mean recon in shell) / (the same of the real volume)``,
  averaged over blobs (1 = kept, 0 = gone; blobs whose real contrast is under 0.05 are left out);
* the wall seconds of training, the steps (``LoopState.global_step``) and s/step.

The real volumes are read through the data transforms as evaluate reads them and checked against the regenerated
phantoms, so that the masks lie on them. Results: ``<out>.json``, ``<out>.md`` with the machine line and the
command, and ``<out>.png`` (``<out>_base.png`` for the base phase): mid-slices (``pictures.picture_grid``) of the 4
training volumes with the most blob voxels on their mid-slices, real first, then each variant's reconstruction.

Run with one thread so that times compare (``OMP_NUM_THREADS=1``; the script also calls
``torch.set_num_threads(--threads)``)::

    OMP_NUM_THREADS=1 python benchmarks/stage1_blobs.py                       # every variant, all phases
    OMP_NUM_THREADS=1 python benchmarks/stage1_blobs.py --variants baseline adv0.01 --phases probe budget
    OMP_NUM_THREADS=1 python benchmarks/stage1_blobs.py --reuse --combo latent8+adv0.01  # add a combination
    python benchmarks/stage1_blobs.py --dry-run --out /tmp/stage1_blobs       # tiny, every code path, seconds

A run found in ``--work-dir`` (its checkpoint and ``timing.json``) is reused with ``--reuse`` (its recorded training
time is reported, the metrics are measured again); without it, an existing run folder is an error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import machine_info, machine_line, markdown_table, write_json, write_results

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "monai_diffusion" / "config" / "examples" / "quickstart.yaml"
RESULTS = Path(__file__).resolve().parent / "results"

# name -> --set overrides of quickstart.yaml
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "latent8": ["autoencoder.latent_channels=8", "diffusion.in_channels=8", "diffusion.out_channels=8"],
    "adv0.01": ["autoencoder.training.adv_weight=0.01"],
    "adv0.1": ["autoencoder.training.adv_weight=0.1"],
    "kl1e-8": ["autoencoder.training.kl_weight=1.0e-8"],
    "factors[2]": ["autoencoder.downsample_factors=[2]", "autoencoder.num_channels=[8, 16]",
                   "autoencoder.attention_levels=[false, false]"],
    "wide": ["autoencoder.num_channels=[16, 32, 32]"],
    "noattn": ["autoencoder.with_encoder_nonlocal_attn=false", "autoencoder.with_decoder_nonlocal_attn=false"],
    "fg10": ["autoencoder.training.loss.reconstruction_loss_type=weighted",
             "autoencoder.training.loss.weighted.threshold=0.5", "autoencoder.training.loss.weighted.foreground_weight=10"],
}
NOTES = {
    "factors[2]": "16^3 latent: stage 2's UNet sees 8x more latent voxels",
    "latent8": "stage 2 gets 8 latent channels",
    "fg10": "L1 weighted 10x where the phantom is above 0.5: the rim and the bright blobs",
    "noattn": "no attention block in the autoencoder's middle (MONAI's default has one at each end of the latent)",
}
DRY = ["data.voxel_size=[16, 16, 16]", "data.synthetic.num_train=8", "data.synthetic.num_val=2"]


def variant_sets(name: str) -> list[str]:
    """The overrides of a variant or of a ``a+b`` combination (later parts win on a shared key)."""
    sets: list[str] = []
    for part in name.split("+"):
        if part not in VARIANTS:
            raise SystemExit(f"unknown variant {part!r}; known: {', '.join(VARIANTS)}")
        sets += VARIANTS[part]
    return sets


def load(sets: list[str]):
    from monai_diffusion.settings import load_settings

    return load_settings(QUICKSTART, sets, stage="autoencoder")


def run_dir(work: Path, variant: str, tag: str) -> Path:
    return work / variant.replace("/", "_") / tag


def train(work: Path, variant: str, tag: str, sets: list[str], reuse: bool) -> dict[str, Any]:
    """Stage 1 of ``variant`` with ``sets`` in ``work/variant/tag``; ``timing.json`` records what training took."""
    from monai_diffusion.stage1 import train_autoencoder

    folder = run_dir(work, variant, tag)
    timing_path = folder / "timing.json"
    if folder.exists():
        if reuse and timing_path.is_file() and (folder / "autoencoder" / "best_model.pt").is_file():
            print(f"== {variant} / {tag}: reusing {folder}", flush=True)
            return json.loads(timing_path.read_text())
        raise SystemExit(f"{folder} exists; pass --reuse (it holds a finished run) or choose another --work-dir")
    all_sets = [*sets, f"autoencoder.checkpoints.output_dir={folder / 'autoencoder'}"]
    settings = load(all_sets)
    print(f"== {variant} / {tag}: {settings.autoencoder.training.n_epochs} epochs, sets {sets}", flush=True)
    t0 = time.perf_counter()
    state = train_autoencoder(settings)
    seconds = time.perf_counter() - t0
    if state.stopped_by:
        raise SystemExit(f"{variant} / {tag} was stopped by {state.stopped_by}")
    epochs = settings.autoencoder.training.n_epochs
    per_epoch = [h["train_seconds"] for h in state.history]
    steady = per_epoch[1:] or per_epoch  # the first epoch carries the warm-up
    steps_per_epoch = state.global_step / epochs
    timing = {
        "variant": variant, "tag": tag, "sets": sets, "epochs": epochs, "steps": state.global_step,
        "steps_per_epoch": steps_per_epoch, "seconds": round(seconds, 2),
        "s_per_step_wall": seconds / state.global_step,
        "s_per_step": float(np.mean(steady)) / steps_per_epoch,
        "epoch_train_seconds": [round(s, 3) for s in per_epoch],
        "val_history": [{k: h[k] for k in h if k.startswith("val_")} for h in state.history if "val_psnr" in h],
        "checkpoint": str(folder / "autoencoder" / "best_model.pt"),
        "threads": torch.get_num_threads(),
    }
    write_json(timing_path, timing)
    return timing


def real_volumes(settings, work: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The training and validation volumes through the deterministic transforms, as evaluate reads them."""
    from monai_diffusion.data import build_datasets, build_transforms, training_geometry

    _, _, info = build_datasets(settings.data, spatial_dims=settings.autoencoder.spatial_dims,
                                in_channels=settings.autoencoder.in_channels, work_dir=work)
    tf = build_transforms(training_geometry(settings.data), settings.autoencoder.spatial_dims, train=False)

    def read(files: list[str]) -> torch.Tensor:
        return torch.stack([tf({"image": f})["image"].as_subclass(torch.Tensor).float() for f in files])

    return read(info["train_files"]), read(info["val_files"]), info


def blob_parts(settings, split: str, count: int, volumes: torch.Tensor) -> list[dict[str, Any]]:
    """``synthetic.phantom_blobs`` of each volume of ``split``, checked against the volume as read."""
    from monai_diffusion.synthetic import phantom_blobs

    syn = settings.data.synthetic
    parts = []
    for i in range(count):
        p = phantom_blobs(settings.data.voxel_size, seed=syn.seed, split=split, index=i)
        diff = float((volumes[i, 0] - torch.from_numpy(p["image"])).abs().max())
        if diff > 1e-4:  # the transforms moved or rescaled the phantom: the masks would not lie on it
            raise SystemExit(f"{split} volume {i} differs from its regenerated phantom by {diff}; the blob masks "
                             "need the phantom as written (orientation RAS, no resize, no intensity change)")
        parts.append(p)
    return parts


def blob_masks(parts: list[dict[str, Any]], shell: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per volume, per blob: ``(core, shell)`` boolean masks (see the module's docstring)."""
    out = []
    for p in parts:
        head = torch.from_numpy(p["head"]) > 0.5
        any_blob = sum(torch.from_numpy(b["weight"]) for b in p["blobs"]) > 0.1
        masks = []
        for b in p["blobs"]:
            core = torch.from_numpy(b["weight"]) > 0.5
            if not core.any():
                continue
            x = core.float()[None, None]
            pool = torch.nn.functional.max_pool3d if x.ndim == 5 else torch.nn.functional.max_pool2d
            near = pool(x, 2 * shell + 1, stride=1, padding=shell)[0, 0] > 0
            ring = near & head & ~any_blob
            if ring.any():
                masks.append((core, ring))
        out.append(masks)
    return out


def blob_contrast(real: torch.Tensor, recon: torch.Tensor, masks, parts, min_contrast: float = 0.05) -> dict[str, Any]:
    """Mean over blobs of recon contrast / real contrast (core minus shell); also bright and dark blobs apart."""
    kept: dict[str, list[float]] = {"all": [], "bright": [], "dark": []}
    for i, per_blob in enumerate(masks):
        darks = [b["dark"] for b in parts[i]["blobs"] if (torch.from_numpy(b["weight"]) > 0.5).any()]
        for (core, ring), dark in zip(per_blob, darks):
            c_real = float(real[i, 0][core].mean() - real[i, 0][ring].mean())
            if abs(c_real) < min_contrast:
                continue
            ratio = float(recon[i, 0][core].mean() - recon[i, 0][ring].mean()) / c_real
            kept["all"].append(ratio)
            kept["dark" if dark else "bright"].append(ratio)
    return {"mean": float(np.mean(kept["all"])), "bright": float(np.mean(kept["bright"])) if kept["bright"] else None,
            "dark": float(np.mean(kept["dark"])) if kept["dark"] else None, "blobs": len(kept["all"])}


def picture_volumes(masks, count: int = 4) -> list[int]:
    """The ``count`` volumes with the most blob-core voxels on their three mid-slices (ties: lower index)."""
    def score(per_blob) -> int:
        total = 0
        for core, _ in per_blob:
            for axis in range(core.ndim):
                total += int(core.select(axis, core.shape[axis] // 2).sum())
        return total

    order = sorted(range(len(masks)), key=lambda i: (-score(masks[i]), i))
    return sorted(order[:count])


class Data:
    """The real volumes, their blob masks and the picture's volumes (one set for every variant)."""

    def __init__(self, settings, work: Path, shell: int) -> None:
        self.train, self.val, info = real_volumes(settings, work)
        self.train_parts = blob_parts(settings, "train", len(info["train_files"]), self.train)
        self.val_parts = blob_parts(settings, "val", len(info["val_files"]), self.val)
        self.train_masks = blob_masks(self.train_parts, shell)
        self.val_masks = blob_masks(self.val_parts, shell)
        self.picture = picture_volumes(self.train_masks)
        self.clip = settings.sampling.clip


@torch.no_grad()
def reconstruct_all(model, volumes: torch.Tensor, clip: bool) -> torch.Tensor:
    from monai_diffusion.models import reconstruct

    out = torch.cat([reconstruct(model, volumes[i:i + 1]).float() for i in range(volumes.shape[0])])
    return out.clamp(0.0, 1.0) if clip else out  # as evaluate does with sampling.clip


def measure(timing: dict[str, Any], data: Data, c2st_epochs: int) -> tuple[dict[str, Any], torch.Tensor]:
    from monai_diffusion.evaluation import C2STSettings, c2st_accuracy, histogram_w1, reconstruction_metrics
    from monai_diffusion.models import load_autoencoder

    model, _ = load_autoencoder(timing["checkpoint"])
    t0 = time.perf_counter()
    recon = reconstruct_all(model, data.train, data.clip)
    val_recon = reconstruct_all(model, data.val, data.clip)
    val_m = reconstruction_metrics(data.val, val_recon)
    c2st = c2st_accuracy(data.train, recon, seed=0, settings=C2STSettings(epochs=c2st_epochs),
                         names={"real": "training volumes", "samples": "reconstructions"})
    train_blobs = blob_contrast(data.train, recon, data.train_masks, data.train_parts)
    val_blobs = blob_contrast(data.val, val_recon, data.val_masks, data.val_parts)
    row = {
        **{k: timing[k] for k in ("variant", "tag", "sets", "epochs", "steps", "seconds", "s_per_step",
                                  "s_per_step_wall")},
        "val_psnr": val_m["psnr"], "val_ssim": val_m["ssim"], "val_ms_ssim": val_m["ms_ssim"],
        "c2st_recon_vs_real": c2st["accuracy"], "w1_recon_vs_real": histogram_w1(data.train, recon),
        "blob_contrast_train": train_blobs, "blob_contrast_val": val_blobs,
        "measure_seconds": round(time.perf_counter() - t0, 1),
    }
    return row, recon[data.picture]


def budget_epochs(probes: dict[str, dict[str, Any]], variant: str, ratio: float, base_steps: int) -> int:
    """Whole epochs of ``variant`` that take ``ratio`` times the baseline's ``base_steps`` at probed speeds."""
    base, own = probes["baseline"], probes[variant]
    seconds = ratio * base_steps * base["s_per_step"]
    return max(1, round(seconds / own["s_per_step"] / own["steps_per_epoch"]))


def picture(rows: list[tuple[str, torch.Tensor]], real: torch.Tensor, path: Path) -> None:
    """The app's evaluation grid (``pictures.picture_grid``) on the real data's intensity window."""
    from monai_diffusion.fileio import atomic_write_bytes
    from monai_diffusion.pictures import picture_grid, png_bytes

    image = picture_grid(rows, window=(float(real.min()), float(real.max())), max_columns=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, png_bytes(image))


def _f(v: Any, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Stage 1 and the quickstart phantoms' blobs (issue 26, part 6)", "",
        machine_line(m) + "  ",
        f"Command: `{result['command']}`  ",
        f"Stage-1 budget: {result['budget_ratio']:.2f} x the baseline's {result['base_steps']} steps at the probed "
        f"s/step (the quickstart's stage 1: 50 s on an idle 2-core CPU; allowed: about 120 s). Times: one thread "
        f"(`OMP_NUM_THREADS=1`, torch threads {m['torch_threads']}), on a machine shared with another job.", "",
        "Blob contrast kept: mean over blobs of (recon core - recon shell) / (real core - real shell); 1 = kept, "
        "0 = gone. C2ST: held-out accuracy of a classifier telling reconstructions of the training phantoms from "
        "the phantoms (0.5 = indistinguishable). W1: intensity-histogram W1, reconstructions vs real, over the data "
        "range. PSNR / SSIM: validation phantoms. Seconds: the whole stage-1 call (data, training, validation, "
        "checkpoints); s/step: steady epochs' training time per optimizer step.", "",
    ]
    header = ["variant", "phase", "steps", "seconds", "x baseline-320 s", "s/step", "val PSNR", "val SSIM",
              "C2ST recon vs real", "W1 recon vs real", "blob contrast (train)", "bright / dark", "blob contrast (val)"]
    base_row = next((r for r in result["rows"] if r["variant"] == "baseline" and r["steps"] == result["base_steps"]),
                    None)
    table = []
    for r in result["rows"]:
        b, v = r["blob_contrast_train"], r["blob_contrast_val"]
        rel = _f(r["seconds"] / base_row["seconds"], 2) if base_row else "n/a"
        table.append([r["variant"], r["phase"], r["steps"], f"{r['seconds']:.0f}", rel, f"{r['s_per_step']:.3f}",
                      f"{r['val_psnr']:.2f}", f"{r['val_ssim']:.3f}", f"{r['c2st_recon_vs_real']:.2f}",
                      f"{r['w1_recon_vs_real']:.4f}", f"{b['mean']:.2f} ({b['blobs']})",
                      f"{_f(b['bright'], 2)} / {_f(b['dark'], 2)}", f"{v['mean']:.2f} ({v['blobs']})"])
    lines += [markdown_table(header, table), ""]
    lines += ["Probe (s/step, used for the budgets): " + ", ".join(
        f"{name} {p['s_per_step']:.3f}" for name, p in result["probes"].items()) + ".", ""]
    lines += ["Variants:", ""] + [f"- `{name}`: {', '.join(f'`{s}`' for s in sets) or 'quickstart.yaml as it is'}"
                                  + (f" ({NOTES[name]})" if name in NOTES else "")
                                  for name, sets in result["variants"].items()]
    for phase, png in result["pictures"].items():
        lines += ["", f"![{phase}]({Path(png).name})", "",
                  f"Mid-slices ({phase} phase): training volumes {result['picture_volumes']} (the 4 with the most "
                  "blob voxels on their mid-slices), real first, then each variant's reconstruction; one intensity "
                  "window (the real data's range)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"of {list(VARIANTS)}")
    p.add_argument("--combo", action="append", default=[], help="a combination such as latent8+adv0.01 (repeatable)")
    p.add_argument("--phases", nargs="+", default=["probe", "budget", "base"], choices=["probe", "budget", "base"])
    p.add_argument("--base-for", nargs="+", default=None,
                   help="variants that get the base phase (default: all); the baseline always does")
    p.add_argument("--probe-epochs", type=int, default=3)
    p.add_argument("--base-steps", type=int, default=320, help="the quickstart's stage-1 steps")
    p.add_argument("--budget-ratio", type=float, default=120.0 / 50.0,
                   help="stage-1 budget over the baseline's time (default 120 s / 50 s)")
    p.add_argument("--shell", type=int, default=2, help="shell width around a blob, voxels")
    p.add_argument("--c2st-epochs", type=int, default=30, help="as evaluate (C2STSettings)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/monai_diffusion_stage1_blobs"))
    p.add_argument("--reuse", action="store_true", help="reuse finished runs found in --work-dir")
    p.add_argument("--out", type=Path, default=RESULTS / "stage1_blobs_cpu")
    p.add_argument("--dry-run", action="store_true", help="16^3, 8 phantoms, one-epoch runs: every code path")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = list(dict.fromkeys(["baseline", *args.variants, *args.combo]))
    extra = DRY if args.dry_run else []
    if args.dry_run:
        args.probe_epochs, args.c2st_epochs = 1, 1
    variants = {n: [*extra, *variant_sets(n)] for n in names}
    for n, sets in variants.items():
        load(sets)  # every variant's settings are checked before anything trains
    base_settings = load(extra)
    steps_per_epoch = math.ceil(base_settings.data.synthetic.num_train / base_settings.autoencoder.training.batch_size)
    base_epochs = max(1, round(args.base_steps / steps_per_epoch)) if not args.dry_run else 1

    result: dict[str, Any] = {
        "machine": machine_info("cpu"),
        "command": " ".join(["python", "benchmarks/stage1_blobs.py", *(argv if argv is not None else sys.argv[1:])]),
        "budget_ratio": args.budget_ratio, "base_steps": args.base_steps if not args.dry_run else steps_per_epoch,
        "shell": args.shell, "variants": {n: variant_sets(n) for n in names}, "probes": {}, "rows": [],
        "pictures": {},
    }
    t_start = time.perf_counter()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    data = Data(base_settings, args.work_dir / "data", args.shell)
    result["picture_volumes"] = data.picture

    probes = result["probes"]
    if "probe" in args.phases or "budget" in args.phases:
        for n, sets in variants.items():
            probes[n] = train(args.work_dir, n, "probe", [*sets, f"autoencoder.training.n_epochs={args.probe_epochs}",
                                                           "autoencoder.training.autoencoder_warm_up_n_epochs=0"],
                              args.reuse)
    plan: list[tuple[str, str, int]] = []  # (variant, phase, epochs); the baseline's base run first: the reference
    for n in sorted(names, key=lambda n: n != "baseline"):
        if "budget" in args.phases:
            epochs = 1 if args.dry_run else budget_epochs(probes, n, args.budget_ratio, args.base_steps)
            plan.append((n, "budget", epochs))
        wants_base = args.base_for is None or n == "baseline" or n in args.base_for
        if "base" in args.phases and wants_base and not any(q == (n, "budget", base_epochs) for q in plan):
            plan.append((n, "base", base_epochs))
    shown: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for n, phase, epochs in plan:
        timing = train(args.work_dir, n, f"e{epochs}", [*variants[n], f"autoencoder.training.n_epochs={epochs}"],
                       args.reuse)
        row, recon = measure(timing, data, args.c2st_epochs)
        row["phase"] = phase
        result["rows"].append(row)
        print(f"   {n} {phase}: {row['steps']} steps, {row['seconds']:.0f} s, PSNR {row['val_psnr']:.2f}, "
              f"C2ST {row['c2st_recon_vs_real']:.2f}, W1 {row['w1_recon_vs_real']:.4f}, "
              f"blob contrast {row['blob_contrast_train']['mean']:.2f}", flush=True)
        # the base phase of a variant whose budget is the base step count is shown with the budget runs
        for ph in {phase} | ({"base"} if phase == "budget" and epochs == base_epochs else set()):
            shown.setdefault(ph, []).append((f"{n} {row['steps']}", recon))
        result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        write_results(args.out, result, render(result))
    real = data.train[data.picture]
    for phase, rows in shown.items():
        path = args.out.parent / (args.out.name + ("" if phase == "budget" else f"_{phase}") + ".png")
        picture([("real", real), *rows], data.train, path)
        result["pictures"][phase] = str(path)
    result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    write_results(args.out, result, render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
