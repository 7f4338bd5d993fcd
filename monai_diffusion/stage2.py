"""Stage 2: a diffusion UNet trained on the latents of a frozen stage-1 autoencoder, or (``diffusion.space: pixel``)
on the images themselves, mapped from [0, 1] to ``PIXEL_RANGE``."""

from __future__ import annotations

import copy
import functools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from .data import build_datasets, build_loaders, load_datalist
from .checkpoints import load_checkpoint, prepare_output_dir, resolve_resume
from .engine import LoopState, loop_config, run_loop
from .errors import ConfigError, DataError, RunError
from .fileio import plain
from .losses import corrupt
from .models import (
    architecture,
    build_diffusion_network,
    encode_to_latent,
    is_vq,
    latent_channels,
    latent_spatial,
    load_autoencoder,
    projection_encoder_args,
    total_factor,
    unet_args,
)
from .runtime import (
    CompiledNetwork,
    Runtime,
    count_parameters,
    resolve_device_settings,
    to_channels_last,
    rank0_first,
    seed_everything,
    setup_runtime,
    teardown_runtime,
    unwrap,
)
from .settings import Settings, sampling_tile, unet_fit_problems
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import RFlowScheduler

from .conditioning import (
    PIXEL_RANGE,
    Conditioner,
    build_scheduler,
    objective,
    projection,
    resolve_sampler,
    set_sampling_steps,
    to_pixel_space,
)
from .pictures import orthogonal_slices, picture_grid
from .sampling import decode_samples, sample_latents


class LatentDataset(Dataset):
    """Latent mean / std of every training volume, encoded once, with the volume's other keys (conditions)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


class DiffusionStage:
    """Per-batch computation of stage 2, driven by ``engine.run_loop``.

    Args:
        unet: the (possibly DDP-wrapped) DiffusionModelUNet.
        ema: a copy of the UNet holding the exponential moving average of its weights, or None.
        optimizer: optimizer of the UNet.
        lr_scheduler: per-optimizer-step learning-rate schedule.
        autoencoder: the frozen stage-1 autoencoder; None in pixel space (the UNet learns the images, mapped from
            [0, 1] to ``extra["pixel_range"]``).
        scheduler_args: noise-schedule arguments (stored in checkpoints).
        scale_factor: latents are multiplied by this (1 / std of training latents); 1 in pixel space.
        conditioner: turns batch conditions into UNet inputs.
        settings: the full settings (``diffusion.training``, ``sampling``).
        runtime: device / precision / rank.
        extra: checkpoint content that describes the run (autoencoder, data geometry, model arguments).
        picture_dir: where the comparison pictures are written as ``compare_epoch_<N>.png`` (the TensorBoard
            folder); None = TensorBoard only.
    """

    name = "diffusion"

    def __init__(
        self,
        unet: nn.Module,
        ema: nn.Module | None,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        autoencoder: nn.Module | None,
        scheduler_args: dict[str, Any],
        scale_factor: float,
        conditioner: Conditioner,
        settings: Settings,
        runtime: Runtime,
        extra: dict[str, Any],
        picture_dir: Path | None = None,
    ) -> None:
        self.modules = {"unet": unet} if ema is None else {"unet": unet, "ema": ema}
        self.optimizers = {"unet": optimizer}
        self.ema = ema
        self.lr_scheduler = lr_scheduler
        self.autoencoder = autoencoder
        # exact tiled encoding of the frozen KL autoencoder, and the decoding of the pictures; None: whole volumes
        self.tile_size = None if autoencoder is None else settings.autoencoder.tile_size
        self.decode_tile_size, _ = sampling_tile(settings, pixel=autoencoder is None)
        self.scheduler_args = scheduler_args
        self.noise_scheduler = build_scheduler(scheduler_args, "train")
        self.inferer = DiffusionInferer(self.noise_scheduler)
        self.scale_factor = scale_factor
        self.conditioner = conditioner
        self.training = settings.diffusion.training
        self.logging = settings.diffusion.logging
        self.sampling = settings.sampling
        self.picture_dir = picture_dir
        self.epoch = 1  # the epoch being run, 1-based (set by the loop through on_epoch_start)
        self.runtime = runtime
        self.extra = extra
        self._val_generator: torch.Generator | None = None
        # the UNet's training-step forward through torch.compile (device.compile), by modules key
        self.compiled: dict[str, CompiledNetwork] = {}

    # ------------------------------------------------------------------------------------------------ latents
    @torch.no_grad()
    def encode(self, batch: Any, corruption: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean and std of a batch: stored ones (cached latents) or freshly encoded images.

        Args:
            batch: a batch with ``image``, or with ``z_mu`` and ``z_sigma`` (cached latents).
            corruption: :class:`~monai_diffusion.settings.CorruptionSettings` applied to the images before they
                are encoded (``diffusion.training.input_noise``; training only), or None.
        """
        device = self.runtime.device
        if "z_mu" in batch:
            if corruption is not None and corruption.enabled:
                raise ValueError("diffusion.training.input_noise cannot corrupt cached latents "
                                 "(diffusion.training.cache_latents); set one of them to false")
            return batch["z_mu"].to(device).float(), batch["z_sigma"].to(device).float()
        images = self._images(batch, corruption)
        with self.runtime.autocast():
            z_mu, z_sigma = encode_to_latent(self.autoencoder, images, self.tile_size)
        return z_mu.float(), z_sigma.float()

    def _images(self, batch: Any, corruption: Any = None) -> torch.Tensor:
        """The batch's images on the device, corrupted by ``corruption`` (input noise) when given."""
        images = batch["image"].to(self.runtime.device).as_subclass(torch.Tensor).float()
        images = self.runtime.to_memory_format(images)
        return images if corruption is None else corrupt(images, corruption)

    def latent(self, z_mu: torch.Tensor, z_sigma: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        mode = mode or self.training.latent_sampling
        if mode == "sample":  # randn (not randn_like): the draw must not depend on the tensor's memory layout
            z = z_mu + torch.randn(z_sigma.shape, device=z_sigma.device, dtype=z_sigma.dtype) * z_sigma
        else:
            z = z_mu
        return z * self.scale_factor

    @property
    def pixel_space(self) -> bool:
        return self.autoencoder is None

    def model_input(self, batch: Any, mode: str | None = None, corruption: Any = None) -> torch.Tensor:
        """What the UNet learns to generate: scaled latents (``mode`` as :meth:`latent`), or in pixel space the
        images mapped from [0, 1] to the pixel range; ``corruption`` (``diffusion.training.input_noise``, training
        only) is applied to the images first, as in :meth:`encode`."""
        if self.pixel_space:
            return to_pixel_space(self._images(batch, corruption), self.extra["pixel_range"])
        return self.runtime.to_memory_format(self.latent(*self.encode(batch, corruption), mode))

    def describe(self, batch: Any) -> list[str]:
        return self._describe_input(batch) + self._describe_condition()

    def _describe_condition(self) -> list[str]:
        enc = self.extra.get("condition_encoder")
        if enc is None:
            return []
        net = unwrap(self.modules["unet"])
        return [f"condition: sum-projection along axis {self.conditioner.projection_axis}, "
                f"{enc['in_channels']} x {enc['image_size'][0]} x {enc['image_size'][1]} -> {net.encoder.num_tokens} "
                f"context tokens of {enc['embed_dim']} (encoder {count_parameters(net.encoder):,} parameters, trained "
                f"with the UNet; dropped with probability {self.dropout:g})"
                + ("; also spread along the axis as extra UNet input channels" if net.concat_axis is not None
                   else "")]

    def _describe_input(self, batch: Any) -> list[str]:
        if self.pixel_space:
            x = self.model_input(batch)
            lo, hi = self.extra["pixel_range"]
            return [f"pixel-space batch {tuple(x.shape)} (images [0, 1] mapped to [{lo:g}, {hi:g}]; no autoencoder)",
                    f"parameters: UNet {count_parameters(unwrap(self.modules['unet'])):,}"]
        z_mu, _ = self.encode(batch)
        return [
            f"latent batch {tuple(z_mu.shape)} (scale factor {self.scale_factor:.5g})",
            f"parameters: UNet {count_parameters(unwrap(self.modules['unet'])):,}; "
            f"frozen autoencoder {count_parameters(self.autoencoder):,}"
            + (f"; encodes in exact tiles of {'x'.join(map(str, self.tile_size))} (autoencoder.tile_size)"
               if self.tile_size is not None else ""),
        ] + ([f"input noise: {noise.noise_type} (noise_std {noise.noise_std}, dropout_prob {noise.dropout_prob}) on "
              "training volumes before encoding"] if (noise := self.training.input_noise).enabled else [])

    # ----------------------------------------------------------------------------------------------- training
    def _timesteps(self, z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Training timesteps, one per item: uniform integers (DDPM), or rectified flow's own sampling (uniform or
        logit-normal, shifted by the latent size), drawn from ``generator`` when one is given."""
        sched = self.noise_scheduler
        if not isinstance(sched, RFlowScheduler):
            return torch.randint(0, sched.num_train_timesteps, (z.shape[0],), generator=generator, device=z.device)
        if generator is None:
            return sched.sample_timesteps(z).long()
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[z.device] if z.device.type == "cuda" else []):
            torch.manual_seed(seed)
            return sched.sample_timesteps(z).long()

    def _loss(self, unet: nn.Module, z: torch.Tensor, cond: dict, generator: torch.Generator | None = None):
        noise = torch.randn(z.shape, generator=generator, device=z.device)
        t = self._timesteps(z, generator)
        # MONAI's DiffusionInferer noises z and runs the UNet; class labels and a projection ride along as bound
        # arguments
        bound = {k: v for k, v in cond.items() if k != "context"}
        model = functools.partial(unet, **bound) if bound else unet
        prediction = self.inferer(inputs=z, diffusion_model=model, noise=noise, timesteps=t,
                                  condition=cond.get("context"))
        if objective(self.scheduler_args) == "rflow":
            target = z - noise  # the velocity that carries noise (t = T) to data (t = 0)
        elif self.scheduler_args["prediction_type"] == "epsilon":
            target = noise
        elif self.scheduler_args["prediction_type"] == "v_prediction":
            target = self.noise_scheduler.get_velocity(z, noise, t)
        else:
            target = z
        return F.mse_loss(prediction.float(), target.float())

    def training_step(self, batch: Any, epoch: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        z = self.model_input(batch, corruption=self.training.input_noise)
        cond = self.conditioner.drop(self.conditioner.from_batch(batch, self.runtime.device), self.dropout)
        loss = self._loss(self.compiled.get("unet", self.modules["unet"]), z, cond)
        return {"unet": loss}, {"mse": loss.item(), "lr": self.optimizers["unet"].param_groups[0]["lr"]}

    @property
    def dropout(self) -> float:
        return self.extra["conditioning_dropout"] if self.conditioner.active else 0.0

    def after_optimizer_step(self, step: int) -> None:
        self.lr_scheduler.step()
        if self.ema is not None:
            decay = self.training.ema_decay
            with torch.no_grad():
                source = unwrap(self.modules["unet"]).state_dict()
                for key, value in self.ema.state_dict().items():
                    if value.dtype.is_floating_point:
                        value.mul_(decay).add_(source[key].detach(), alpha=1 - decay)
                    else:
                        value.copy_(source[key])

    # --------------------------------------------------------------------------------------------- validation
    def on_validation_start(self) -> None:
        # the same noise and timesteps every validation, so epochs are comparable
        self._val_generator = torch.Generator(device=self.runtime.device).manual_seed(1234)

    def validation_step(self, batch: Any) -> dict[str, float]:
        z = self.model_input(batch, mode="mean")
        cond = self.conditioner.from_batch(batch, self.runtime.device)
        net = self.ema if self.ema is not None else unwrap(self.modules["unet"])
        loss = self._loss(net, z, cond, generator=self._val_generator)
        return {"val_loss": loss.item(), "mse": loss.item()}

    @torch.no_grad()
    def generate(self, n: int, batch: Any | None = None, seed: int = 0, steps: int | None = None) -> torch.Tensor:
        """``n`` decoded samples (conditions taken from ``batch`` when the model is conditioned, then at most as many
        samples as ``batch`` has volumes), by the fast sampler of the training objective (DDIM for DDPM, the
        rectified-flow sampler for rflow) in ``steps`` steps (default ``diffusion.logging.num_inference_steps``,
        or ``sampling.num_inference_steps`` when that is null). The one sampler of every picture in training."""
        net = self.ema if self.ema is not None else unwrap(self.modules["unet"])
        latent_shape = self.extra["latent_shape"]
        generator = torch.Generator(device=self.runtime.device).manual_seed(seed)
        noise = self.runtime.to_memory_format(
            torch.randn((n, *latent_shape), generator=generator, device=self.runtime.device))
        cond = {}
        if self.conditioner.active and batch is not None:
            cond = {k: v[:n] for k, v in self.conditioner.from_batch(batch, self.runtime.device).items()}
            noise = noise[: next(iter(cond.values())).shape[0]]
        sampler = resolve_sampler(self.scheduler_args, self.sampling.scheduler)
        if sampler == "ddpm":  # in training, preview with the fast sampler of the same objective
            sampler = "ddim"
        scheduler = build_scheduler(self.scheduler_args, sampler)
        if steps is None:
            steps = self.logging.num_inference_steps or self.sampling.num_inference_steps
        set_sampling_steps(scheduler, min(steps, self.scheduler_args["num_train_timesteps"]), latent_shape[1:],
                           self.runtime.device)
        with self.runtime.autocast():
            z = sample_latents(net, scheduler, noise, cond, self.conditioner, self.sampling.guidance_scale, generator, False)
            return decode_samples(z.float(), self.autoencoder, self.scale_factor, self.decode_tile_size,
                                  self.extra.get("pixel_range")).float()

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch + 1

    def pictures_due(self, epoch: int) -> tuple[int, int]:
        """How many samples the two pictures of 1-based ``epoch`` show: ``samples/*`` (every
        ``training.generate_samples_interval`` epochs) and the comparison with real volumes (every
        ``logging.visualize_interval`` epochs); 0 = not this epoch."""
        samples = self.extra["num_samples_to_generate"] if epoch % self.training.generate_samples_interval == 0 else 0
        compare = self.logging.num_visualize_samples if epoch % self.logging.visualize_interval == 0 else 0
        return samples, compare

    def visualize(self, batch: Any, quick: bool = False) -> dict[str, torch.Tensor]:
        """The pictures due this epoch, from one set of samples (:meth:`generate`): mid-slices of each sample
        (``samples/<i>/<axis>``), and generated next to real validation volumes from ``batch``
        (``compare/generated_vs_real``, also written to ``picture_dir/compare_epoch_<N>.png``). ``quick``
        (fast_dev_run): both, with one sample in 2 steps, and no file."""
        n_samples, n_compare = self.pictures_due(self.epoch)
        if quick:
            n_samples, n_compare = 1, min(1, self.logging.num_visualize_samples)
        n = max(n_samples, n_compare)
        if n == 0:
            return {}
        samples = self.generate(n, batch, steps=2 if quick else None)
        images = {}
        for i in range(min(n_samples, samples.shape[0])):
            for axis, image in orthogonal_slices([samples[i : i + 1]]).items():
                images[f"samples/{i}/{axis}"] = image
        if n_compare:
            real = batch["image"][:n_compare].as_subclass(torch.Tensor).float()
            picture = comparison_picture(samples[:n_compare], real)
            images["compare/generated_vs_real"] = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255)[None]
            if not quick and self.picture_dir is not None:
                self.picture_dir.mkdir(parents=True, exist_ok=True)
                picture.save(self.picture_dir / f"compare_epoch_{self.epoch}.png")
        return images

    # --------------------------------------------------------------------------------------------- checkpoints
    def checkpoint_extra(self) -> dict[str, Any]:
        return {
            "model_args": self.extra["model_args"],
            "scheduler_args": self.scheduler_args,
            "scale_factor": self.scale_factor,
            "latent_shape": self.extra["latent_shape"],
            "autoencoder": self.extra["autoencoder"],
            "space": "pixel" if self.pixel_space else "latent",
            "pixel_range": self.extra.get("pixel_range"),
            "data_info": self.extra["data_info"],
            "conditioning": self.conditioner.state(),
            "condition_encoder": self.extra.get("condition_encoder"),
            "lr_scheduler": self.lr_scheduler.state_dict(),
        }

    def architecture(self) -> dict[str, Any]:
        return architecture(self.extra["model_args"])

    def load_extra(self, ckpt: dict[str, Any], path: str | Path) -> None:
        space, here = ckpt.get("space", "latent"), "pixel" if self.pixel_space else "latent"
        if space != here:
            raise RunError(f"{path} was trained with diffusion.space={space}, but this run has diffusion.space={here}; "
                           f"resume it with --set diffusion.space={space}")
        self.scale_factor = float(ckpt["scale_factor"])
        self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])


# ---------------------------------------------------------------------------------------------------- helpers
def comparison_picture(generated: torch.Tensor, real: torch.Tensor):
    """A labelled 8-bit PIL image: a row of generated volumes above a row of real ones, mid-slices in every plane,
    in one intensity window (the real volumes' range) so brightness differences show.

    Args:
        generated: (N, C, *spatial) samples.
        real: (M, C, *spatial) real volumes (their spatial size may differ from the samples').
    """
    lo, hi = float(real.min()), float(real.max())
    rows = [("generated", generated.detach().float().cpu()), ("real", real.detach().float().cpu())]
    return picture_grid(rows, (lo, hi) if hi > lo else (0.0, 1.0), max_columns=max(len(generated), len(real)))


def lr_lambda(warmup_steps: int, schedule: str, total_steps: int):
    """Multiplier of the base learning rate at each optimizer step: linear warm-up, then constant or cosine."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


@torch.no_grad()
def estimate_scale_factor(stage_encode, latent, loader, batches: int, runtime: Runtime) -> float:
    """1 / std of the training latents over ``batches`` batches (pooled across DDP ranks)."""
    stats = torch.zeros(3, dtype=torch.float64, device=runtime.device)  # count, sum, sum of squares
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        z = latent(*stage_encode(batch)).double()
        stats += torch.stack([torch.tensor(z.numel(), dtype=torch.float64, device=z.device), z.sum(), z.pow(2).sum()])
    if runtime.distributed:
        dist.all_reduce(stats)
    count, total, squares = stats.tolist()
    std = math.sqrt(max(squares / count - (total / count) ** 2, 1e-12))
    return 1.0 / std


def check_unet_fits(settings: Settings, autoencoder: nn.Module, ae_path: Path) -> tuple[int, ...]:
    """Refuse volumes or a UNet that do not fit the autoencoder stored in ``ae_path`` (the same check settings
    validation runs against the YAML's autoencoder section), with the ``--set`` lines that fix it.

    Returns:
        The latent's spatial size.
    """
    voxel_size = tuple(settings.data.voxel_size)
    try:
        spatial = latent_spatial(autoencoder, voxel_size)
    except ValueError as exc:
        raise ConfigError(f"{list(voxel_size)} does not fit the autoencoder in {ae_path}: {exc}",
                          key="data.voxel_size") from None
    problems = unet_fit_problems(settings.diffusion, latent_channels(autoencoder), autoencoder.spatial_dims,
                                 voxel_size, total_factor(autoencoder),
                                 autoencoder_source=f"the autoencoder in {ae_path}",
                                 latent_key="embedding_dim" if is_vq(autoencoder) else "latent_channels")
    if problems:
        raise ConfigError(problems=problems)
    return tuple(spatial)


def _covariate_stats(datalist: str | None, keys: list[str], class_key: str | None = None,
                     num_classes: int | None = None) -> dict[str, list[float]]:
    """Mean and std of each covariate over the training entries; checks, before anything is trained, that every
    entry (training and validation) has each condition and that class labels are integers in [0, num_classes)."""
    if not keys and class_key is None:
        return {}
    lists = {"training": load_datalist(datalist, "training"),
             "validation": load_datalist(datalist, "validation", missing_ok=True)}
    for name, entries in lists.items():
        for i, entry in enumerate(entries):
            for key in [*keys, *([class_key] if class_key else [])]:
                if key not in entry:
                    raise DataError(f"datalist {datalist}: {name}[{i}] has no '{key}' (named in "
                                    "diffusion.conditioning)")
            if class_key is not None:
                label = entry[class_key]
                if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_classes:
                    raise DataError(f"datalist {datalist}: {name}[{i}] has {class_key}={label!r}, but class labels "
                                    f"must be integers 0..{num_classes - 1} (diffusion.conditioning.num_classes="
                                    f"{num_classes})")
    stats = {}
    for key in keys:
        t = torch.tensor([float(e[key]) for e in lists["training"]], dtype=torch.float64)
        stats[key] = [float(t.mean()), float(t.std()) if len(t) > 1 and float(t.std()) > 0 else 1.0]
    return stats


@torch.no_grad()
def _cache_latents(stage: DiffusionStage, dataset: Any, runtime: Runtime, keep: list[str]) -> LatentDataset:
    items = []
    for i in range(len(dataset)):
        item = dataset[i]
        z_mu, z_sigma = stage.encode({"image": item["image"].unsqueeze(0)})
        entry = {"z_mu": z_mu[0].cpu(), "z_sigma": z_sigma[0].cpu()}
        entry.update({k: item[k] for k in keep})
        if stage.conditioner.projection_axis is not None:  # the condition of a latent is its image's projection
            entry["projection"] = projection(item["image"], stage.conditioner.projection_axis)
        items.append(entry)
    return LatentDataset(items)


# ----------------------------------------------------------------------------------------------------- driver
def build_diffusion_stage(
    settings: Settings,
    runtime: Runtime,
    autoencoder: nn.Module | None,
    conditioner: Conditioner,
    steps_per_epoch: int,
    data_info: dict[str, Any] | None = None,
    autoencoder_source: str = "",
    picture_dir: Path | None = None,
) -> DiffusionStage:
    """Stage 2's UNet (+ EMA copy), optimizer and learning-rate schedule from the settings, around a frozen
    ``autoencoder`` (None in pixel space: the UNet works on ``data.voxel_size`` images); seeded so every rank starts
    from the same weights, DDP-wrapped under ``torchrun``. Used by training and by ``plan`` alike. The latent scale
    factor starts at 1 (training estimates it; pixel space keeps 1)."""
    df, t = settings.diffusion, settings.diffusion.training
    if autoencoder is None:
        sample_shape = [df.in_channels, *settings.data.voxel_size]
    else:
        sample_shape = [latent_channels(autoencoder), *latent_spatial(autoencoder, tuple(settings.data.voxel_size))]
    args = unet_args(df, df.conditioning.num_classes, len(df.conditioning.covariate_keys))
    encoder_args = projection_encoder_args(df, settings.data.voxel_size)
    seed_everything(settings.seed if settings.seed is not None else 0)
    unet = build_diffusion_network(args, encoder_args, df.use_flash_attention).to(runtime.device)
    if runtime.channels_last:
        to_channels_last(unet, df.spatial_dims)
    ema = copy.deepcopy(unet).requires_grad_(False) if t.ema_decay else None
    optimizer = torch.optim.AdamW(unet.parameters(), lr=t.learning_rate)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(t.lr_warmup_steps, t.lr_schedule, steps_per_epoch * t.n_epochs)
    )
    if runtime.distributed:
        unet = DistributedDataParallel(unet, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    sch = df.scheduler
    if sch.type == "rflow":
        scheduler_args = {"type": "rflow", "num_train_timesteps": sch.num_train_timesteps,
                          "sample_method": sch.sample_method, "use_timestep_transform": sch.use_timestep_transform,
                          "spatial_dims": df.spatial_dims}
    else:
        scheduler_args = {"type": "ddpm", "num_train_timesteps": sch.num_train_timesteps, "schedule": sch.schedule,
                          "beta_start": sch.beta_start, "beta_end": sch.beta_end,
                          "prediction_type": sch.prediction_type}
        if autoencoder is None:  # images are bounded: DDPM / DDIM clip the predicted clean image to the pixel range
            scheduler_args.update(clip_sample=True, clip_range=list(PIXEL_RANGE))
    extra = {
        "model_args": args,
        "latent_shape": sample_shape,  # the shape the UNet generates: a latent's, or in pixel space an image's
        "autoencoder": None if autoencoder is None else {
            "model_args": architecture(autoencoder.init_args), "state_dict": autoencoder.state_dict(),
            "source": autoencoder_source},
        "pixel_range": list(PIXEL_RANGE) if autoencoder is None else None,
        "data_info": data_info or {},
        "conditioning_dropout": df.conditioning.dropout,
        "condition_encoder": encoder_args,
        "num_samples_to_generate": t.num_samples_to_generate,
    }
    stage = DiffusionStage(
        unet, ema, optimizer, lr_scheduler, autoencoder, scheduler_args, 1.0, conditioner, settings, runtime, extra,
        picture_dir=picture_dir,
    )
    if runtime.compile:
        stage.compiled["unet"] = CompiledNetwork(unet, "UNet")
    return stage


def _load_frozen_autoencoder(settings: Settings, runtime: Runtime) -> tuple[nn.Module | None, dict[str, Any], Path | None]:
    """The frozen stage-1 autoencoder from its checkpoint (never from the YAML's autoencoder section), checked against
    the UNet; in pixel space ``(None, image geometry from the settings, None)``."""
    df = settings.diffusion
    if df.space == "pixel":
        return None, {"spatial_dims": df.spatial_dims, "in_channels": df.in_channels}, None
    ae_path = Path(df.checkpoints.autoencoder_path)
    autoencoder, ae_ckpt = load_autoencoder(ae_path, use_flash_attention=settings.autoencoder.use_flash_attention)
    autoencoder = autoencoder.to(runtime.device).requires_grad_(False)
    if runtime.channels_last:
        to_channels_last(autoencoder, autoencoder.spatial_dims)
    check_unet_fits(settings, autoencoder, ae_path)
    if settings.autoencoder.tile_size is not None and is_vq(autoencoder):
        raise ConfigError(f"{list(settings.autoencoder.tile_size)}: exact tiled encoding is for the KL autoencoder, but "
                          f"{ae_path} holds a VQ-VAE; set it to null", key="autoencoder.tile_size")
    return autoencoder, {**ae_ckpt["model_args"], "data_info": ae_ckpt.get("data_info")}, ae_path


def train_diffusion(settings: Settings) -> LoopState:
    """Stage 2 end to end: checks, autoencoder from its checkpoint (none in pixel space), data, UNet, then the
    shared loop."""
    df, t = settings.diffusion, settings.diffusion.training
    # the loop offers a picture every gcd of the two intervals; the stage makes the ones due (pictures_due)
    loop_cfg = loop_config(settings, "diffusion",
                           visualize_interval=math.gcd(t.generate_samples_interval, df.logging.visualize_interval))
    seed, output_dir = loop_cfg.seed, loop_cfg.output_dir
    if df.space == "pixel" and t.cache_latents:  # settings refuse this too; the API may be called with edited settings
        raise ConfigError("is true, but diffusion.space is pixel: there are no latents to cache; set it to false",
                          key="diffusion.training.cache_latents")
    runtime = setup_runtime(settings.device.use_cuda, settings.device.gpu_id, settings.device.mixed_precision,
                            channels_last=settings.device.channels_last, compile=settings.device.compile,
                            stage="diffusion")
    try:
        settings, resolved = resolve_device_settings(settings, runtime, "diffusion")  # auto -> what it is here, as config.yaml records
        loop_cfg.settings = settings.to_dict()
        for line in resolved:
            runtime.print(line)
        loop_cfg = resolve_resume(loop_cfg, runtime, "diffusion")  # resume_from: latest -> a file, or None
        if loop_cfg.resume_from is not None:
            load_checkpoint(loop_cfg.resume_from, expected_stage="diffusion")
        prepare_output_dir(loop_cfg, runtime)
        autoencoder, ae_args, ae_path = _load_frozen_autoencoder(settings, runtime)
        cond_cfg = df.conditioning
        conditioner = Conditioner(
            cond_cfg.class_key,
            cond_cfg.num_classes,
            cond_cfg.covariate_keys,
            _covariate_stats(settings.data.datalist, list(cond_cfg.covariate_keys), cond_cfg.class_key,
                             cond_cfg.num_classes),
            projection_axis=df.projection_axis if df.condition_channels is not None else None,
        )
        with rank0_first(runtime):
            train_ds, val_ds, info = build_datasets(
                settings.data,
                spatial_dims=ae_args["spatial_dims"],
                in_channels=ae_args["in_channels"],
                work_dir=output_dir.parent,
            )
        if info.get("subset"):
            runtime.print(f"data: {info['subset']}")
        loader_args = dict(
            batch_size=t.batch_size,
            num_workers=settings.data.num_workers,
            pin_memory=settings.data.pin_memory and runtime.device.type == "cuda",  # pinning starts CUDA
            distributed=runtime.distributed,
            seed=seed,
            num_replicas=runtime.world_size if runtime.distributed else None,
            rank=runtime.rank if runtime.distributed else None,
        )
        train_loader, val_loader = build_loaders(train_ds, val_ds, **loader_args)
        steps_per_epoch = math.ceil(len(train_loader) / t.gradient_accumulation_steps)
        stage = build_diffusion_stage(
            settings, runtime, autoencoder, conditioner, steps_per_epoch,
            data_info=plain(ae_args.get("data_info") or info), autoencoder_source=str(ae_path),
            picture_dir=None if t.fast_dev_run else loop_cfg.log_dir,  # fast_dev_run writes nothing
        )
        if t.cache_latents:
            if settings.data.augmentation.enabled:
                runtime.print("note: cached latents are encoded once, so data.augmentation has no effect in stage 2")
            started = time.perf_counter()
            keep = [k for k in [cond_cfg.class_key, *cond_cfg.covariate_keys] if k]
            latents = _cache_latents(stage, train_ds, runtime, keep)
            train_loader, _ = build_loaders(latents, val_ds, **loader_args)
            runtime.print(f"cached {len(latents)} training latents in {time.perf_counter() - started:.1f} s")
        if loop_cfg.resume_from is None and autoencoder is not None:
            seed_everything(seed + 1)  # the estimate does not depend on what consumed random numbers before
            stage.scale_factor = estimate_scale_factor(stage.encode, stage.latent, train_loader, t.scale_factor_batches, runtime)
            runtime.print(f"latent scale factor 1/std = {stage.scale_factor:.5g} (from {t.scale_factor_batches} batches)")
        state = run_loop(stage, train_loader, val_loader, loop_cfg, runtime)
        if runtime.is_main and not t.fast_dev_run and not state.stopped_by:
            runtime.print(f"stage 2 done: checkpoints in {output_dir}, {loop_cfg.logs_description()}")
        return state
    finally:
        teardown_runtime(runtime)
