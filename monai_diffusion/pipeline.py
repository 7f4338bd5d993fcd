"""The Python API: :class:`DiffusionPipeline`, a trained model (a stage-2 checkpoint and the autoencoder it was trained
on) that generates, encodes, decodes and saves volumes, and :class:`Sampler`, the one sampling path under it that the
CLI (``generate_samples``), ``evaluate`` and a MONAI bundle go through.

Everything here rebuilds the networks from checkpoints alone (``weights_only=True``): a run folder's ``config.yaml``
gives only the sampling defaults, the device and the data settings that :meth:`DiffusionPipeline.encode` preprocesses
with. ``docs/python_api.md`` shows it in use.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoints import load_checkpoint, load_weights, read_model_folder
from .conditioning import (
    SAMPLERS,
    Conditioner,
    build_scheduler,
    normalise_projection,
    objective,
    resolve_sampler,
    set_sampling_steps,
)
from .errors import OutOfMemory, RunError
from .memory import MIB, available_bytes, estimate_peak_bytes, with_margin
from .models import (
    autoencoder_from_args,
    build_diffusion_network,
    encode_to_latent,
    is_vq,
    load_autoencoder,
    total_factor,
)
from .pictures import write_picture
from .runtime import choose_device, memory_format, resolve_knob, resolve_precision, to_channels_last
from .sampling import decode_samples, next_free_index, sample_latents, write_sample
from .settings import Settings, load_settings, sampling_tile, settings_from_dict


def is_pixel_space(ckpt: dict[str, Any]) -> bool:
    """Whether a stage-2 checkpoint's UNet works on the images themselves (no autoencoder); older checkpoints are
    latent models."""
    return ckpt.get("space", "latent") == "pixel"


def load_diffusion(
    path: str | Path, use_ema: bool = True, use_flash_attention: bool = False
) -> tuple[torch.nn.Module, torch.nn.Module | None, dict[str, Any]]:
    """UNet (EMA weights when present and wanted) and stage-1 network (AutoencoderKL or VQVAE) of a stage-2
    checkpoint, from the checkpoint alone; the stage-1 network is None for a pixel-space checkpoint. The file is
    memory-mapped: the optimizer states it holds for resuming are never read."""
    ckpt = load_checkpoint(path, expected_stage="diffusion", mmap=True)
    unet, autoencoder = networks_from_checkpoint(ckpt, path, use_ema, use_flash_attention)
    return unet, autoencoder, ckpt


def networks_from_checkpoint(ckpt: dict[str, Any], where: str | Path, use_ema: bool = True,
                             use_flash_attention: bool = False) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The networks of a stage-2 checkpoint dictionary (or a bundle's equivalent: the same keys, the weights read
    from ``models/``), in eval mode on the CPU; ``where`` names the source in errors."""
    unet = build_diffusion_network(ckpt["model_args"], ckpt.get("condition_encoder"), use_flash_attention)
    weights = ckpt["state_dict"].get("ema") if use_ema else None
    load_weights(unet, weights if weights is not None else ckpt["state_dict"]["unet"], where)
    if is_pixel_space(ckpt):
        return unet.eval(), None
    autoencoder = autoencoder_from_args(ckpt["autoencoder"]["model_args"], use_flash_attention=use_flash_attention)
    load_weights(autoencoder, ckpt["autoencoder"]["state_dict"], where)
    return unet.eval(), autoencoder.eval()


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
    return device, resolve_precision(resolve_knob("mixed_precision", settings.device.mixed_precision, device,
                                                  "diffusion")[0], device)


class Sampler:
    """Draws decoded samples from a stage-2 checkpoint with the ``sampling`` settings (scheduler, steps, guidance,
    condition, tiled decoding). A pixel-space checkpoint's samples are the UNet's output mapped back to [0, 1].

    Args:
        settings: the settings (``sampling``, ``device``, ``diffusion.use_flash_attention``).
        path: the stage-2 checkpoint.
        networks: ``(unet, autoencoder, checkpoint)`` already loaded from ``path`` (:func:`load_diffusion`; the
            pipeline keeps them across calls), instead of reading the file again.
        device: ``(device, autocast dtype or None)`` instead of the ``device`` settings' choice.
        sampler: the sampler to use instead of ``sampling.scheduler``; ``"deterministic"``: DDIM (eta 0) for a
            DDPM-trained model, rectified flow's Euler sampler for a rectified-flow one (interpolation uses it).
        condition: for a projection-conditioned checkpoint, the condition file (see :func:`load_condition`) or
            projections ``(C, H, W)`` (one for every sample) or ``(N, C, H, W)`` (sample ``i`` takes projection ``i``).
        require_condition: False lets a projection-conditioned model be opened without a condition, to be given
            later with :meth:`set_condition` (evaluate takes the validation volumes' projections).
    """

    def __init__(self, settings: Any, path: str | Path, sampler: str | None = None,
                 condition: str | Path | torch.Tensor | None = None, require_condition: bool = True,
                 networks: tuple[torch.nn.Module, torch.nn.Module | None, dict[str, Any]] | None = None,
                 device: tuple[torch.device, torch.dtype | None] | None = None) -> None:
        cfg = settings.sampling
        self.cfg = cfg
        self.path = Path(path)
        if isinstance(condition, (str, Path)) and not Path(condition).expanduser().is_file():
            raise RunError(f"condition file not found: {condition}")  # before the checkpoint is read
        self.device, self.amp = device if device is not None else sampling_device(settings)
        unet, autoencoder, ckpt = networks if networks is not None else load_diffusion(
            path, use_ema=cfg.use_ema, use_flash_attention=settings.diffusion.use_flash_attention)
        self.unet, self.ckpt = unet.to(self.device), ckpt
        self.autoencoder = None if autoencoder is None else autoencoder.to(self.device)
        # device.channels_last: the networks and the noise in channels_last(_3d) memory format (same numbers); auto
        # as for stage 2's training (the UNet does sampling's work)
        self.channels_last = bool(resolve_knob("channels_last", settings.device.channels_last, self.device,
                                               "diffusion")[0])
        if self.channels_last:
            dims = len(ckpt["latent_shape"]) - 1
            to_channels_last(self.unet, dims)
            if self.autoencoder is not None:
                to_channels_last(self.autoencoder, dims)
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
        self.memory_check = settings.device.memory_check
        self.tile_key = key

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
        ``progress``: progress bars of the denoising steps and, when decoding in exact tiles, of the tile passes."""
        if self.channels_last:
            noise = noise.contiguous(memory_format=memory_format(noise.ndim - 2))
        with _autocast(self.device, self.amp):
            z = sample_latents(self.unet, self.scheduler, noise, cond, self.conditioner, self.cfg.guidance_scale,
                               generator, progress=progress)
            images = decode_samples(z.float(), self.autoencoder, float(self.ckpt["scale_factor"]), self.tile_size,
                                    self.ckpt.get("pixel_range"), progress=progress).float()
        return images.clamp(0.0, 1.0) if self.cfg.clip else images

    # ------------------------------------------------------------------------------------------- the memory check
    def image_shape(self) -> tuple[int, ...]:
        """The spatial shape of one decoded sample."""
        if self.autoencoder is None:
            return tuple(self.latent_shape[1:])
        factor = total_factor(self.autoencoder)
        return tuple(int(n) * int(f) for n, f in zip(self.latent_shape[1:], factor))

    def estimate_batch(self, count: int, tile_size: Sequence[int] | None = ...) -> dict[str, Any]:
        """Estimate the memory of drawing one batch of ``count`` samples without allocating it: one denoising step
        (the UNet on ``count`` latents, twice with classifier-free guidance; every step needs the same) and the
        decoding (in exact tiles of ``tile_size``; default: this sampler's), run on PyTorch's fake tensors
        (:func:`monai_diffusion.memory.estimate_peak_bytes`).

        Returns ``peak_mib`` (live tensors at the worst moment, the networks' weights included), ``weights_mib`` (the
        weights, already in memory when this runs) and ``need_mib``: what the batch still needs beyond the weights,
        with :data:`monai_diffusion.memory.MARGIN`.
        """
        import copy

        tile = self.tile_size if tile_size is ... else tile_size
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.timesteps = scheduler.timesteps[:1]
        cond = self.conditions(count, 0)
        modules = [m for m in (self.unet, self.autoencoder) if m is not None]

        def step() -> None:
            noise = torch.empty((count, *self.latent_shape), device=self.device)
            with torch.no_grad(), _autocast(self.device, self.amp):
                z = sample_latents(self.unet, scheduler, noise, cond, self.conditioner, self.cfg.guidance_scale,
                                   None, progress=False)
                decode_samples(z.float(), self.autoencoder, float(self.ckpt["scale_factor"]), tile,
                               self.ckpt.get("pixel_range")).float()

        def held() -> list[torch.Tensor]:
            return [t for m in modules for t in [*m.parameters(), *m.buffers()]] + list(cond.values())

        peak = estimate_peak_bytes(step, held) / MIB
        weights = sum(t.untyped_storage().nbytes() for t in held()) / MIB
        return {"peak_mib": peak, "weights_mib": weights, "need_mib": with_margin(peak - weights, self.device),
                "batch_size": count, "tile_size": None if tile is None else list(tile)}

    def _tile_candidates(self) -> list[tuple[int, ...]]:
        """Exact decoding tiles to suggest when a whole volume does not fit: the image halved along its longest axes,
        again and again, down to a few latent voxels (each a multiple of the total downsample factor)."""
        if self.autoencoder is None or is_vq(self.autoencoder):
            return []
        factor = [int(f) for f in total_factor(self.autoencoder)]
        tile = list(self.image_shape())
        out = []
        while True:
            axis = max(range(len(tile)), key=lambda a: tile[a] // factor[a])
            if tile[axis] // factor[axis] < 8:
                return out
            tile[axis] = max(factor[axis] * 4, (tile[axis] // 2) // factor[axis] * factor[axis])
            if self.tile_size is None or any(t < c for t, c in zip(tile, self.tile_size)):
                out.append(tuple(tile))

    def check_memory(self, count: int, print_fn: Any = None) -> dict[str, Any] | None:
        """Before sampling: estimate one batch of ``count`` (:meth:`estimate_batch`) and compare it with the memory
        the device has available; print one line about it (``print_fn``) and raise
        :class:`~monai_diffusion.errors.OutOfMemory` with the ``--set`` changes that fit (a smaller
        ``sampling.batch_size``, exact tiles) when it will not fit. ``device.memory_check: false`` skips it (returns
        None), as does an estimate that cannot be made (a line says why)."""
        if not self.memory_check:
            return None
        try:
            est = self.estimate_batch(count)
        except Exception as exc:  # noqa: BLE001 - an estimate that cannot be made must not stop sampling that may fit
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if print_fn:
                print_fn(f"memory: the estimate of one sampling batch failed ({type(exc).__name__}: {first[:200]}); "
                         "sampling without the check")
            return None
        available, source = available_bytes(self.device)
        tiles = "" if est["tile_size"] is None else f", exact tiles {est['tile_size']}"
        what = f"sampling batch ({count} volume(s) of {'x'.join(map(str, self.image_shape()))}{tiles})"
        if available is None or est["need_mib"] <= available / MIB:
            if print_fn:
                room = f"available memory unknown ({source})" if available is None else \
                    f"{available / 2**30:.1f} GiB available on {self.device.type}"
                print_fn(f"memory: ~{est['need_mib'] / 1024:.1f} GiB estimated for one {what} beyond the "
                         f"{est['weights_mib'] / 1024:.1f} GiB of weights, {room}")
            return est
        avail_mib = available / MIB
        sets = self._fitting_sets(count, avail_mib)
        fix = ("; to fit, try: " + " | ".join(sets)) if sets else "; no smaller batch or tile fits either"
        raise OutOfMemory(f"{what} needs about {est['need_mib'] / 1024:.1f} GiB beyond the weights (estimated: "
                          f"{est['peak_mib'] / 1024:.1f} GiB of tensors at the peak, weights included, plus margin) but "
                          f"{self.device.type} has {avail_mib / 1024:.1f} GiB available ({source}){fix}; "
                          "--set device.memory_check=false samples anyway", section="sampling")

    def _fitting_sets(self, count: int, avail_mib: float) -> list[str]:
        """The ``--set`` changes whose estimated batch fits ``avail_mib``: the largest smaller batch; else (a single
        volume does not fit) the largest exact tile, at batch 1."""
        for batch in sorted({b for b in (2 ** i for i in range(12)) if b < count}, reverse=True):
            if self.estimate_batch(batch)["need_mib"] <= avail_mib:
                return [f"--set sampling.batch_size={batch}"]
        prefix = ["--set sampling.batch_size=1"] if count > 1 else []
        for tile in self._tile_candidates():
            if self.estimate_batch(1, tile)["need_mib"] <= avail_mib:
                return [" ".join(prefix + [f"--set sampling.tile_size=[{','.join(map(str, tile))}]"])]
        return []

    @torch.no_grad()
    def batches(self, n: int, seed: int, progress: bool = True):
        """Yield ``(first index, decoded batch)`` for ``n`` samples, ``sampling.batch_size`` at a time; sample
        ``i`` depends only on ``seed`` and its batch, so the same seed gives the same volumes. The memory check
        (:meth:`check_memory`) runs before the first batch."""
        cfg, device = self.cfg, self.device
        self.check_memory(min(cfg.batch_size, n), print_fn=print if progress else None)
        for first in tqdm(range(0, n, cfg.batch_size), desc="sampling", disable=not progress):
            count = min(cfg.batch_size, n - first)
            generator = torch.Generator(device=device).manual_seed(seed + first)
            noise = torch.randn((count, *self.latent_shape), generator=generator, device=device)
            yield first, self.denoise(noise, self.conditions(count, seed + first, first), generator, progress)

    def sample(self, n: int, seed: int, progress: bool = True) -> torch.Tensor:
        """``n`` decoded samples on the CPU, ``(n, C, *spatial)``."""
        return torch.cat([images.cpu() for _, images in self.batches(n, seed, progress)])



def _autocast(device: torch.device, dtype: torch.dtype | None):
    import contextlib

    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


_DTYPES = {torch.float32: None, torch.float16: torch.float16, torch.bfloat16: torch.bfloat16}


def _run_files(run_dir: Path) -> tuple[Path, Path]:
    """``(config.yaml, best_model.pt)`` of stage 2 in a run folder: ``<run>/diffusion/`` (the quickstart's layout) or
    the stage-2 output folder itself."""
    for folder in (run_dir / "diffusion", run_dir):
        if (folder / "config.yaml").is_file() and (folder / "best_model.pt").is_file():
            return folder / "config.yaml", folder / "best_model.pt"
    raise ValueError(f"run_dir {str(run_dir)!r} holds no stage-2 run: expected diffusion/config.yaml and "
                     "diffusion/best_model.pt in it (the folder train_diffusion wrote), or those two files directly")


class DiffusionPipeline:
    """A trained diffusion model (pixel-space, or latent with its KL or VQ autoencoder) ready to generate.

    Open one with :meth:`from_run` (a run folder the CLI wrote) or :meth:`from_checkpoints`; the constructor takes
    the same inputs. The networks are loaded once (EMA weights when ``sampling.use_ema`` and present) and kept on
    :attr:`device`.

    Args:
        diffusion: the stage-2 checkpoint (``best_model.pt`` of ``train_diffusion``).
        settings: settings for the sampling defaults (``sampling.*``), the device (``device.*``) and the data
            preprocessing of :meth:`encode` (``data.*``); None = the built-in defaults (the CLI's defaults).
        autoencoder: a stage-1 checkpoint to decode with instead of the autoencoder stored in the stage-2
            checkpoint (it must have the same latent shape); None = the stored one.
    """

    def __init__(self, diffusion: str | Path, settings: Settings | None = None,
                 autoencoder: str | Path | None = None, *, checkpoint: dict[str, Any] | None = None) -> None:
        self.path = Path(diffusion).expanduser()
        if autoencoder is not None and not Path(autoencoder).expanduser().is_file():
            raise ValueError(f"autoencoder: checkpoint {str(autoencoder)!r} not found")
        self.settings = settings if settings is not None else settings_from_dict(None, check_paths=False,
                                                                                 require_data=False)
        flash = self.settings.diffusion.use_flash_attention
        if checkpoint is None:
            self.unet, self.autoencoder, self.checkpoint = load_diffusion(self.path, self.settings.sampling.use_ema,
                                                                          flash)
        else:  # a checkpoint dictionary already read (a bundle's): ``diffusion`` names its source
            self.checkpoint = checkpoint
            self.unet, self.autoencoder = networks_from_checkpoint(checkpoint, self.path,
                                                                   self.settings.sampling.use_ema, flash)
        if autoencoder is not None:
            if self.autoencoder is None:
                raise ValueError(f"autoencoder: {self.path} is a pixel-space model; it decodes with no autoencoder")
            stored = self.checkpoint["autoencoder"]["model_args"]
            other, ckpt = load_autoencoder(Path(autoencoder).expanduser(), use_flash_attention=flash)
            if ckpt["model_args"] != stored:
                raise ValueError(f"autoencoder: {autoencoder} is not the architecture {self.path} was trained on "
                                 "(its constructor arguments differ)")
            self.autoencoder = other
        self.device, self.amp = sampling_device(self.settings)
        self._move()
        info = self.checkpoint.get("data_info") or {}
        self.affine = np.asarray(info["affine"], dtype=np.float64) if info.get("affine") is not None else None

    # ---------------------------------------------------------------------------------------------------- opening
    @classmethod
    def from_run(cls, run_dir: str | Path) -> DiffusionPipeline:
        """The pipeline of a run folder the CLI wrote (``runs/quickstart``): the stage-2 ``best_model.pt`` and the
        ``config.yaml`` beside it (sampling defaults, device, data settings)."""
        config, checkpoint = _run_files(Path(run_dir).expanduser())
        settings = load_settings(config, check_paths=False, require_data=False)
        return cls(checkpoint, settings)

    @classmethod
    def from_checkpoints(cls, diffusion: str | Path, autoencoder: str | Path | None = None,
                         settings: Settings | None = None) -> DiffusionPipeline:
        """The pipeline of a stage-2 checkpoint (and optionally the stage-1 checkpoint to decode with), with the
        built-in sampling defaults unless ``settings`` are given."""
        return cls(diffusion, settings, autoencoder)

    @classmethod
    def from_bundle(cls, bundle_root: str | Path) -> DiffusionPipeline:
        """The pipeline of a MONAI bundle written by ``monai-diffusion-export-bundle``: its ``models/`` folder
        (weights as safetensors or weights-only state dicts, the architectures and the run's settings as JSON; see
        :func:`~monai_diffusion.checkpoints.write_model_folder`)."""
        folder = Path(bundle_root).expanduser() / "models"
        checkpoint, settings = read_model_folder(folder)
        return cls(folder, settings_from_dict(settings, check_paths=False, require_data=False),
                   checkpoint=checkpoint)

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> DiffusionPipeline:
        """Move the networks to ``device``; ``dtype`` float16 or bfloat16 samples under autocast in it (float32 or
        None: full precision). Returns the pipeline."""
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device: {device!r} is not a torch device ({exc})") from None
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"dtype: expected torch.float32, torch.float16, torch.bfloat16 or None, got {dtype}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {device} was asked for, but CUDA is not available here")
        self.device, self.amp = device, None if dtype is None else _DTYPES[dtype]
        self._move()
        return self

    def _move(self) -> None:
        self.unet = self.unet.to(self.device)
        if self.autoencoder is not None:
            self.autoencoder = self.autoencoder.to(self.device)

    # ---------------------------------------------------------------------------------------------------- facts
    @property
    def pixel_space(self) -> bool:
        """Whether the UNet works on images directly (no autoencoder)."""
        return self.autoencoder is None

    @property
    def conditioner(self) -> Conditioner:
        return Conditioner.from_state(self.checkpoint.get("conditioning"))

    # ---------------------------------------------------------------------------------------------------- sampling
    def _settings(self, num_inference_steps: int | None, scheduler: str | None, guidance_scale: float | None,
                  class_label: int | None, covariates: Sequence[float] | None, tile_size: Sequence[int] | None,
                  batch_size: int | None) -> Settings:
        """The settings with the given arguments in ``sampling``, each checked (a ``ValueError`` naming it)."""
        cfg, args = self.settings.sampling, self.checkpoint["scheduler_args"]
        changes: dict[str, Any] = {}
        if scheduler is not None:
            if scheduler != "auto" and scheduler not in SAMPLERS.get(objective(args), ()):
                raise ValueError(f"scheduler: {scheduler!r} cannot sample {self.path} (trained with "
                                 f"{objective(args)}); expected 'auto' or one of {list(SAMPLERS[objective(args)])}")
            changes["scheduler"] = scheduler
        if num_inference_steps is not None:
            if not _is_int(num_inference_steps) or not 1 <= num_inference_steps <= args["num_train_timesteps"]:
                raise ValueError(f"num_inference_steps: expected an integer in 1..{args['num_train_timesteps']} (the "
                                 f"timesteps {self.path} was trained with), got {num_inference_steps!r}")
            changes["num_inference_steps"] = int(num_inference_steps)
        if guidance_scale is not None:
            if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
                raise ValueError(f"guidance_scale: expected a number >= 0, got {guidance_scale!r}")
            changes["guidance_scale"] = float(guidance_scale)
        cond = self.conditioner
        if class_label is not None:
            if cond.num_classes is None:
                raise ValueError(f"class_label: {self.path} is not conditioned on classes; leave class_label=None")
            if not _is_int(class_label) or not 0 <= class_label < cond.num_classes:
                raise ValueError(f"class_label: expected a class 0..{cond.num_classes - 1}, got {class_label!r}")
            changes["class_label"] = int(class_label)
        if covariates is not None:
            keys = cond.covariate_keys or []
            if not keys:
                raise ValueError(f"covariates: {self.path} is not conditioned on covariates; leave covariates=None")
            values = list(covariates) if isinstance(covariates, (list, tuple)) else None
            if values is None or len(values) != len(keys) or not all(isinstance(v, (int, float)) for v in values):
                raise ValueError(f"covariates: expected {len(keys)} number(s), one per key of {keys}, got "
                                 f"{covariates!r}")
            changes["covariates"] = tuple(float(v) for v in values)
        elif cond.covariate_keys and cfg.covariates is None:
            raise ValueError(f"covariates: {self.path} is conditioned on covariates {cond.covariate_keys}; give one "
                             "value per key, in that order")
        if tile_size is not None:
            if self.pixel_space:
                raise ValueError(f"tile_size: {self.path} is a pixel-space model, there is no decoder to tile")
            if is_vq(self.autoencoder):
                raise ValueError("tile_size: exact tiled decoding is for the KL autoencoder, this model's is a VQ-VAE")
            tile = _int_list(tile_size, "tile_size", len(self.checkpoint["latent_shape"]) - 1)
            try:
                self.autoencoder._check_tiling(tuple(tile), None)
            except ValueError as exc:
                raise ValueError(f"tile_size: {exc}") from None
            changes["tile_size"] = tile
        if batch_size is not None:
            if not _is_int(batch_size) or batch_size < 1:
                raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
            changes["batch_size"] = int(batch_size)
        if not changes:
            return self.settings
        return dataclasses.replace(self.settings, sampling=dataclasses.replace(cfg, **changes))

    def sampler(self, settings: Settings | None = None, condition: str | Path | torch.Tensor | None = None,
                sampler: str | None = None, require_condition: bool = True) -> Sampler:
        """A :class:`Sampler` over this pipeline's networks and device (``settings`` default: the pipeline's)."""
        return Sampler(settings or self.settings, self.path, sampler=sampler, condition=condition,
                       require_condition=require_condition, device=(self.device, self.amp),
                       networks=(self.unet, self.autoencoder, self.checkpoint))

    def batches(self, n: int, seed: int = 0, num_inference_steps: int | None = None, scheduler: str | None = None,
                guidance_scale: float | None = None, class_label: int | None = None,
                covariates: Sequence[float] | None = None, condition: str | Path | torch.Tensor | None = None,
                tile_size: Sequence[int] | None = None, batch_size: int | None = None,
                progress: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
        """:meth:`generate` one batch at a time: yields ``(index of the batch's first sample, images on the
        device)``. The arguments are checked before the first batch is drawn."""
        if not _is_int(n) or n < 1:
            raise ValueError(f"n: expected the number of samples, an integer >= 1, got {n!r}")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
        settings = self._settings(num_inference_steps, scheduler, guidance_scale, class_label, covariates,
                                  tile_size, batch_size)
        expected = condition_shape(self.checkpoint)
        if expected is None and condition is not None:
            raise ValueError(f"condition: {self.path} is not conditioned on a projection; leave condition=None")
        if expected is not None and condition is None:
            raise ValueError(f"condition: {self.path} is conditioned on a {expected[0]} x {expected[1]} x "
                             f"{expected[2]} projection; give an image file of that size, (C, H, W) or (n, C, H, W)")
        if isinstance(condition, (str, Path)) and not Path(condition).expanduser().is_file():
            raise ValueError(f"condition: file {str(condition)!r} not found")
        return self.sampler(settings, condition).batches(int(n), int(seed), progress)

    def generate(self, n: int, seed: int = 0, num_inference_steps: int | None = None, scheduler: str | None = None,
                 guidance_scale: float | None = None, class_label: int | None = None,
                 covariates: Sequence[float] | None = None, condition: str | Path | torch.Tensor | None = None,
                 tile_size: Sequence[int] | None = None, batch_size: int | None = None,
                 progress: bool = True) -> torch.Tensor:
        """``n`` samples as a MONAI ``MetaTensor`` ``(n, C, *spatial)`` on the CPU, on the data's [0, 1] scale, with
        the training data's affine (``.affine``). The same ``seed`` and ``batch_size`` give the same samples as
        ``generate_samples`` with ``sampling.seed`` (sample ``i`` depends on the seed and its batch).

        Every argument left None takes the ``sampling`` setting (``from_run``: the run's ``config.yaml``; else the
        CLI's default): ``num_inference_steps`` (DDIM / rectified-flow steps), ``scheduler`` (``auto``, ``ddim``,
        ``ddpm``, ``rflow``), ``guidance_scale`` (classifier-free guidance), ``class_label`` (a class-conditioned
        model; None draws classes with the seed), ``covariates`` (one value per covariate key), ``condition`` (a
        projection-conditioned model: an image file, ``(C, H, W)`` or ``(n, C, H, W)``), ``tile_size`` (exact tiled
        decoding), ``batch_size``; ``progress``: show progress bars. A wrong argument raises ``ValueError`` naming
        it, before sampling starts.
        """
        batches = self.batches(n, seed, num_inference_steps, scheduler, guidance_scale, class_label, covariates,
                               condition, tile_size, batch_size, progress)
        return self._meta(torch.cat([images.cpu() for _, images in batches]))

    # ---------------------------------------------------------------------------------------------------- latents
    def _meta(self, x: torch.Tensor) -> torch.Tensor:
        from monai.data import MetaTensor

        dims = x.ndim - 2
        affine = torch.eye(dims + 1, dtype=torch.float64) if self.affine is None else torch.as_tensor(self.affine)
        if affine.shape[0] != dims + 1:  # a 2D model's affine kept as NIfTI's 4 x 4
            affine = affine[[*range(dims), -1]][:, [*range(dims), -1]]
        return MetaTensor(x, affine=affine)

    def _load_volumes(self, volumes: Any) -> torch.Tensor:
        """``(N, C, *spatial)`` float32 from a tensor (``(C, *spatial)`` is one volume) or NIfTI paths (read and
        preprocessed with the validation transforms of the ``data`` settings)."""
        dims = len(self.checkpoint["latent_shape"]) - 1
        if isinstance(volumes, (str, Path)):
            volumes = [volumes]
        if isinstance(volumes, (list, tuple)) and volumes and all(isinstance(v, (str, Path)) for v in volumes):
            from .data import build_transforms

            missing = [str(v) for v in volumes if not Path(v).expanduser().is_file()]
            if missing:
                raise ValueError(f"volumes: file(s) not found: {missing[:3]}")
            transform = build_transforms(self.settings.data, dims, train=False)
            out = [transform({"image": str(Path(v).expanduser())})["image"] for v in volumes]
            return torch.stack([torch.as_tensor(v).as_subclass(torch.Tensor).float() for v in out])
        if not isinstance(volumes, torch.Tensor):
            raise ValueError(f"volumes: expected a tensor (N, C, *spatial) or NIfTI paths, got {type(volumes).__name__}")
        x = volumes.as_subclass(torch.Tensor).float()
        if x.ndim == dims + 1:
            x = x.unsqueeze(0)
        if x.ndim != dims + 2:
            raise ValueError(f"volumes: expected (N, C, *spatial) with {dims} spatial dimensions, got "
                             f"{tuple(volumes.shape)}")
        return x

    @torch.no_grad()
    def encode(self, volumes: torch.Tensor | str | Path | Sequence[str | Path],
               tile_size: Sequence[int] | None = None) -> torch.Tensor:
        """The latents the diffusion model works on (the autoencoder's mean latent, KL, or quantised latent, VQ,
        times the checkpoint's scale factor), ``(N, latent channels, *latent spatial)`` on the CPU.

        Args:
            volumes: a tensor ``(N, C, *spatial)`` or ``(C, *spatial)`` on the data's [0, 1] scale, or NIfTI paths
                (read and preprocessed as the run's ``data`` settings say for validation).
            tile_size: encode in exact tiles of this size (KL autoencoder; None: whole volumes).
        """
        if self.pixel_space:
            raise ValueError(f"volumes: {self.path} is a pixel-space model; it has no autoencoder to encode with")
        tile = None
        if tile_size is not None:
            if is_vq(self.autoencoder):
                raise ValueError("tile_size: exact tiled encoding is for the KL autoencoder, this model's is a VQ-VAE")
            tile = _int_list(tile_size, "tile_size", len(self.checkpoint["latent_shape"]) - 1)
        x = self._load_volumes(volumes).to(self.device)
        if tuple(x.shape[1:]) != self._image_shape():
            raise ValueError(f"volumes: expected volumes of shape (C, *spatial) = {self._image_shape()} (the "
                             f"training volumes'), got {tuple(x.shape[1:])}")
        with _autocast(self.device, self.amp):
            z, _ = encode_to_latent(self.autoencoder, x, tile)
        return z.float().cpu() * float(self.checkpoint["scale_factor"])

    def _image_shape(self) -> tuple[int, ...]:
        latent = tuple(self.checkpoint["latent_shape"])
        if self.pixel_space:
            return latent
        channels = self.checkpoint["autoencoder"]["model_args"].get("in_channels", 1)
        return (channels, *(s * f for s, f in zip(latent[1:], total_factor(self.autoencoder))))

    @torch.no_grad()
    def decode(self, z: torch.Tensor, tile_size: Sequence[int] | None = None) -> torch.Tensor:
        """Latents (as :meth:`encode` returns them and the diffusion model samples them) to volumes, as sampling
        decodes them (clipped to [0, 1] when ``sampling.clip``): a ``MetaTensor`` ``(N, C, *spatial)`` on the CPU
        with the data's affine. ``tile_size``: decode in exact tiles (KL autoencoder), the same numbers up to float
        rounding."""
        if self.pixel_space:
            raise ValueError(f"z: {self.path} is a pixel-space model; it has no autoencoder to decode with")
        latent = tuple(self.checkpoint["latent_shape"])
        if not isinstance(z, torch.Tensor) or z.ndim != len(latent) + 1 or tuple(z.shape[1:]) != latent:
            raise ValueError(f"z: expected latents (N, *{latent}), got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        tile = None
        if tile_size is not None:
            if is_vq(self.autoencoder):
                raise ValueError("tile_size: exact tiled decoding is for the KL autoencoder, this model's is a VQ-VAE")
            tile = _int_list(tile_size, "tile_size", len(latent) - 1)
            try:
                self.autoencoder._check_tiling(tuple(tile), None)
            except ValueError as exc:
                raise ValueError(f"tile_size: {exc}") from None
        with _autocast(self.device, self.amp):
            x = decode_samples(z.as_subclass(torch.Tensor).float().to(self.device), self.autoencoder,
                               float(self.checkpoint["scale_factor"]), tile, self.checkpoint.get("pixel_range")).float()
        x = x.clamp(0.0, 1.0) if self.settings.sampling.clip else x
        return self._meta(x.cpu())

    # ---------------------------------------------------------------------------------------------------- files
    def save(self, x: torch.Tensor, folder: str | Path, save_format: str | None = None, png: bool | None = None,
             seed: int = 0) -> list[Path]:
        """Write volumes ``(N, C, *spatial)`` (or one ``(C, *spatial)``) into ``folder`` as the CLI writes samples:
        ``sample_NNNN`` numbered after those already there, never replacing a file, in ``save_format`` (default
        ``sampling.save_format``: NIfTI for 3D, PNG for 2D, ``pointcloud`` / ``both`` for point clouds) with the
        data's affine, a preview PNG when ``png`` (default ``sampling.save_png``), and for 2D ``auto`` a grid
        ``grids/grid_<first>-<last>.png``. ``seed`` seeds point-cloud draws (sample ``i`` uses ``seed + i``).
        Returns the files written."""
        cfg = self.settings.sampling
        fmt = cfg.save_format if save_format is None else save_format
        allowed = ("auto", "nifti", "npy", "png", "pointcloud", "both")
        if fmt not in allowed:
            raise ValueError(f"save_format: expected one of {list(allowed)}, got {fmt!r}")
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x: expected a tensor (N, C, *spatial), got {type(x).__name__}")
        dims = len(self.checkpoint["latent_shape"]) - 1
        x = x.as_subclass(torch.Tensor)
        x = x.unsqueeze(0) if x.ndim == dims + 1 else x
        if x.ndim != dims + 2:
            raise ValueError(f"x: expected (N, C, *spatial) with {dims} spatial dimensions, got {tuple(x.shape)}")
        out_dir = Path(folder).expanduser()
        out_dir.mkdir(parents=True, exist_ok=True)
        writer = SampleWriter(out_dir, self.affine, dims, fmt, cfg.save_png if png is None else png, cfg.pointcloud)
        writer.write(x, 0, seed)
        return writer.finish()


class SampleWriter:
    """Writes batches of samples into a folder the way ``generate_samples`` does: ``sample_NNNN`` numbered from the
    first free index, never replacing a file; 2D samples in ``auto`` format also get one grid picture at the end."""

    def __init__(self, out_dir: Path, affine: np.ndarray | None, spatial_dims: int, save_format: str, png: bool,
                 pointcloud: Any) -> None:
        self.out_dir, self.affine, self.save_format, self.png, self.pointcloud = (out_dir, affine, save_format, png,
                                                                                  pointcloud)
        self.start = next_free_index(out_dir)
        self.grid = spatial_dims == 2 and save_format == "auto"
        self.kept: list[torch.Tensor] = []
        self.written: list[Path] = []

    def write(self, images: torch.Tensor, first: int, seed: int) -> None:
        """Samples ``first .. first + len(images) - 1`` (point clouds drawn with ``seed + first + i``)."""
        for i in range(images.shape[0]):
            stem = self.out_dir / f"sample_{self.start + first + i:04d}"
            self.written += write_sample(images[i], stem, self.affine, self.save_format, self.png,
                                         pointcloud=self.pointcloud, seed=seed + first + i)
        if self.grid:
            self.kept.append(images.cpu())

    def finish(self) -> list[Path]:
        """Write the grid (2D ``auto``) and return every file written."""
        if self.grid and self.kept:
            images = torch.cat(self.kept)
            (self.out_dir / "grids").mkdir(exist_ok=True)
            last = self.start + images.shape[0] - 1
            self.written.append(write_picture(images, self.out_dir / "grids" / f"grid_{self.start:04d}-{last:04d}.png"))
        return self.written


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _int_list(value: Any, name: str, dims: int) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else None
    if values is None or len(values) != dims or not all(_is_int(v) and v >= 1 for v in values):
        raise ValueError(f"{name}: expected {dims} integers >= 1, got {value!r}")
    return [int(v) for v in values]
