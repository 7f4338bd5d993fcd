"""Sampling: rebuild autoencoder and UNet from a stage-2 checkpoint and write NIfTI samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .engine import RunError, load_checkpoint, resolve_precision
from .models import autoencoder_from_args, build_unet, load_weights
from .sampling import (
    Conditioner,
    build_scheduler,
    decode_latents,
    next_free_index,
    resolve_sampler,
    sample_latents,
    set_sampling_steps,
    write_sample,
)


def load_diffusion(
    path: str | Path, use_ema: bool = True, use_flash_attention: bool = False
) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Any]]:
    """UNet (EMA weights when present and wanted) and stage-1 network (AutoencoderKL or VQVAE) of a stage-2
    checkpoint, from the checkpoint alone."""
    ckpt = load_checkpoint(path, expected_stage="diffusion")
    unet = build_unet(ckpt["model_args"], use_flash_attention)
    weights = ckpt["state_dict"].get("ema") if use_ema else None
    load_weights(unet, weights if weights is not None else ckpt["state_dict"]["unet"], path)
    autoencoder = autoencoder_from_args(ckpt["autoencoder"]["model_args"], use_flash_attention=use_flash_attention)
    load_weights(autoencoder, ckpt["autoencoder"]["state_dict"], path)
    return unet.eval(), autoencoder.eval(), ckpt


def sampling_device(settings: Any) -> tuple[torch.device, torch.dtype | None]:
    """The device and autocast dtype that sampling and evaluation run with."""
    use_cuda = settings.device.use_cuda and torch.cuda.is_available()
    device = torch.device("cuda", settings.device.gpu_id) if use_cuda else torch.device("cpu")
    return device, resolve_precision(settings.device.mixed_precision, device)


def checkpoint_path(settings: Any, checkpoint: str | Path | None = None) -> Path:
    """The stage-2 checkpoint to sample from: the argument, else ``sampling.checkpoint``, else the stage's
    ``best_model.pt``."""
    return Path(checkpoint or settings.sampling.checkpoint
                or Path(settings.diffusion.checkpoints.output_dir) / "best_model.pt")


class Sampler:
    """Draws decoded samples from a stage-2 checkpoint with the ``sampling`` settings (scheduler, steps, guidance,
    condition, tiled decoding).

    Args:
        settings: the settings (``sampling``, ``device``, ``diffusion.use_flash_attention``).
        path: the stage-2 checkpoint.
    """

    def __init__(self, settings: Any, path: str | Path) -> None:
        cfg = settings.sampling
        self.cfg = cfg
        self.path = Path(path)
        self.device, self.amp = sampling_device(settings)
        unet, autoencoder, ckpt = load_diffusion(path, use_ema=cfg.use_ema,
                                                 use_flash_attention=settings.diffusion.use_flash_attention)
        self.unet, self.autoencoder, self.ckpt = unet.to(self.device), autoencoder.to(self.device), ckpt
        self.conditioner = Conditioner.from_state(ckpt.get("conditioning"))
        if cfg.tile_size is not None:
            try:  # fail before sampling
                autoencoder._check_tiling(tuple(cfg.tile_size), None)
            except ValueError as exc:
                raise RunError(f"sampling.tile_size: {exc}") from exc
        if self.conditioner.covariate_keys and cfg.covariates is None:
            raise RunError(
                f"{path} is conditioned on covariates {self.conditioner.covariate_keys}: set sampling.covariates "
                "(one value per key, in that order)."
            )
        if (cfg.class_label is not None and self.conditioner.num_classes is not None
                and cfg.class_label >= self.conditioner.num_classes):
            raise RunError(f"sampling.class_label {cfg.class_label} is not a class of {path} "
                           f"(classes 0..{self.conditioner.num_classes - 1})")
        args = ckpt["scheduler_args"]
        try:
            self.sampler = resolve_sampler(args, cfg.scheduler, where=str(path))
        except ValueError as exc:
            raise RunError(str(exc)) from None
        self.scheduler = build_scheduler(args, self.sampler)
        self.steps = args["num_train_timesteps"] if self.sampler == "ddpm" else cfg.num_inference_steps
        if self.steps > args["num_train_timesteps"]:
            raise RunError(f"sampling.num_inference_steps={self.steps} is more than the {args['num_train_timesteps']} "
                           f"timesteps {path} was trained with")
        self.latent_shape = tuple(ckpt["latent_shape"])
        set_sampling_steps(self.scheduler, self.steps, self.latent_shape[1:], self.device)
        info = ckpt.get("data_info") or {}
        self.affine = np.asarray(info["affine"], dtype=np.float64) if info.get("affine") is not None else None

    def describe(self) -> str:
        return f"{self.sampler.upper()} ({self.steps} steps) on {self.device}"

    @torch.no_grad()
    def batches(self, n: int, seed: int, progress: bool = True):
        """Yield ``(first index, decoded batch)`` for ``n`` samples, ``sampling.batch_size`` at a time; sample
        ``i`` depends only on ``seed`` and its batch, so the same seed gives the same volumes."""
        cfg, device = self.cfg, self.device
        for first in tqdm(range(0, n, cfg.batch_size), desc="sampling", disable=not progress):
            count = min(cfg.batch_size, n - first)
            generator = torch.Generator(device=device).manual_seed(seed + first)
            noise = torch.randn((count, *self.latent_shape), generator=generator, device=device)
            cond: dict[str, torch.Tensor] = {}
            if self.conditioner.class_key is not None:
                if cfg.class_label is not None:
                    labels = torch.full((count,), cfg.class_label, dtype=torch.long)
                else:
                    labels = torch.randint(0, self.conditioner.num_classes, (count,),
                                           generator=torch.Generator().manual_seed(seed + first))
                cond["class_labels"] = labels.to(device)
            if self.conditioner.covariate_keys:
                cond["context"] = self.conditioner.context(torch.tensor([list(cfg.covariates)] * count), device)
            with _autocast(device, self.amp):
                z = sample_latents(self.unet, self.scheduler, noise, cond, self.conditioner, cfg.guidance_scale,
                                   generator)
                images = decode_latents(self.autoencoder, z.float(), float(self.ckpt["scale_factor"]),
                                        cfg.tile_size).float()
            yield first, images.clamp(0.0, 1.0) if cfg.clip else images

    def sample(self, n: int, seed: int, progress: bool = True) -> torch.Tensor:
        """``n`` decoded samples on the CPU, ``(n, C, *spatial)``."""
        return torch.cat([images.cpu() for _, images in self.batches(n, seed, progress)])


def generate_samples(settings: Any, checkpoint: str | Path | None = None) -> list[Path]:
    """Write ``sampling.num_samples`` samples to ``sampling.output_dir``; returns the files written.

    Samples carry the voxel spacing and orientation of the training data (the affine stored in the checkpoints),
    are numbered after any samples already in the folder, and never replace an existing file.
    """
    cfg = settings.sampling
    path = checkpoint_path(settings, checkpoint)
    sampler = Sampler(settings, path)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = next_free_index(out_dir)
    seed = cfg.seed if cfg.seed is not None else (settings.seed or 0)
    written: list[Path] = []
    print(f"sampling {cfg.num_samples} volume(s) from {path} with {sampler.describe()}")
    for first, images in sampler.batches(cfg.num_samples, seed):
        for i in range(images.shape[0]):
            stem = out_dir / f"sample_{start + first + i:04d}"
            written += write_sample(images[i], stem, sampler.affine, cfg.save_format, cfg.save_png)
    print(f"wrote {len(written)} file(s) to {out_dir}")
    return written


def _autocast(device: torch.device, dtype: torch.dtype | None):
    import contextlib

    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)
