"""Sampling: the reverse process (in latent or pixel space, with classifier-free guidance), decoding its result to
images on the data's [0, 1] scale, interpolation of the initial noise, and writing the samples.

The writers live here because samples are what sampling makes: :func:`write_sample` writes one as NIfTI, npy, a 2D
PNG or a point cloud, numbered by :func:`next_free_index` so that nothing is overwritten. Pictures of samples
(preview PNGs, grids, strips) are drawn by :mod:`monai_diffusion.pictures`; schedulers and conditions come from
:mod:`monai_diffusion.conditioning`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from tqdm.auto import tqdm

from .conditioning import PIXEL_RANGE, SAMPLERS, Conditioner, from_pixel_space
from .errors import ConfigError
from .fileio import refuse_existing
from .models import decode_latent, is_vq
from .pictures import as_shown, write_preview
from .settings import PointCloudSettings

# settings.py's cross-field check still reads the sampler names as ``sampling.SAMPLERS``; they live in
# conditioning.py (until the settings package owns them as plain data)
__all__ = ["SAMPLERS", "sample_latents", "decode_latents", "decode_samples", "slerp", "next_free_index",
           "write_sample"]

_NEVER_OVERWRITTEN = "samples are never overwritten."


@torch.no_grad()
def sample_latents(
    unet: nn.Module,
    scheduler: DDPMScheduler | DDIMScheduler | RFlowScheduler,
    noise: torch.Tensor,
    cond: dict[str, torch.Tensor] | None = None,
    conditioner: Conditioner | None = None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Run the reverse process from ``noise``; with ``guidance_scale != 1`` use classifier-free guidance."""
    cond = cond or {}
    guided = bool(cond) and conditioner is not None and guidance_scale != 1.0
    if guided:
        null = conditioner.null_like(cond)
        both = {k: torch.cat([null[k], v]) for k, v in cond.items()}
    x = noise
    times = [int(t) for t in scheduler.timesteps]
    for i, t in enumerate(tqdm(times, desc="sampling", disable=not progress, leave=False)):
        timesteps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if guided:
            out = unet(torch.cat([x, x]), torch.cat([timesteps, timesteps]), **both)
            uncond, conditional = out.chunk(2)
            out = uncond + guidance_scale * (conditional - uncond)
        else:
            out = unet(x, timesteps, **cond)
        if isinstance(scheduler, RFlowScheduler):  # the step goes to the next (possibly transformed) timestep
            x, _ = scheduler.step(out.float(), t, x, next_timestep=times[i + 1] if i + 1 < len(times) else 0)
        else:
            kwargs = {"generator": generator} if isinstance(scheduler, DDIMScheduler) else {}
            x, _ = scheduler.step(out.float(), t, x, **kwargs)
    return x


def decode_latents(autoencoder: nn.Module, z: torch.Tensor, scale_factor: float, tile_size: Sequence[int] | None,
                   progress: bool = False) -> torch.Tensor:
    """Undo the latent scaling and decode (:func:`monai_diffusion.models.decode_latent`: in exact tiles when
    ``tile_size`` is given, with a progress bar of the tile passes when ``progress``; a VQ-VAE quantises the latent
    to its codebook first)."""
    if tile_size is not None and is_vq(autoencoder):
        raise ConfigError(f"{list(tile_size)}: tiled decoding is for the KL autoencoder, this checkpoint's stage 1 "
                          f"is a {type(autoencoder).__name__}; set it to null", key="sampling.tile_size")
    return decode_latent(autoencoder, z / scale_factor, tile_size, progress=progress)


def decode_samples(
    x: torch.Tensor, autoencoder: nn.Module | None, scale_factor: float, tile_size: Sequence[int] | None,
    pixel_range: Sequence[float] | None = None, progress: bool = False,
) -> torch.Tensor:
    """What the reverse process produced -> images on the data's [0, 1] scale: decoded latents, or (no autoencoder:
    a pixel-space model) the samples mapped back from ``pixel_range``."""
    if autoencoder is None:
        return from_pixel_space(x, pixel_range if pixel_range is not None else PIXEL_RANGE)
    return decode_latents(autoencoder, x, scale_factor, tile_size, progress)


def slerp(a: torch.Tensor, b: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Spherical interpolation between two noise tensors of the same shape, one result per weight in [0, 1].

    Gaussian noise of many values lies near a sphere; the great-circle path keeps the norm a sampler expects, where
    a straight line would shrink it halfway. Nearly parallel inputs fall back to the straight line. Weight 0 gives
    ``a`` and weight 1 gives ``b`` exactly.

    Args:
        a: noise of the first end, any shape.
        b: noise of the second end, the shape of ``a``.
        weights: positions along the path, 0 = ``a``, 1 = ``b``.

    Returns:
        ``(len(weights), *a.shape)``.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs two tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    fa, fb = a.double().flatten(), b.double().flatten()
    cos = torch.dot(fa, fb) / (fa.norm() * fb.norm()).clamp_min(1e-300)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    out = []
    for w in weights:
        w = float(w)
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"slerp weights must be in [0, 1], got {w}")
        if w == 0.0:
            out.append(a.clone())
        elif w == 1.0:
            out.append(b.clone())
        elif float(theta) < 1e-4:
            out.append(((1 - w) * fa + w * fb).to(a.dtype).view_as(a))
        else:
            s = torch.sin(theta)
            mixed = torch.sin((1 - w) * theta) / s * fa + torch.sin(w * theta) / s * fb
            out.append(mixed.to(a.dtype).view_as(a))
    return torch.stack(out)


def next_free_index(folder: Path, prefix: str = "sample_") -> int:
    """First index after every ``<prefix>NNNN.*`` already in ``folder`` (so nothing is overwritten)."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    indices = [int(m.group(1)) for p in folder.glob(f"{prefix}*") if (m := pattern.match(p.name))]
    return max(indices) + 1 if indices else 0


def write_sample(
    volume: torch.Tensor, path_stem: Path, affine: np.ndarray | None, save_format: str = "auto", png: bool = True,
    pointcloud: PointCloudSettings | None = None, seed: int = 0,
) -> list[Path]:
    """Write one (C, *spatial) sample; returns the files written. Refuses to replace an existing file.

    Args:
        volume: the sample, channels first.
        path_stem: file path without extension.
        affine: the training data's affine (NIfTI header); None = identity.
        save_format: ``nifti`` (.nii.gz), ``npy``, ``png`` (2D only: the image itself, 8-bit, values in [0, 1]
            mapped to 0-255, oriented as PIL read the training images), ``auto`` (png for 2D, nifti for 3D),
            ``pointcloud`` (a CSV of points in physical units, see :func:`monai_diffusion.pointcloud.export_sample`)
            or ``both`` (nifti and pointcloud).
        png: also write a preview PNG of the mid-slices (not needed, and not written, when the sample is a PNG).
        pointcloud: the ``sampling.pointcloud`` settings (needed by ``pointcloud`` and ``both``).
        seed: seed of the point draw (sampling seed + sample index).
    """
    spatial_dims = volume.ndim - 1
    if save_format == "auto":
        save_format = "png" if spatial_dims == 2 else "nifti"
    array = volume.detach().float().cpu().numpy()
    array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)  # channels last, as NIfTI stores them
    points = save_format in ("pointcloud", "both")
    if points:
        if volume.shape[0] != 1:
            raise ValueError(f"save_format {save_format} exports single-channel samples, "
                             f"got {volume.shape[0]} channels")
        if pointcloud is None:
            raise ValueError(f"save_format {save_format} needs the sampling.pointcloud settings, got None")
        for suffix in (".csv",) + ((".ply",) if pointcloud.ply else ()):
            refuse_existing([path_stem.with_name(path_stem.name + suffix)], hint=_NEVER_OVERWRITTEN)
    written = []
    if save_format in ("nifti", "both"):
        import nibabel as nib

        path = path_stem.with_name(path_stem.name + ".nii.gz")
        refuse_existing([path], hint=_NEVER_OVERWRITTEN)
        nib.save(nib.Nifti1Image(array.astype(np.float32), affine if affine is not None else np.eye(4)), str(path))
        written.append(path)
    elif save_format == "png":
        from PIL import Image

        if spatial_dims != 2:
            raise ValueError(f"save_format png needs 2D samples, got {spatial_dims} spatial axes")
        path = path_stem.with_name(path_stem.name + ".png")
        refuse_existing([path], hint=_NEVER_OVERWRITTEN)
        pixels = np.clip(array, 0.0, 1.0) * 255.0 + 0.5
        # MONAI's PILReader gives (width, height): back to PIL's (height, width), as pictures show 2D images
        pixels = as_shown(pixels).astype(np.uint8)
        Image.fromarray(pixels).save(path)
        written.append(path)
        png = False
    elif save_format == "npy":
        path = path_stem.with_name(path_stem.name + ".npy")
        refuse_existing([path], hint=_NEVER_OVERWRITTEN)
        np.save(path, array.astype(np.float32))
        written.append(path)
    if points:
        from .pointcloud import export_sample

        written += export_sample(array, affine, path_stem, pointcloud, seed)
    if png:
        written.append(write_preview(volume, path_stem.with_name(path_stem.name + ".png")))
    return written
