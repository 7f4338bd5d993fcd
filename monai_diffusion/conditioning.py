"""What a diffusion UNet is trained on and conditioned with: the noise schedulers and the sampler names valid for
each training objective, the pixel-space value range, and the conditions (class labels, covariates, projections of
the volume) with their "no condition" counterparts for classifier-free guidance.

Training (stage 2), sampling and ``plan`` share these; this module imports nothing of the app above the ground.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler


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
