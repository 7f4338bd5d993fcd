"""Sampling: rebuild the UNet (and the autoencoder of a latent model) from a stage-2 checkpoint, write samples, sample
grids (2D) and interpolations between two seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoints import load_checkpoint, load_weights
from .conditioning import (
    Conditioner,
    build_scheduler,
    normalise_projection,
    objective,
    resolve_sampler,
    set_sampling_steps,
)
from .errors import RunError
from .models import autoencoder_from_args, build_diffusion_network, is_vq
from .pictures import write_picture
from .runtime import choose_device, resolve_precision
from .sampling import decode_samples, next_free_index, sample_latents, slerp, write_sample
from .settings import Settings, sampling_tile


def is_pixel_space(ckpt: dict[str, Any]) -> bool:
    """Whether a stage-2 checkpoint's UNet works on the images themselves (no autoencoder); older checkpoints are
    latent models."""
    return ckpt.get("space", "latent") == "pixel"


def load_diffusion(
    path: str | Path, use_ema: bool = True, use_flash_attention: bool = False
) -> tuple[torch.nn.Module, torch.nn.Module | None, dict[str, Any]]:
    """UNet (EMA weights when present and wanted) and stage-1 network (AutoencoderKL or VQVAE) of a stage-2
    checkpoint, from the checkpoint alone; the stage-1 network is None for a pixel-space checkpoint."""
    ckpt = load_checkpoint(path, expected_stage="diffusion")
    unet = build_diffusion_network(ckpt["model_args"], ckpt.get("condition_encoder"), use_flash_attention)
    weights = ckpt["state_dict"].get("ema") if use_ema else None
    load_weights(unet, weights if weights is not None else ckpt["state_dict"]["unet"], path)
    if is_pixel_space(ckpt):
        return unet.eval(), None, ckpt
    autoencoder = autoencoder_from_args(ckpt["autoencoder"]["model_args"], use_flash_attention=use_flash_attention)
    load_weights(autoencoder, ckpt["autoencoder"]["state_dict"], path)
    return unet.eval(), autoencoder.eval(), ckpt


def condition_shape(ckpt: dict[str, Any]) -> tuple[int, ...] | None:
    """``(C, H, W)`` of the projection a checkpoint is conditioned on, or None when it takes no projection."""
    enc = ckpt.get("condition_encoder")
    return None if enc is None else (enc["in_channels"], *enc["image_size"])


def load_condition(path: str | Path, expected: Sequence[int]) -> torch.Tensor:
    """A 2D condition image (PNG, TIFF, or a 2D NIfTI) read with MONAI ``LoadImage``, channels first, scaled to
    [0, 1] as the training projections are (:func:`~monai_diffusion.conditioning.normalise_projection`). It is not
    resized: its shape must be ``expected``, the projection of the training volumes.

    PNG and TIFF images are read as MONAI's PIL reader reads them, width first (the orientation
    :func:`~monai_diffusion.sampling.write_sample` writes 2D images in), so a projection written as a PNG reads back
    as the same array.

    Args:
        path: the image file.
        expected: ``(C, H, W)`` of the model's projection condition.

    Raises:
        RunError: a missing or unreadable file, or a shape other than ``expected`` (file, shape and expected shape
            named).
    """
    from monai.transforms import LoadImage

    path = Path(path).expanduser()
    expected = tuple(int(v) for v in expected)
    if not path.is_file():
        raise RunError(f"condition file not found: {path}")
    tiff = path.suffix.lower() in (".tif", ".tiff")
    try:
        image = LoadImage(image_only=True, ensure_channel_first=True, reader="PILReader" if tiff else None)(str(path))
    except Exception as exc:  # MONAI raises several types for unreadable files
        raise RunError(f"cannot read condition file {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    image = torch.as_tensor(image).as_subclass(torch.Tensor).float()
    if tuple(image.shape) != expected:
        raise RunError(f"condition file {path} has shape {tuple(image.shape)} (channels first), but the model takes "
                       f"the training projection's shape {expected}; condition images are not resized")
    return normalise_projection(image)


def sampling_device(settings: Settings) -> tuple[torch.device, torch.dtype | None]:
    """The device and autocast dtype that sampling and evaluation run with (training's rule, one process)."""
    device = choose_device(settings.device.use_cuda, settings.device.gpu_id)
    return device, resolve_precision(settings.device.mixed_precision, device)


def checkpoint_path(settings: Any, checkpoint: str | Path | None = None) -> Path:
    """The stage-2 checkpoint to sample from: the argument, else ``sampling.checkpoint``, else the stage's
    ``best_model.pt``."""
    return Path(checkpoint or settings.sampling.checkpoint
                or Path(settings.diffusion.checkpoints.output_dir) / "best_model.pt")


class Sampler:
    """Draws decoded samples from a stage-2 checkpoint with the ``sampling`` settings (scheduler, steps, guidance,
    condition, tiled decoding). A pixel-space checkpoint's samples are the UNet's output mapped back to [0, 1].

    Args:
        settings: the settings (``sampling``, ``device``, ``diffusion.use_flash_attention``).
        path: the stage-2 checkpoint.
        sampler: the sampler to use instead of ``sampling.scheduler``; ``"deterministic"``: DDIM (eta 0) for a
            DDPM-trained model, rectified flow's Euler sampler for a rectified-flow one (interpolation uses it).
        condition: for a projection-conditioned checkpoint, the condition file (see :func:`load_condition`) or
            projections ``(C, H, W)`` (one for every sample) or ``(N, C, H, W)`` (sample ``i`` takes projection ``i``).
        require_condition: False lets a projection-conditioned model be opened without a condition, to be given
            later with :meth:`set_condition` (evaluate takes the validation volumes' projections).
    """

    def __init__(self, settings: Any, path: str | Path, sampler: str | None = None,
                 condition: str | Path | torch.Tensor | None = None, require_condition: bool = True) -> None:
        cfg = settings.sampling
        self.cfg = cfg
        self.path = Path(path)
        if isinstance(condition, (str, Path)) and not Path(condition).expanduser().is_file():
            raise RunError(f"condition file not found: {condition}")  # before the checkpoint is read
        self.device, self.amp = sampling_device(settings)
        unet, autoencoder, ckpt = load_diffusion(path, use_ema=cfg.use_ema,
                                                 use_flash_attention=settings.diffusion.use_flash_attention)
        self.unet, self.ckpt = unet.to(self.device), ckpt
        self.autoencoder = None if autoencoder is None else autoencoder.to(self.device)
        self.pixel_space = autoencoder is None
        self.conditioner = Conditioner.from_state(ckpt.get("conditioning"))
        self.condition = self._condition(condition) if condition is not None or require_condition else None
        self.tile_size, key = sampling_tile(settings, self.pixel_space)  # exact tiled decoding, or None
        if self.tile_size is not None and self.pixel_space:
            raise RunError(f"sampling.tile_size tiles the autoencoder's decoding, but {path} is a pixel-space model "
                           "(no decoder); set sampling.tile_size=null")
        if self.tile_size is not None and is_vq(autoencoder):
            raise RunError(f"{key} {list(self.tile_size)}: exact tiled decoding is for the KL autoencoder, but {path} "
                           f"holds a VQ-VAE; set {key}=null")
        if self.tile_size is not None:
            try:  # fail before sampling
                autoencoder._check_tiling(tuple(self.tile_size), None)
            except ValueError as exc:
                raise RunError(f"{key}: {exc}") from exc
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
        if sampler == "deterministic":
            sampler = "rflow" if objective(args) == "rflow" else "ddim"
        try:
            self.sampler = resolve_sampler(args, sampler or cfg.scheduler, where=str(path))
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

    def _condition(self, condition: str | Path | torch.Tensor | None) -> torch.Tensor | None:
        """The projections to condition on, ``(N, C, H, W)``, checked against the checkpoint; None when the model
        takes none."""
        expected = condition_shape(self.ckpt)
        if expected is None:
            if condition is not None:
                raise RunError(f"--condition was given, but {self.path} is not conditioned on a projection")
            return None
        if condition is None:
            raise RunError(f"{self.path} is conditioned on a {expected[0]} x {expected[1]} x {expected[2]} projection "
                           f"along axis {self.conditioner.projection_axis}: pass --condition FILE (PNG, TIFF or 2D "
                           "NIfTI of that size)")
        if not isinstance(condition, torch.Tensor):
            return load_condition(condition, expected).unsqueeze(0).to(self.device)
        c = condition.float().reshape(-1, *condition.shape[-3:]) if condition.ndim in (3, 4) else condition
        if c.ndim != 4 or tuple(c.shape[1:]) != expected:
            raise ValueError(f"condition must be (C, H, W) or (N, C, H, W) with (C, H, W) = {expected}, got "
                             f"{tuple(condition.shape)}")
        return c.to(self.device)

    def set_condition(self, condition: str | Path | torch.Tensor) -> None:
        """Condition the next samples on ``condition`` (as the constructor's argument)."""
        self.condition = self._condition(condition)

    @property
    def projection_axis(self) -> int | None:
        """The axis a projection-conditioned model's condition is summed along; None for other models."""
        return self.conditioner.projection_axis if condition_shape(self.ckpt) is not None else None

    def describe(self) -> str:
        space = " in pixel space" if self.pixel_space else ""
        return f"{self.sampler.upper()} ({self.steps} steps) on {self.device}{space}"

    def noise(self, count: int, seed: int) -> torch.Tensor:
        """The initial noise of a batch of ``count`` samples drawn with ``seed`` (a latent's shape, or in pixel
        space an image's), on the sampling device."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randn((count, *self.latent_shape), generator=generator, device=self.device)

    def conditions(self, count: int, seed: int, first: int = 0) -> dict[str, torch.Tensor]:
        """UNet conditions of a batch from the ``sampling`` settings (random classes drawn with ``seed`` when no
        ``sampling.class_label`` is given) and, for a projection-conditioned model, the projections of samples
        ``first .. first + count - 1``."""
        cfg, cond = self.cfg, {}
        if self.condition is not None:
            c = self.condition
            if c.shape[0] > 1 and c.shape[0] < first + count:
                raise ValueError(f"{c.shape[0]} conditions were given, but sample {first + count - 1} needs one; give "
                                 "one condition per sample, or one for all")
            cond["projection"] = c.expand(count, *c.shape[1:]) if c.shape[0] == 1 else c[first: first + count]
        if self.conditioner.class_key is not None:
            if cfg.class_label is not None:
                labels = torch.full((count,), cfg.class_label, dtype=torch.long)
            else:
                labels = torch.randint(0, self.conditioner.num_classes, (count,),
                                       generator=torch.Generator().manual_seed(seed))
            cond["class_labels"] = labels.to(self.device)
        if self.conditioner.covariate_keys:
            cond["context"] = self.conditioner.context(torch.tensor([list(cfg.covariates)] * count), self.device)
        return cond

    @torch.no_grad()
    def denoise(self, noise: torch.Tensor, cond: dict[str, torch.Tensor], generator: torch.Generator | None,
                progress: bool = False) -> torch.Tensor:
        """The reverse process from ``noise`` to images on the data's [0, 1] scale (clipped when ``sampling.clip``);
        ``progress``: a progress bar of the tile passes when decoding in exact tiles."""
        with _autocast(self.device, self.amp):
            z = sample_latents(self.unet, self.scheduler, noise, cond, self.conditioner, self.cfg.guidance_scale,
                               generator)
            images = decode_samples(z.float(), self.autoencoder, float(self.ckpt["scale_factor"]), self.tile_size,
                                    self.ckpt.get("pixel_range"), progress=progress).float()
        return images.clamp(0.0, 1.0) if self.cfg.clip else images

    @torch.no_grad()
    def batches(self, n: int, seed: int, progress: bool = True):
        """Yield ``(first index, decoded batch)`` for ``n`` samples, ``sampling.batch_size`` at a time; sample
        ``i`` depends only on ``seed`` and its batch, so the same seed gives the same volumes."""
        cfg, device = self.cfg, self.device
        for first in tqdm(range(0, n, cfg.batch_size), desc="sampling", disable=not progress):
            count = min(cfg.batch_size, n - first)
            generator = torch.Generator(device=device).manual_seed(seed + first)
            noise = torch.randn((count, *self.latent_shape), generator=generator, device=device)
            yield first, self.denoise(noise, self.conditions(count, seed + first, first), generator, progress)

    def sample(self, n: int, seed: int, progress: bool = True) -> torch.Tensor:
        """``n`` decoded samples on the CPU, ``(n, C, *spatial)``."""
        return torch.cat([images.cpu() for _, images in self.batches(n, seed, progress)])


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
    sampler = Sampler(settings, path, condition=condition)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = next_free_index(out_dir)
    seed = cfg.seed if cfg.seed is not None else (settings.seed or 0)
    written: list[Path] = []
    grid = len(sampler.latent_shape) == 3 and cfg.save_format == "auto"  # 2D samples: (C, H, W)
    kept: list[torch.Tensor] = []
    print(f"sampling {cfg.num_samples} volume(s) from {path} with {sampler.describe()}")
    for first, images in sampler.batches(cfg.num_samples, seed):
        for i in range(images.shape[0]):
            stem = out_dir / f"sample_{start + first + i:04d}"
            written += write_sample(images[i], stem, sampler.affine, cfg.save_format, cfg.save_png,
                                    pointcloud=cfg.pointcloud, seed=seed + first + i)
        if grid:
            kept.append(images.cpu())
    if grid:
        (out_dir / "grids").mkdir(exist_ok=True)
        last = start + cfg.num_samples - 1
        written.append(write_picture(torch.cat(kept), out_dir / "grids" / f"grid_{start:04d}-{last:04d}.png"))
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
    sampler = Sampler(settings, path, sampler="deterministic", condition=condition)
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


def _autocast(device: torch.device, dtype: torch.dtype | None):
    import contextlib

    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)
