"""The CLI's sampling: write samples (and 2D sample grids) and interpolations between two seeds, both through
:class:`~monai_diffusion.pipeline.DiffusionPipeline`, the one sampling path (its :class:`Sampler` and checkpoint
readers are re-exported here under their old names)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import RunError
from .pictures import write_picture
from .pipeline import (
    DiffusionPipeline,
    SampleWriter,
    Sampler,
    condition_shape,
    is_pixel_space,
    load_condition,
    load_diffusion,
    sampling_device,
)
from .sampling import slerp, write_sample

__all__ = ["DiffusionPipeline", "Sampler", "checkpoint_path", "condition_shape", "generate_samples", "interpolate",
           "interpolation_dir", "is_pixel_space", "load_condition", "load_diffusion", "sampling_device"]


def checkpoint_path(settings: Any, checkpoint: str | Path | None = None) -> Path:
    """The stage-2 checkpoint to sample from: the argument, else ``sampling.checkpoint``, else the stage's
    ``best_model.pt``."""
    return Path(checkpoint or settings.sampling.checkpoint
                or Path(settings.diffusion.checkpoints.output_dir) / "best_model.pt")


def generate_samples(settings: Any, checkpoint: str | Path | None = None,
                     condition: str | Path | None = None) -> list[Path]:
    """Write ``sampling.num_samples`` samples to ``sampling.output_dir``; returns the files written.

    Samples carry the voxel spacing and orientation of the training data (the affine stored in the checkpoints),
    are numbered after any samples already in the folder, and never replace an existing file. 2D samples written with
    ``sampling.save_format: auto`` also get one grid picture of all of them, ``grids/grid_<first>-<last>.png`` (in
    a subfolder, so that the samples folder holds only samples, as ``evaluate --samples`` reads it). A
    projection-conditioned model needs ``condition``, an image file of its training projection's shape: every sample
    is generated for it (with ``sampling.guidance_scale``).
    """
    cfg = settings.sampling
    path = checkpoint_path(settings, checkpoint)
    if condition is not None and not Path(condition).expanduser().is_file():
        raise RunError(f"condition file not found: {condition}")  # before the checkpoint is read
    pipe = DiffusionPipeline(path, settings)
    sampler = pipe.sampler(condition=condition)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed if cfg.seed is not None else (settings.seed or 0)
    writer = SampleWriter(out_dir, pipe.affine, len(sampler.latent_shape) - 1, cfg.save_format, cfg.save_png,
                          cfg.pointcloud)
    print(f"sampling {cfg.num_samples} volume(s) from {path} with {sampler.describe()}")
    for first, images in sampler.batches(cfg.num_samples, seed):
        writer.write(images, first, seed)
    written = writer.finish()
    print(f"wrote {len(written)} file(s) to {out_dir}")
    return written


def interpolation_dir(settings: Any, seed_a: int, seed_b: int) -> Path:
    """Where :func:`interpolate` writes: ``<sampling.output_dir>/interpolation_<A>_<B>``."""
    return Path(settings.sampling.output_dir) / f"interpolation_{seed_a}_{seed_b}"


@torch.no_grad()
def interpolate(
    settings: Any, seed_a: int, seed_b: int, steps: int, checkpoint: str | Path | None = None, progress: bool = True,
    condition: str | Path | None = None,
) -> tuple[torch.Tensor, list[Path]]:
    """Samples between two seeds: the initial noise of seed A and of seed B (a latent model's latent noise, or a
    pixel-space model's image noise) interpolated spherically, each mixture denoised deterministically (DDIM with
    eta 0 for DDPM-trained models, whatever ``sampling.scheduler`` says; rectified flow's own Euler sampler), so the
    first and last are the samples that seed A and seed B give alone (``generate_samples`` with ``sampling.seed`` A
    and ``sampling.batch_size`` 1, first sample).

    Writes ``frame_NNNN`` volumes (``sampling.save_format``) and ``strip.png`` (2D: the images in one row; 3D:
    their axial mid-slices) into :func:`interpolation_dir`, which must not hold files yet.

    Args:
        settings: the settings (``sampling``, ``device``).
        seed_a: seed of the first end.
        seed_b: seed of the second end.
        steps: number of samples, both ends included (>= 2).
        checkpoint: stage-2 checkpoint (default as :func:`checkpoint_path`).
        progress: show a progress bar.
        condition: the condition file of a projection-conditioned model (one condition for the whole path).

    Returns:
        ``(samples (steps, C, *spatial) on the CPU, files written)``.
    """
    if steps < 2:
        raise RunError(f"--steps must be at least 2 (the two ends), got {steps}")
    for name, value in (("A", seed_a), ("B", seed_b)):
        if value < 0:
            raise RunError(f"--interpolate seed {name} must be >= 0, got {value}")
    cfg = settings.sampling
    out_dir = interpolation_dir(settings, seed_a, seed_b)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} already holds files; interpolations are never overwritten (remove it or "
                              "choose another sampling.output_dir)")
    path = checkpoint_path(settings, checkpoint)
    if condition is not None and not Path(condition).expanduser().is_file():
        raise RunError(f"condition file not found: {condition}")  # before the checkpoint is read
    sampler = DiffusionPipeline(path, settings).sampler(sampler="deterministic", condition=condition)
    if cfg.scheduler not in ("auto", sampler.sampler):
        print(f"note: interpolation samples with {sampler.sampler.upper()} (deterministic), not "
              f"sampling.scheduler={cfg.scheduler}")
    weights = [i / (steps - 1) for i in range(steps)]
    mixed = slerp(sampler.noise(1, seed_a)[0], sampler.noise(1, seed_b)[0], weights)
    print(f"interpolating seeds {seed_a} -> {seed_b} in {steps} samples from {path} with {sampler.describe()}")
    out = []
    for first in tqdm(range(0, steps, cfg.batch_size), desc="interpolating", disable=not progress):
        noise = mixed[first: first + cfg.batch_size]
        # one condition for the whole path: the class (or random class) that seed A draws
        cond = {k: v[:1].expand(noise.shape[0], *v.shape[1:]) for k, v in sampler.conditions(1, seed_a).items()}
        out.append(sampler.denoise(noise, cond, None).cpu())
    samples = torch.cat(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for i in range(steps):
        written += write_sample(samples[i], out_dir / f"frame_{i:04d}", sampler.affine, cfg.save_format, cfg.save_png)
    written.append(write_picture(samples, out_dir / "strip.png", columns=steps))
    print(f"wrote {len(written)} file(s) to {out_dir}")
    return samples, written
