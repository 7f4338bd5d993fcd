"""Sampling: rebuild autoencoder and UNet from a stage-2 checkpoint and write NIfTI samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from generative.networks.nets import AutoencoderKL

from .engine import RunError, load_checkpoint, resolve_precision
from .models import autoencoder_from_args, build_unet, load_weights
from .sampling import Conditioner, build_scheduler, decode_latents, next_free_index, sample_latents, write_sample


def load_diffusion(
    path: str | Path, use_ema: bool = True, use_flash_attention: bool = False
) -> tuple[torch.nn.Module, AutoencoderKL, dict[str, Any]]:
    """UNet (EMA weights when present and wanted) and autoencoder of a stage-2 checkpoint, from the checkpoint alone."""
    ckpt = load_checkpoint(path, expected_stage="diffusion")
    unet = build_unet(ckpt["model_args"], use_flash_attention)
    weights = ckpt["state_dict"].get("ema") if use_ema else None
    load_weights(unet, weights if weights is not None else ckpt["state_dict"]["unet"], path)
    autoencoder = autoencoder_from_args(ckpt["autoencoder"]["model_args"], use_flash_attention=use_flash_attention)
    load_weights(autoencoder, ckpt["autoencoder"]["state_dict"], path)
    return unet.eval(), autoencoder.eval(), ckpt


def generate_samples(settings: Any, checkpoint: str | Path | None = None) -> list[Path]:
    """Write ``sampling.num_samples`` samples to ``sampling.output_dir``; returns the files written.

    Samples carry the voxel spacing and orientation of the training data (the affine stored in the checkpoints),
    are numbered after any samples already in the folder, and never replace an existing file.
    """
    cfg = settings.sampling
    path = Path(checkpoint or cfg.checkpoint or Path(settings.diffusion.checkpoints.output_dir) / "best_model.pt")
    use_cuda = settings.device.use_cuda and torch.cuda.is_available()
    device = torch.device("cuda", settings.device.gpu_id) if use_cuda else torch.device("cpu")
    amp = resolve_precision(settings.device.mixed_precision, device)
    unet, autoencoder, ckpt = load_diffusion(path, use_ema=cfg.use_ema,
                                             use_flash_attention=settings.diffusion.use_flash_attention)
    unet, autoencoder = unet.to(device), autoencoder.to(device)
    conditioner = Conditioner.from_state(ckpt.get("conditioning"))
    if cfg.tile_size is not None:
        try:  # fail before sampling
            autoencoder._check_tiling(tuple(cfg.tile_size), None)
        except ValueError as exc:
            raise RunError(f"sampling.tile_size: {exc}") from exc
    if conditioner.covariate_keys and cfg.covariates is None:
        raise RunError(
            f"{path} is conditioned on covariates {conditioner.covariate_keys}: set sampling.covariates "
            "(one value per key, in that order)."
        )
    scheduler = build_scheduler(ckpt["scheduler_args"], cfg.scheduler)
    steps = ckpt["scheduler_args"]["num_train_timesteps"] if cfg.scheduler == "ddpm" else cfg.num_inference_steps
    scheduler.set_timesteps(steps, device=device)
    info = ckpt.get("data_info") or {}
    affine = np.asarray(info["affine"], dtype=np.float64) if info.get("affine") is not None else None
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = next_free_index(out_dir)
    seed = cfg.seed if cfg.seed is not None else (settings.seed or 0)
    latent_shape = tuple(ckpt["latent_shape"])
    written: list[Path] = []
    print(f"sampling {cfg.num_samples} volume(s) from {path} with {cfg.scheduler.upper()} ({steps} steps) on {device}")
    for first in tqdm(range(0, cfg.num_samples, cfg.batch_size), desc="batches"):
        n = min(cfg.batch_size, cfg.num_samples - first)
        generator = torch.Generator(device=device).manual_seed(seed + first)
        noise = torch.randn((n, *latent_shape), generator=generator, device=device)
        cond: dict[str, torch.Tensor] = {}
        if conditioner.class_key is not None:
            if cfg.class_label is not None:
                labels = torch.full((n,), cfg.class_label, dtype=torch.long)
            else:
                labels = torch.randint(0, conditioner.num_classes, (n,), generator=torch.Generator().manual_seed(seed + first))
            cond["class_labels"] = labels.to(device)
        if conditioner.covariate_keys:
            cond["context"] = conditioner.context(torch.tensor([list(cfg.covariates)] * n), device)
        with torch.no_grad(), _autocast(device, amp):
            z = sample_latents(unet, scheduler, noise, cond, conditioner, cfg.guidance_scale, generator)
            images = decode_latents(autoencoder, z.float(), float(ckpt["scale_factor"]), cfg.tile_size).float()
        for i in range(n):
            stem = out_dir / f"sample_{start + first + i:04d}"
            written += write_sample(images[i], stem, affine, cfg.save_format, cfg.save_png)
    print(f"wrote {len(written)} file(s) to {out_dir}")
    return written


def _autocast(device: torch.device, dtype: torch.dtype | None):
    import contextlib

    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)
