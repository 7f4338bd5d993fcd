"""Reverse diffusion (in latent or pixel space), conditioning tensors, interpolation of the initial noise, and writing
samples as NIfTI / PNG / npy / point clouds (+ PNG previews, sample grids and interpolation strips)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from tqdm.auto import tqdm

from .visualize import orthogonal_slices


# the samplers that are valid for each training objective, the first being the default ("auto")
SAMPLERS = {"ddpm": ("ddim", "ddpm"), "rflow": ("rflow",)}

# pixel-space diffusion learns the images mapped linearly from [0, 1] (the data's scaled range) to this interval, the
# range of the DDPM paper, whose spread matches the unit-variance noise better than [0, 1] does
PIXEL_RANGE = (-1.0, 1.0)


def to_pixel_space(images: torch.Tensor, pixel_range: Sequence[float] = PIXEL_RANGE) -> torch.Tensor:
    """Images in [0, 1] -> the interval ``pixel_range`` that a pixel-space UNet learns."""
    lo, hi = float(pixel_range[0]), float(pixel_range[1])
    return images * (hi - lo) + lo


def from_pixel_space(x: torch.Tensor, pixel_range: Sequence[float] = PIXEL_RANGE) -> torch.Tensor:
    """Inverse of :func:`to_pixel_space`: back to the data's [0, 1] scale."""
    lo, hi = float(pixel_range[0]), float(pixel_range[1])
    return (x - lo) / (hi - lo)


# the "no condition" projection of classifier-free guidance: a constant outside [0, 1], where every normalised
# projection lies, so the encoder can tell it from any real condition
NULL_PROJECTION = -1.0


def normalise_projection(image: torch.Tensor) -> torch.Tensor:
    """Min-max scaling of each 2D image of ``(..., C, H, W)`` to [0, 1], over its channels and pixels together; a
    constant image becomes all zeros."""
    dims = (-3, -2, -1)
    lo, hi = image.amin(dim=dims, keepdim=True), image.amax(dim=dims, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (image - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(image))


def projection(volume: torch.Tensor, axis: int) -> torch.Tensor:
    """The condition of a projection-conditioned model: the sum of a volume along one spatial axis, scaled to [0, 1]
    per image by :func:`normalise_projection`.

    Args:
        volume: ``(C, X, Y, Z)`` or ``(B, C, X, Y, Z)``, channels first.
        axis: the spatial axis summed over, 0, 1 or 2 (``diffusion.projection_axis``).

    Returns:
        ``(C, ...)`` or ``(B, C, ...)`` with the two other spatial axes in their order, float32.
    """
    if volume.ndim not in (4, 5):
        raise ValueError(f"projection needs a (C, X, Y, Z) or (B, C, X, Y, Z) volume, got shape {tuple(volume.shape)}")
    if axis not in (0, 1, 2):
        raise ValueError(f"projection axis must be 0, 1 or 2, got {axis}")
    summed = torch.as_tensor(volume).as_subclass(torch.Tensor).float().sum(dim=axis - 3)
    return normalise_projection(summed)


def objective(args: dict[str, Any]) -> str:
    """The training objective stored in a checkpoint's scheduler arguments (older checkpoints: ``ddpm``)."""
    return args.get("type", "ddpm")


def resolve_sampler(args: dict[str, Any], sampler: str, where: str = "") -> str:
    """The sampler to use for a model trained with ``args``: ``auto`` picks the default for its objective; an
    invalid pairing is a :class:`ValueError` naming both."""
    kind = objective(args)
    if sampler == "auto":
        return SAMPLERS[kind][0]
    if sampler not in SAMPLERS[kind]:
        raise ValueError(
            f"sampling.scheduler={sampler} cannot sample a model trained with diffusion.scheduler.type={kind}"
            + (f" ({where})" if where else "") + f"; use one of {', '.join(('auto',) + SAMPLERS[kind])}"
        )
    return sampler


def build_scheduler(args: dict[str, Any], kind: str = "train") -> DDPMScheduler | DDIMScheduler | RFlowScheduler:
    """MONAI core scheduler from stored scheduler arguments.

    Args:
        args: ``num_train_timesteps`` and ``type`` (``ddpm``: plus ``schedule``, betas and ``prediction_type``;
            ``rflow``: plus ``sample_method``, ``use_timestep_transform`` and ``spatial_dims``).
        kind: ``train`` (the objective's training scheduler), or a sampler: ``ddpm`` / ``ddim`` for DDPM-trained
            models, ``rflow`` for rectified-flow ones.

    Latents are not bounded, so DDPM/DDIM sample clipping is off unless ``args`` has ``clip_sample`` (pixel-space
    models: the predicted clean image is clipped to ``clip_range``). Rectified flow uses MONAI's ``RFlowScheduler``
    with discrete timesteps; its timestep transform, when on, shifts timesteps by the latent's size relative to
    32 voxels per axis.
    """
    if objective(args) == "rflow":
        if kind not in ("train", "rflow"):
            resolve_sampler(args, kind)
        dims = int(args.get("spatial_dims", 3))
        return RFlowScheduler(
            num_train_timesteps=args["num_train_timesteps"],
            use_discrete_timesteps=True,
            sample_method=args.get("sample_method", "uniform"),
            use_timestep_transform=bool(args.get("use_timestep_transform", True)),
            base_img_size_numel=32**dims,
            spatial_dim=dims,
        )
    common = {
        "num_train_timesteps": args["num_train_timesteps"],
        "schedule": args["schedule"],
        "prediction_type": args["prediction_type"],
        "clip_sample": bool(args.get("clip_sample", False)),
    }
    if common["clip_sample"]:
        low, high = args.get("clip_range", PIXEL_RANGE)
        common.update(clip_sample_min=float(low), clip_sample_max=float(high))
    if args["schedule"] != "cosine":
        common.update(beta_start=args["beta_start"], beta_end=args["beta_end"])
    if kind == "ddim":
        return DDIMScheduler(**common)
    if kind in ("ddpm", "train"):
        return DDPMScheduler(**common)
    resolve_sampler(args, kind)
    raise ValueError(f"unknown sampler {kind!r}")


def set_sampling_steps(scheduler: Any, steps: int, latent_spatial: Sequence[int], device: Any = None) -> None:
    """``scheduler.set_timesteps`` for ``steps`` steps (rectified flow also takes the latent size)."""
    if isinstance(scheduler, RFlowScheduler):
        scheduler.set_timesteps(steps, device=device, input_img_size_numel=int(np.prod(latent_spatial)))
    else:
        scheduler.set_timesteps(steps, device=device)


class Conditioner:
    """Turns per-volume conditions into the UNet's ``class_labels`` / cross-attention ``context`` / ``projection``.

    Class labels index an embedding table with one extra row, ``num_classes``, meaning "no class". Covariates are
    standardised with the training-set statistics and followed by a presence flag of 1, so an all-zero context
    means "no condition". A projection condition is the image's :func:`projection` along ``projection_axis``
    (computed from the batch's images, or taken from its ``projection`` entry); its "no condition" is an image of
    :data:`NULL_PROJECTION`. Dropping conditions at random in training teaches the unconditional model that
    classifier-free guidance needs.

    Args:
        class_key: batch key of the categorical label, or None.
        num_classes: number of classes of ``class_key``.
        covariate_keys: batch keys of continuous covariates.
        covariate_stats: ``{key: (mean, std)}`` from the training data.
        projection_axis: spatial axis of the images' projection condition; None = no projection condition.
    """

    def __init__(
        self,
        class_key: str | None = None,
        num_classes: int | None = None,
        covariate_keys: Sequence[str] = (),
        covariate_stats: dict[str, Sequence[float]] | None = None,
        projection_axis: int | None = None,
    ) -> None:
        self.class_key = class_key
        self.num_classes = num_classes
        self.covariate_keys = list(covariate_keys)
        self.covariate_stats = {k: (float(v[0]), float(v[1])) for k, v in (covariate_stats or {}).items()}
        self.projection_axis = projection_axis

    @property
    def active(self) -> bool:
        return self.class_key is not None or bool(self.covariate_keys) or self.projection_axis is not None

    def state(self) -> dict[str, Any]:
        return {
            "class_key": self.class_key,
            "num_classes": self.num_classes,
            "covariate_keys": self.covariate_keys,
            "covariate_stats": {k: list(v) for k, v in self.covariate_stats.items()},
            "projection_axis": self.projection_axis,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> Conditioner:
        return cls(**state) if state else cls()

    def from_batch(self, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        """UNet keyword arguments for the conditions stored in a batch."""
        out: dict[str, torch.Tensor] = {}
        if self.class_key is not None:
            labels = torch.as_tensor(batch[self.class_key]).long().reshape(-1)
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(
                    f"'{self.class_key}' values must be in [0, {self.num_classes - 1}] "
                    f"(diffusion.conditioning.num_classes), got {labels.tolist()}"
                )
            out["class_labels"] = labels.to(device)
        if self.covariate_keys:
            values = torch.stack([torch.as_tensor(batch[k]).double().reshape(-1) for k in self.covariate_keys], dim=1)
            out["context"] = self.context(values, device)
        if self.projection_axis is not None:
            if "projection" in batch:  # cached latents keep the projection of their image
                out["projection"] = torch.as_tensor(batch["projection"]).as_subclass(torch.Tensor).float().to(device)
            else:
                out["projection"] = projection(batch["image"], self.projection_axis).to(device)
        return out

    def context(self, values: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(B, n_covariates) raw values -> (B, 1, n_covariates + 1) standardised context with presence flag."""
        mean = torch.tensor([self.covariate_stats[k][0] for k in self.covariate_keys], dtype=torch.float64)
        std = torch.tensor([self.covariate_stats[k][1] for k in self.covariate_keys], dtype=torch.float64)
        z = (values.double().cpu() - mean) / std
        flag = torch.ones(z.shape[0], 1, dtype=torch.float64)
        return torch.cat([z, flag], dim=1).unsqueeze(1).float().to(device)

    def null_like(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The "no condition" counterpart of ``cond``."""
        out = {}
        if "class_labels" in cond:
            out["class_labels"] = torch.full_like(cond["class_labels"], self.num_classes)
        if "context" in cond:
            out["context"] = torch.zeros_like(cond["context"])
        if "projection" in cond:
            out["projection"] = torch.full_like(cond["projection"], NULL_PROJECTION)
        return out

    def drop(self, cond: dict[str, torch.Tensor], probability: float) -> dict[str, torch.Tensor]:
        """Replace each item's condition by the null condition with the given probability."""
        if not cond or probability <= 0:
            return cond
        first = next(iter(cond.values()))
        keep = torch.rand(first.shape[0], device=first.device) >= probability
        null = self.null_like(cond)
        out = {}
        for key, value in cond.items():
            mask = keep.view(-1, *([1] * (value.ndim - 1)))
            out[key] = torch.where(mask, value, null[key])
        return out


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
    from .models import decode_latent, is_vq

    if tile_size is not None and is_vq(autoencoder):
        from .errors import ConfigError

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
    pointcloud: Any = None, seed: int = 0,
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
            _refuse_existing(path_stem.with_name(path_stem.name + suffix))
    written = []
    if save_format in ("nifti", "both"):
        import nibabel as nib

        path = path_stem.with_name(path_stem.name + ".nii.gz")
        _refuse_existing(path)
        nib.save(nib.Nifti1Image(array.astype(np.float32), affine if affine is not None else np.eye(4)), str(path))
        written.append(path)
    elif save_format == "png":
        from PIL import Image

        if spatial_dims != 2:
            raise ValueError(f"save_format png needs 2D samples, got {spatial_dims} spatial axes")
        path = path_stem.with_name(path_stem.name + ".png")
        _refuse_existing(path)
        pixels = np.clip(array, 0.0, 1.0) * 255.0 + 0.5
        # MONAI's PILReader gives (width, height): transpose back to PIL's (height, width)
        pixels = np.swapaxes(pixels, 0, 1).astype(np.uint8)
        Image.fromarray(pixels).save(path)
        written.append(path)
        png = False
    elif save_format == "npy":
        path = path_stem.with_name(path_stem.name + ".npy")
        _refuse_existing(path)
        np.save(path, array.astype(np.float32))
        written.append(path)
    if points:
        from .pointcloud import export_sample

        written += export_sample(array, affine, path_stem, pointcloud, seed)
    if png:
        png_path = path_stem.with_name(path_stem.name + ".png")
        _refuse_existing(png_path)
        save_png(orthogonal_slices([volume.unsqueeze(0)]), png_path)
        written.append(png_path)
    return written


def save_png(panels: dict[str, torch.Tensor], path: Path) -> None:
    """Stack the panels of :func:`orthogonal_slices` vertically into one grey-scale PNG."""
    from PIL import Image

    width = max(p.shape[-1] for p in panels.values())
    rows = [torch.nn.functional.pad(p[0], (0, width - p.shape[-1])) for p in panels.values()]
    image = torch.cat(rows, dim=0).clamp(0, 1).mul(255).round().byte().numpy()
    Image.fromarray(image, mode="L").save(path)


def _refuse_existing(path: Path) -> None:
    if path.exists():
        raise FileExistsError(f"{path} already exists; samples are never overwritten.")


def image_panel(volume: torch.Tensor) -> torch.Tensor:
    """One (C, *spatial) sample as a 2D picture on the data's [0, 1] scale (clipped, not rescaled, so panels of a
    grid compare): a 2D image as its PNG shows it (rows = the second axis), a 3D volume as its axial mid-slice (the
    middle of the last axis), oriented as in the preview PNGs. The first channel is shown."""
    v = volume.detach().float().cpu()[0]
    if v.ndim == 2:
        panel = v.transpose(0, 1)
    elif v.ndim == 3:
        panel = v[:, :, v.shape[2] // 2].transpose(0, 1).flip(0)
    else:
        raise ValueError(f"expected a (C, H, W) or (C, H, W, D) sample, got shape {tuple(volume.shape)}")
    return panel.clamp(0.0, 1.0)


def tile_panels(panels: Sequence[torch.Tensor], columns: int, gap: int = 2, fill: float = 1.0) -> torch.Tensor:
    """Panels of one size tiled row by row, ``columns`` per row, ``gap`` pixels of ``fill`` between them."""
    if not panels:
        raise ValueError("tile_panels needs at least one panel")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    height, width = panels[0].shape
    rows = -(-len(panels) // columns)
    cols = min(columns, len(panels))
    canvas = torch.full((rows * height + (rows - 1) * gap, cols * width + (cols - 1) * gap), fill)
    for i, panel in enumerate(panels):
        if tuple(panel.shape) != (height, width):
            raise ValueError(f"panel {i} has shape {tuple(panel.shape)}, expected {(height, width)} like panel 0")
        r, c = divmod(i, columns)
        canvas[r * (height + gap): r * (height + gap) + height, c * (width + gap): c * (width + gap) + width] = panel
    return canvas


def write_picture(images: torch.Tensor, path: Path, columns: int | None = None) -> Path:
    """A grid (``columns`` per row; default: about square) or, with ``columns = len(images)``, a strip of
    :func:`image_panel` pictures of ``(N, C, *spatial)`` samples, as an 8-bit grey PNG. Refuses to replace a file."""
    import math

    from PIL import Image

    n = images.shape[0]
    columns = columns or math.ceil(math.sqrt(n))
    canvas = tile_panels([image_panel(images[i]) for i in range(n)], columns)
    _refuse_existing(path)
    Image.fromarray(canvas.mul(255).round().byte().numpy(), mode="L").save(path)
    return path
