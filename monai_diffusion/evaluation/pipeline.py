"""``evaluate --config``: measure a trained pipeline (stage 1 reconstruction and stage 2 generation) on its data.

The real volumes are the training volumes of ``data`` through the deterministic (validation) transforms; the
reconstructions are the stage-1 autoencoder's (the one stored in the stage-2 checkpoint) of those same volumes; the
samples are drawn from the stage-2 checkpoint with the ``sampling`` settings (or read from a folder). Generation
metrics compare samples with real volumes and with the reconstructions (the best a latent model can do, so that
stage 2 is judged apart from stage 1); reconstruction metrics are reported on the validation volumes, whole: the KL
autoencoder runs in exact tiles of ``autoencoder.tile_size`` (default ``data.voxel_size``), the same result as a
whole-volume pass; a VQ-VAE takes volumes larger than ``data.voxel_size`` through MONAI sliding windows.

A pixel-space checkpoint (``diffusion.space: pixel``) has no autoencoder: its report has the generation metrics
against the real volumes only, without reconstructions or ``stage1_validation``.

A projection-conditioned checkpoint (``diffusion.condition_channels``) draws its samples for the projections of the
validation volumes (of the training volumes when there are none), in turn, and the report adds
``projection_consistency`` (:func:`~monai_diffusion.evaluation.metrics.projection_consistency`). Samples read from a
folder have no known conditions, so that entry is left out.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..conditioning import projection
from ..data import build_datasets, build_transforms, training_geometry, validates_whole_volumes
from ..errors import EvaluateError, RunError
from ..generate import checkpoint_path
from ..pipeline import DiffusionPipeline
from ..models import is_vq, reconstruct, total_factor
from ..settings import Settings
from .c2st import C2STSettings
from .io import load_volume_folder
from .metrics import projection_consistency, reconstruction_metrics
from .report import compare_sets, write_report


def default_report_path(settings: Settings) -> Path:
    """``evaluation.json`` beside the stage-2 output folder (e.g. ``runs/quickstart/evaluation.json``)."""
    return Path(settings.diffusion.checkpoints.output_dir).expanduser().parent / "evaluation.json"


def _load(transform, files: list[str], what: str) -> list[torch.Tensor]:
    out = []
    for f in tqdm(files, desc=f"loading {what}", leave=False):
        out.append(transform({"image": f})["image"].as_subclass(torch.Tensor).float())
    return out


@torch.no_grad()
def _reconstruct(autoencoder: torch.nn.Module, volumes: list[torch.Tensor], tile: tuple[int, ...],
                 device: torch.device, what: str, clip: bool) -> list[torch.Tensor]:
    """Each volume through the whole autoencoder, clipped to [0, 1] like the samples when ``clip``
    (``sampling.clip``). The KL autoencoder runs in exact tiles of ``tile`` (the whole-volume result, memory bounded by
    the tile); the VQ-VAE takes volumes larger than ``tile`` through MONAI sliding windows (overlap 0.25, Gaussian
    blending)."""
    from monai.inferers import sliding_window_inference

    out = []
    for v in tqdm(volumes, desc=f"reconstructing {what}", leave=False):
        x = v.unsqueeze(0).to(device)
        if not is_vq(autoencoder):
            y = reconstruct(autoencoder, x, tile_size=tile)
        elif tuple(x.shape[2:]) == tile:
            y = reconstruct(autoencoder, x)
        else:
            y = sliding_window_inference(x, roi_size=tile, sw_batch_size=1,
                                         predictor=functools.partial(reconstruct, autoencoder), overlap=0.25,
                                         mode="gaussian")
        y = y.float().cpu()[0]
        out.append(y.clamp(0.0, 1.0) if clip else y)
    return out


def _validation_metrics(val: list[torch.Tensor], recon: list[torch.Tensor], roi: tuple[int, ...]) -> dict[str, Any]:
    """Reconstruction metrics of the validation volumes (of one size: together; of several: one by one, merged)."""
    if len({tuple(v.shape) for v in val}) == 1:
        result = reconstruction_metrics(torch.stack(val), torch.stack(recon))
    else:
        parts = [reconstruction_metrics(v.unsqueeze(0), r.unsqueeze(0)) for v, r in zip(val, recon)]
        per_volume = {k: [x for p in parts for x in p["per_volume"][k]] for k in parts[0]["per_volume"]}
        result = {k: sum(v) / len(v) for k, v in per_volume.items()}
        result.update(per_volume=per_volume, count=len(val), data_range=1.0, ms_ssim_settings="per volume")
    result["tiled"] = any(tuple(v.shape[1:]) != roi for v in val)  # volumes other than one tile: tiles or windows
    return result


def evaluate_pipeline(
    settings: Settings,
    checkpoint: str | Path | None = None,
    *,
    num_samples: int | None = None,
    samples_dir: str | Path | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    c2st: C2STSettings | None = None,
    fid_weights: str | Path | None = None,
    overwrite: bool = False,
    frd: bool | None = None,
) -> tuple[dict[str, Any], list[Path]]:
    """Evaluate a trained pipeline and write the report (JSON, Markdown, PNG grid).

    Args:
        settings: validated settings of the run (its ``data``, ``diffusion.checkpoints`` and ``sampling``).
        checkpoint: stage-2 checkpoint (default: ``sampling.checkpoint``, else ``best_model.pt`` of stage 2).
        num_samples: samples to draw (default: as many as there are real volumes, so that C2ST is balanced).
        samples_dir: take the samples from this folder instead of drawing them.
        out: report path ending in ``.json`` (default :func:`default_report_path`).
        seed: seed of the sampling noise, the C2ST and the diversity pairs.
        c2st: settings of the classifier two-sample test.
        fid_weights: local feature-extractor file for the optional FID.
        overwrite: replace an existing report.
        frd: the Fréchet Radiomics Distance (None: when ``frd-score`` is installed; True: required; False: skipped).

    Returns:
        ``(report, files written)``.
    """
    started = time.perf_counter()
    out = Path(out).expanduser() if out is not None else default_report_path(settings)
    if out.suffix.lower() != ".json":
        raise EvaluateError(f"--out must name a .json file, got {str(out)!r}")
    if not overwrite:
        for p in (out, out.with_suffix(".md"), out.with_suffix(".png")):
            if p.exists():
                raise EvaluateError(f"report file {str(p)!r} already exists; choose another --out or pass --overwrite")
    path = checkpoint_path(settings, checkpoint)
    if not path.is_file():
        raise RunError(f"stage-2 checkpoint not found: {path} (train stage 2 first, or pass --checkpoint)")
    sampler = DiffusionPipeline(path, settings).sampler(require_condition=False)
    if samples_dir is None:  # the memory of a sampling batch, before any volume is loaded or reconstructed
        sampler.check_memory(min(settings.sampling.batch_size, num_samples or settings.sampling.batch_size), print)
    autoencoder = sampler.autoencoder
    pixel = autoencoder is None
    # a pixel-space UNet takes the images themselves: its own arguments give their axes and channels
    ae_args = sampler.ckpt["model_args"] if pixel else sampler.ckpt["autoencoder"]["model_args"]
    dims = ae_args["spatial_dims"]
    # KL: exact tiles of autoencoder.tile_size (default data.voxel_size); VQ-VAE: sliding windows of data.voxel_size
    roi = tuple(settings.data.voxel_size if pixel or is_vq(autoencoder) else
                settings.autoencoder.tile_size or settings.data.voxel_size)
    whole_val = validates_whole_volumes(settings.data) and not pixel
    stage_dir = settings.diffusion.checkpoints.output_dir if pixel else settings.autoencoder.checkpoints.output_dir
    _, _, info = build_datasets(settings.data, spatial_dims=dims, in_channels=ae_args["in_channels"],
                                work_dir=Path(stage_dir).expanduser().parent)
    val_tf = build_transforms(settings.data, dims, train=False,
                              divisible_by=total_factor(autoencoder) if whole_val else None)
    # generation is compared with training volumes as training sees them (random patches: centre crops)
    real_tf = build_transforms(training_geometry(settings.data), dims, train=False)
    real = torch.stack(_load(real_tf, info["train_files"], "training volumes"))
    val = _load(val_tf, info["val_files"], "validation volumes")
    device = sampler.device
    clip = settings.sampling.clip
    recon = None if pixel else torch.stack(_reconstruct(autoencoder, list(real), roi, device, "training volumes", clip))
    val_recon = None if pixel else _reconstruct(autoencoder, val, roi, device, "validation volumes", clip)
    sampling_seconds = None
    conditions = None
    if samples_dir is not None:
        samples, samples_meta = load_volume_folder(samples_dir, what="samples")
        how = f"read from {samples_dir}"
    else:
        n = num_samples if num_samples is not None else real.shape[0]
        if n < 2:
            raise EvaluateError(f"--num-samples must be at least 2, got {n}")
        if sampler.projection_axis is not None:  # condition sample i on the projection of validation volume i
            sources = _load(real_tf, info["val_files"], "validation volumes") if info["val_files"] else list(real)
            conditions = torch.stack([projection(sources[i % len(sources)], sampler.projection_axis)
                                      for i in range(n)])
            sampler.set_condition(conditions)
        print(f"drawing {n} samples from {path} with {sampler.describe()}")
        t0 = time.perf_counter()
        samples, samples_meta = sampler.sample(n, seed), None
        sampling_seconds = time.perf_counter() - t0
        how = f"drawn from {path}"
    names = {"real": f"training volumes of {info['source_description']}", "samples": f"samples {how}"}
    if not pixel:
        names["recon"] = "reconstructions of the training volumes"
    report = compare_sets(real, samples, recon=recon, seed=seed, c2st=c2st, fid_weights=fid_weights, names=names,
                          meta={"samples": samples_meta} if samples_meta else None, frd=frd)
    if conditions is not None:
        report["projection_consistency"] = projection_consistency(samples, conditions, sampler.projection_axis)
        report["projection_consistency"]["conditions"] = ("validation" if info["val_files"] else "training") + \
            " volumes' projections"
    if not pixel:
        report["stage1_validation"] = _validation_metrics(val, val_recon, roi)
        report["stage1_validation"]["files"] = info["val_files"]
    report["pipeline"] = {
        "checkpoint": str(path),
        "space": "pixel" if pixel else "latent",
        "autoencoder": None if pixel else sampler.ckpt["autoencoder"].get("source"),
        "sampler": sampler.sampler,
        "steps": sampler.steps,
        "guidance_scale": sampler.cfg.guidance_scale,
        "sampling_seed": seed,
        "samples": how,
        "sampling_seconds": None if sampling_seconds is None else round(sampling_seconds, 2),
        "seconds": round(time.perf_counter() - started, 1),
    }
    written = write_report(report, out, real=real, recon=recon, samples=samples, overwrite=overwrite)
    return report, written
