"""Stage 1: the KL autoencoder with a reconstruction loss (L1 by default; see docs/losses.md) + KL + adversarial
(+ perceptual) losses, optionally as a denoising autoencoder; or the VQ-VAE with the same reconstruction loss +
quantisation (+ the same adversarial / perceptual terms)."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from monai.losses import PatchAdversarialLoss
from monai.metrics import PSNRMetric, SSIMMetric
from monai.networks.nets import PatchDiscriminator
from torch.nn.parallel import DistributedDataParallel

from generative.networks.nets import AutoencoderKL

from . import geometry
from .data import build_datasets, build_loaders, validates_whole_volumes
from .checkpoints import load_checkpoint, prepare_output_dir, resolve_resume
from .engine import LoopState, loop_config, run_loop
from .errors import RunError
from .fileio import plain
from .losses import ReconstructionLoss, build_reconstruction_loss, corrupt
from .models import (
    architecture,
    build_autoencoder,
    code_usage,
    is_vq,
    latent_channels,
    latent_spatial,
    reconstruct,
    total_factor,
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
from .settings import Settings, total_downsample_factor
from .pictures import orthogonal_slices


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)) summed over latent voxels and channels, averaged over the batch."""
    z_mu, z_sigma = z_mu.float(), z_sigma.float()
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1)
    return kl.flatten(1).sum(dim=1).mean()


class AutoencoderStage:
    """Per-batch computation of stage 1, driven by ``engine.run_loop``.

    Args:
        autoencoder: the (possibly DDP-wrapped) AutoencoderKL.
        discriminator: the (possibly DDP-wrapped) PatchDiscriminator.
        optimizer_g: optimizer of the autoencoder.
        optimizer_d: optimizer of the discriminator.
        training: the ``autoencoder.training`` settings.
        runtime: device / precision / rank.
        perceptual_loss: a frozen perceptual loss module, or None.
        data_info: facts about the training data (spacing, orientation, affine) stored in checkpoints.
        val_window: when set, validation volumes (whole, of any size) are reconstructed tile by tile: the KL
            autoencoder in exact tiles of this size (``encode_tiled`` / ``decode_tiled``: the whole-volume result,
            memory bounded by the tile), the VQ-VAE by sliding windows of this size (MONAI ``SlidingWindowInferer``,
            overlap 0.25, Gaussian blending); None: in one piece.
        val_window_batch_size: VQ-VAE windows reconstructed together.
        num_visualize: validation volumes shown in TensorBoard (from the first validation batch).
        reconstruction_loss: ``loss(recon, target) -> (loss, logs)``; None = built from ``training.loss`` (see
            :func:`monai_diffusion.losses.build_reconstruction_loss`).

    With ``training.denoising.enabled`` the autoencoder sees corrupted training volumes
    (:func:`monai_diffusion.losses.corrupt`) and every loss compares its output with the clean ones; validation and
    the pictures always reconstruct clean volumes.
    """

    name = "autoencoder"

    def __init__(
        self,
        autoencoder: nn.Module,
        discriminator: nn.Module,
        optimizer_g: torch.optim.Optimizer,
        optimizer_d: torch.optim.Optimizer,
        training: Any,
        runtime: Runtime,
        perceptual_loss: nn.Module | None = None,
        data_info: dict[str, Any] | None = None,
        val_window: tuple[int, ...] | None = None,
        val_window_batch_size: int = 1,
        num_visualize: int = 1,
        reconstruction_loss: ReconstructionLoss | None = None,
    ) -> None:
        self.modules = {"autoencoder": autoencoder, "discriminator": discriminator}
        self.optimizers = {"generator": optimizer_g, "discriminator": optimizer_d}
        self.training = training
        self.runtime = runtime
        self.perceptual_loss = perceptual_loss
        self.data_info = data_info or {}
        self.val_window = val_window
        self.inferer = None
        if val_window is not None and is_vq(unwrap(autoencoder)):
            # a progress bar per volume on the main process: whole large volumes take many windows
            self.inferer = SlidingWindowInferer(
                roi_size=val_window, sw_batch_size=val_window_batch_size, overlap=0.25, mode="gaussian",
                progress=runtime.is_main,
            )
        self.num_visualize = num_visualize
        self.reconstruction_loss = reconstruction_loss or build_reconstruction_loss(training.loss)
        self.adv_loss = PatchAdversarialLoss(criterion="least_squares")
        self.psnr = PSNRMetric(max_val=1.0)
        self.ssim = None
        # the trained networks' training-step forwards through torch.compile (device.compile), by modules key
        self.compiled: dict[str, CompiledNetwork] = {}

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def autoencoder(self) -> AutoencoderKL:
        return unwrap(self.modules["autoencoder"])  # type: ignore[return-value]

    def _images(self, batch: Any) -> torch.Tensor:
        images = batch["image"] if isinstance(batch, dict) else batch
        images = images.to(self.runtime.device, non_blocking=True).as_subclass(torch.Tensor).float()
        return self.runtime.to_memory_format(images)

    network_name = "autoencoder"  # how describe() names the stage-1 network

    def describe(self, batch: Any) -> list[str]:
        images = self._images(batch)
        ae = self.autoencoder
        latent = (images.shape[0], latent_channels(ae), *latent_spatial(ae, tuple(images.shape[2:])))
        n_lat = math.prod(latent[1:])
        return [
            f"input batch {tuple(images.shape)} -> latent {latent} (total downsample factor {total_factor(ae)} per "
            f"axis; {images[0].numel() / n_lat:.1f}x fewer values{self._latent_note()})",
            f"parameters: {self.network_name} {count_parameters(ae):,}, "
            f"discriminator {count_parameters(unwrap(self.modules['discriminator'])):,}",
            *self._describe_losses(),
            *self._warnings(tuple(images.shape[2:])),
        ]

    def _latent_note(self) -> str:
        """Appended to describe()'s latent line."""
        return ""

    def _warnings(self, spatial: tuple[int, ...]) -> list[str]:
        """describe()'s warning lines for inputs of ``spatial`` voxels."""
        return attention_warning(self.autoencoder.init_args, spatial)

    def _describe_losses(self) -> list[str]:
        """One line when the reconstruction loss or the inputs differ from the default (plain L1, clean inputs)."""
        kind = self.reconstruction_loss.loss_type
        noise = self.training.denoising
        if kind == "l1" and not noise.enabled:
            return []
        line = f"reconstruction loss: {kind}"
        if noise.enabled:
            line += (f"; denoising: {noise.noise_type} (noise_std {noise.noise_std}, dropout_prob "
                     f"{noise.dropout_prob}) on training inputs, clean targets")
        return [line]

    # ------------------------------------------------------------------------------------------------ training
    def training_step(self, batch: Any, epoch: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        cfg = self.training
        images = self._images(batch)
        autoencoder = self.compiled.get("autoencoder", self.modules["autoencoder"])
        # denoising: corrupted volumes in, clean volumes as the target of every loss (and the discriminator's "real")
        inputs = corrupt(images, cfg.denoising)
        recon, z_mu, z_sigma = autoencoder(inputs)
        recon_f = recon.float()
        recon_loss, logs = self.reconstruction_loss(recon_f, images)
        kl = kl_divergence(z_mu, z_sigma)
        loss_g = recon_loss + cfg.kl_weight * kl
        logs["kl"] = kl.item()
        return self._generator_losses(loss_g, logs, recon_f, images, epoch)

    def _generator_losses(
        self, loss_g: torch.Tensor, logs: dict[str, float], recon_f: torch.Tensor, images: torch.Tensor, epoch: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Add the perceptual and (after the warm-up) adversarial terms to the generator loss ``loss_g`` and compute
        the discriminator's loss; shared by the KL and the VQ-VAE stage."""
        cfg = self.training
        discriminator = self.modules["discriminator"]
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(recon_f, images)
            loss_g = loss_g + cfg.perceptual_weight * p_loss
            logs["perceptual"] = p_loss.item()
        losses = {"generator": loss_g}

        if epoch >= cfg.autoencoder_warm_up_n_epochs and cfg.adv_weight > 0:
            # generator's adversarial term: the discriminator is frozen and called unwrapped (no DDP bookkeeping)
            disc = unwrap(discriminator)
            disc.requires_grad_(False)
            logits_fake = forward_with_own_buffers(disc, recon_f.contiguous())[-1]
            disc.requires_grad_(True)
            adv_g = self.adv_loss(logits_fake, target_is_real=True, for_discriminator=False)
            losses["generator"] = loss_g + cfg.adv_weight * adv_g
            # discriminator: one forward over fake and real together
            both = discriminator(torch.cat([recon_f.detach(), images]).contiguous())[-1]
            fake, real = both.split([recon_f.shape[0], images.shape[0]])
            loss_d = 0.5 * (
                self.adv_loss(fake, target_is_real=False, for_discriminator=True)
                + self.adv_loss(real, target_is_real=True, for_discriminator=True)
            )
            losses["discriminator"] = cfg.adv_weight * loss_d
            logs.update({"adv_g": adv_g.item(), "disc": loss_d.item()})
        logs["loss_g"] = losses["generator"].item()
        return losses, logs

    # ---------------------------------------------------------------------------------------------- validation
    def _reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction of validation volumes: tile by tile when ``val_window`` is set (exact tiles for the KL
        autoencoder, sliding windows for the VQ-VAE), else in one piece."""
        ae = self.autoencoder
        if self.inferer is not None:
            return self.inferer(images, functools.partial(reconstruct, ae)).float()
        return reconstruct(ae, images, tile_size=self.val_window).float()

    def validation_step(self, batch: Any) -> dict[str, float]:
        images = self._images(batch)
        recon = self._reconstruct(images)
        if self.ssim is None:
            self.ssim = SSIMMetric(spatial_dims=images.ndim - 2, data_range=1.0, win_size=min(7, *images.shape[2:]))
        # metrics in fp32 outside autocast: SSIM's variances (E[x^2] - E[x]^2) cancel catastrophically in bf16
        with torch.autocast(device_type=images.device.type, enabled=False):
            images = images.float()
            clamped = recon.clamp(0, 1)
            l1 = F.l1_loss(clamped, images).item()
            metrics = {
                "val_loss": l1,
                "l1": l1,
                "psnr": self.psnr(clamped, images).mean().item(),
                "ssim": self.ssim(clamped, images).mean().item(),
            }
            if self.reconstruction_loss.loss_type != "l1":
                # the configured training loss too (on the unclamped reconstruction, as in training): val_recon, ...
                metrics.update(self.reconstruction_loss(recon, images)[1])
        return metrics

    @torch.no_grad()
    def visualize(self, batch: Any, quick: bool = False) -> dict[str, torch.Tensor]:
        """Input | reconstruction | error, as three orthogonal mid-slices, for ``num_visualize`` volumes (one when
        ``quick``)."""
        out = {}
        images = self._images(batch)[: 1 if quick else self.num_visualize]
        # eval mode for the picture pass: validate() leaves the modules in train mode, and in train mode MONAI's EMA
        # quantizer (VQ-VAE) updates its codebook with an all-reduce over the DDP ranks, which only rank 0 would
        # reach here (the run hung); the pictures must not change the codebook either
        ae = self.modules["autoencoder"]
        was_training = ae.training
        ae.eval()
        try:
            for i in range(images.shape[0]):
                image = images[i : i + 1]
                with self.runtime.autocast():
                    recon = self._reconstruct(image).clamp(0, 1)
                slices = orthogonal_slices([image, recon, (recon - image).abs()])
                out.update({f"reconstruction/{i}/{axis}": v for axis, v in slices.items()})
        finally:
            ae.train(was_training)
        return out

    # --------------------------------------------------------------------------------------------- checkpoints
    def checkpoint_extra(self) -> dict[str, Any]:
        return {
            "model_args": self.architecture(),
            "data_info": self.data_info,
        }

    def architecture(self) -> dict[str, Any]:
        return architecture(self.autoencoder.init_args)

    def load_extra(self, ckpt: dict[str, Any], path: str | Path) -> None:
        """Nothing beyond the weights and optimizer states (restored by the loop)."""


def codebook_is_untrained(vq: nn.Module) -> bool:
    """Whether a VQVAE's codebook has never been updated: MONAI's EMA code counts start at zero and stay positive
    once a batch has been quantised in training mode (so a resumed run is never re-initialised)."""
    return bool(vq.quantizer.quantizer.ema_cluster_size.sum() == 0)


@torch.no_grad()
def init_codebook_from_data(vq: nn.Module, images: torch.Tensor) -> None:
    """Set every code of ``vq`` to the encoder output at a random latent voxel of ``images`` (plus 1 % of the
    latents' per-channel std as noise, so that equal outputs give distinct codes), with an EMA count of 1 each.

    MONAI's EMA codebook starts with zero counts, and a code unused in the first training step is moved so far away
    (its running sum divided by ~epsilon) that it is rarely used again; a freshly initialised encoder maps nearly
    every voxel to one code, so the codebook collapses. Codes drawn from the data start where the latents are.
    Under DDP rank 0's codebook is sent to every rank.
    """
    q = vq.quantizer.quantizer
    z = vq.encode(images).float()
    flat = z.movedim(1, -1).reshape(-1, z.shape[1])
    pick = torch.randint(0, flat.shape[0], (q.num_embeddings,), device=flat.device)
    codes = flat[pick] + 0.01 * flat.std(dim=0).clamp_min(1e-6) * torch.randn_like(flat[pick])
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(codes, src=0)
    q.embedding.weight.copy_(codes)
    q.ema_w.copy_(codes)
    q.ema_cluster_size.fill_(1.0)


class VQVAEStage(AutoencoderStage):
    """Per-batch computation of stage 1 with the VQ-VAE (MONAI core's VQVAE): reconstruction loss + the VQVAE's
    quantisation (commitment) loss, plus the perceptual and adversarial terms under the same keys as the KL stage.
    The codebook itself is updated by the VQVAE's exponential moving average in training mode, not by gradients.

    Codebook usage is logged every step (``perplexity``: exp of the entropy of the batch's code histogram, between 1
    and num_embeddings; ``codes_used``: the fraction of codes used at least once in the batch) and at validation.
    The arguments are those of :class:`AutoencoderStage`, and ``init_codebook``: at the first step of a new run,
    set the codebook from that batch (:func:`init_codebook_from_data`).
    """

    def __init__(self, *args: Any, init_codebook: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.init_codebook = init_codebook
        self._codes: list[torch.Tensor] = []
        # the code indices of every quantisation, as chosen inside the forward pass (works under DDP too)
        self.autoencoder.quantizer.quantizer.register_forward_hook(
            lambda module, inputs, output: self._codes.append(output[2].detach())
        )

    def _code_logs(self) -> dict[str, float]:
        codes, self._codes = self._codes, []
        if not codes:
            return {}
        perplexity, used = code_usage(torch.cat([c.flatten() for c in codes]), self.autoencoder.num_embeddings)
        return {"perplexity": perplexity, "codes_used": used}

    network_name = "VQ-VAE"

    def _latent_note(self) -> str:
        return f"; codebook of {self.autoencoder.num_embeddings} codes"

    def _warnings(self, spatial: tuple[int, ...]) -> list[str]:
        return []  # the attention estimate describes the KL autoencoder's non-local blocks

    def training_step(self, batch: Any, epoch: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        images = self._images(batch)
        if self.init_codebook and codebook_is_untrained(self.autoencoder):
            init_codebook_from_data(self.autoencoder, images)
        self._codes = []
        # denoising as for the KL autoencoder: corrupted volumes in, clean targets
        recon, quantization_loss = self.modules["autoencoder"](corrupt(images, self.training.denoising))
        recon_f = recon.float()
        recon_loss, logs = self.reconstruction_loss(recon_f, images)
        loss_g = recon_loss + quantization_loss.float()
        logs["quantization"] = quantization_loss.item()
        logs.update(self._code_logs())
        return self._generator_losses(loss_g, logs, recon_f, images, epoch)

    def validation_step(self, batch: Any) -> dict[str, float]:
        self._codes = []
        metrics = super().validation_step(batch)
        metrics.update(self._code_logs())
        return metrics


def forward_with_own_buffers(module: nn.Module, *inputs: torch.Tensor) -> Any:
    """``module(*inputs)``, with the same outputs and the same buffer updates, but the autograd graph keeps copies
    of the buffers rather than the buffers themselves.

    The generator's adversarial term runs the discriminator in training mode; BatchNorm's backward node (torch
    before 2.13) keeps ``running_mean``/``running_var``. Before that backward, the DDP-wrapped discriminator's own
    forward broadcasts rank 0's buffers into them in place, and backward then fails with "modified by an inplace
    operation". Here the forward updates copies of the buffers, which are then written back: the buffers end
    with exactly the values a plain call gives, and nothing the graph holds is changed later.
    """
    copies = {name: buf.clone() for name, buf in module.named_buffers()}
    out = torch.func.functional_call(module, copies, inputs)
    with torch.no_grad():
        for name, buf in module.named_buffers():
            buf.copy_(copies[name])
    return out


def build_discriminator(spatial_dims: int, in_channels: int, num_layers_d: int, num_channels: int) -> PatchDiscriminator:
    return PatchDiscriminator(
        spatial_dims=spatial_dims, num_layers_d=num_layers_d, channels=num_channels, in_channels=in_channels
    )


def build_perceptual_loss(training: Any, spatial_dims: int) -> nn.Module | None:
    """The frozen perceptual loss when enabled; stops with a clear message when its weights are unusable."""
    if not training.use_perceptual_loss:
        return None
    from generative.losses import PerceptualLoss

    try:
        return PerceptualLoss(
            spatial_dims=spatial_dims,
            network_type=training.perceptual_network,
            is_fake_3d=spatial_dims == 3 and not training.perceptual_network.startswith("medicalnet"),
            fake_3d_ratio=training.perceptual_fake_3d_ratio,
            pretrained_path=training.perceptual_weights_path,
        ).eval()
    except (ImportError, RuntimeError, ValueError) as exc:
        raise RunError(
            f"autoencoder.training.use_perceptual_loss is on but the perceptual network cannot be built "
            f"(nothing is downloaded at run time): {exc}"
        ) from exc


def build_autoencoder_stage(
    settings: Settings,
    runtime: Runtime,
    perceptual: nn.Module | None = None,
    data_info: dict[str, Any] | None = None,
    val_window: tuple[int, ...] | None = None,
) -> AutoencoderStage:
    """Stage 1's networks and optimizers from the settings, seeded so every rank starts from the same weights,
    wrapped in DDP under ``torchrun``. Used by training and by ``plan`` alike. ``val_window``: see
    :class:`AutoencoderStage` (its batch size is ``autoencoder.logging.sliding_window_batch_size``)."""
    ae_cfg, t = settings.autoencoder, settings.autoencoder.training
    seed_everything(settings.seed if settings.seed is not None else 0)
    autoencoder = build_autoencoder(ae_cfg).to(runtime.device)
    discriminator = build_discriminator(
        ae_cfg.spatial_dims, ae_cfg.out_channels, t.discriminator.num_layers_d, t.discriminator.num_channels
    ).to(runtime.device)
    if perceptual is not None:
        perceptual = perceptual.to(runtime.device)
    if runtime.channels_last:
        to_channels_last(autoencoder, ae_cfg.spatial_dims)
        to_channels_last(discriminator, ae_cfg.spatial_dims)
    optimizer_g = torch.optim.Adam(autoencoder.parameters(), lr=t.learning_rate)
    optimizer_d = torch.optim.Adam(discriminator.parameters(), lr=t.discriminator.learning_rate or t.learning_rate)
    if runtime.distributed:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        autoencoder = DistributedDataParallel(autoencoder, device_ids=ids)
        discriminator = DistributedDataParallel(discriminator, device_ids=ids)
    stage_class = VQVAEStage if ae_cfg.type == "vq" else AutoencoderStage
    stage = stage_class(
        autoencoder,
        discriminator,
        optimizer_g,
        optimizer_d,
        t,
        runtime,
        perceptual_loss=perceptual,
        data_info=data_info,
        val_window=val_window,
        val_window_batch_size=ae_cfg.logging.sliding_window_batch_size,
        num_visualize=ae_cfg.logging.num_visualize_samples,
        **({"init_codebook": ae_cfg.vqvae.init_codebook_from_data} if ae_cfg.type == "vq" else {}),
    )
    if runtime.compile:
        if ae_cfg.type == "vq":  # its codebook's moving average and code hooks run in the forward: kept eager
            runtime.print("note: device.compile: the VQ-VAE trains without torch.compile (its codebook update runs "
                          "inside its forward)")
        else:
            stage.compiled["autoencoder"] = CompiledNetwork(autoencoder, "autoencoder")
    return stage


def train_autoencoder(settings: Settings) -> LoopState:
    """Stage 1 end to end: checks, data, networks, then the shared loop. Returns the final loop state."""
    ae_cfg, t = settings.autoencoder, settings.autoencoder.training
    loop_cfg = loop_config(settings, "autoencoder")
    seed, output_dir = loop_cfg.seed, loop_cfg.output_dir
    runtime = setup_runtime(settings.device.use_cuda, settings.device.gpu_id, settings.device.mixed_precision,
                            channels_last=settings.device.channels_last, compile=settings.device.compile,
                            stage="autoencoder")
    try:
        settings, resolved = resolve_device_settings(settings, runtime, "autoencoder")  # auto -> what it is here, as config.yaml records
        loop_cfg.settings = settings.to_dict()
        for line in resolved:
            runtime.print(line)
        # everything that can fail cheaply fails before data is read or networks are built
        loop_cfg = resolve_resume(loop_cfg, runtime, "autoencoder")  # resume_from: latest -> a file, or None
        if loop_cfg.resume_from is not None:
            load_checkpoint(loop_cfg.resume_from, expected_stage="autoencoder")
        prepare_output_dir(loop_cfg, runtime)
        perceptual = build_perceptual_loss(t, ae_cfg.spatial_dims)

        window = validation_window(settings)
        with rank0_first(runtime):
            train_ds, val_ds, info = build_datasets(
                settings.data,
                spatial_dims=ae_cfg.spatial_dims,
                in_channels=ae_cfg.in_channels,
                work_dir=output_dir.parent,
                divisible_by=total_downsample_factor(ae_cfg) if window is not None else None,
                whole_val_volumes=ae_cfg.logging.use_sliding_window,
            )
        runtime.print(f"data: {info.get('source', '')} ({info.get('n_train')} training, {info.get('n_val')} validation volumes)"
                      + (f"; {info['subset']}" if info.get("subset") else ""))
        train_loader, val_loader = build_loaders(
            train_ds,
            val_ds,
            batch_size=t.batch_size,
            num_workers=settings.data.num_workers,
            pin_memory=settings.data.pin_memory and runtime.device.type == "cuda",  # pinning starts CUDA
            distributed=runtime.distributed,
            seed=seed,
            num_replicas=runtime.world_size if runtime.distributed else None,
            rank=runtime.rank if runtime.distributed else None,
            val_batch_size=1 if window is not None else None,  # whole volumes can differ in size
        )
        stage = build_autoencoder_stage(
            settings, runtime, perceptual=perceptual, data_info=plain(info), val_window=window,
        )
        state = run_loop(stage, train_loader, val_loader, loop_cfg, runtime)
        if runtime.is_main and not t.fast_dev_run and not state.stopped_by:
            runtime.print(f"stage 1 done: checkpoints in {output_dir}, {loop_cfg.logs_description()}")
        return state
    finally:
        teardown_runtime(runtime)


ATTENTION_WARN_BYTES = 4 * 2**30  # one attention matrix above this (fp32, per head and volume) earns a warning


def attention_warning(init_args: dict[str, Any], spatial: tuple[int, ...]) -> list[str]:
    """A warning line when the KL autoencoder's plain (not ``use_flash_attention``) self-attention would hold an
    attention matrix of more than 4 GiB (fp32, per head and volume) for inputs of ``spatial`` voxels: its size is
    (positions at the level)^2 x 4 bytes, at every level with attention and at the deepest level (the encoder's and
    decoder's non-local blocks). Such a step usually ends out of memory; SDPA attention does not build the matrix.

    Args:
        init_args: the autoencoder's constructor arguments (``AutoencoderKL.init_args``).
        spatial: the spatial size of its input.
    """
    if init_args.get("use_flash_attention"):
        return []
    dims, levels = len(spatial), len(init_args["num_channels"])
    resolutions = geometry.level_resolutions(
        spatial, geometry.per_axis(init_args.get("initial_downsample_factor", 1), dims, "initial_downsample_factor"),
        geometry.per_level_factors(init_args.get("downsample_factors"), levels - 1, dims))
    attended = set(i for i, on in enumerate(init_args["attention_levels"]) if on)
    if init_args.get("with_encoder_nonlocal_attn", True) or init_args.get("with_decoder_nonlocal_attn", True):
        attended.add(levels - 1)
    positions = max((math.prod(resolutions[level]) for level in attended if level < levels), default=0)
    if positions**2 * 4 <= ATTENTION_WARN_BYTES:
        return []
    return [f"warning: the autoencoder's self-attention over {positions:,} positions builds a "
            f"{positions**2 * 4 / 2**30:.1f} GiB attention matrix per head and volume (fp32), which usually runs out "
            f"of memory; --set autoencoder.use_flash_attention=true computes it without the matrix (or turn "
            f"attention off at that level)"]


def validation_window(settings: Settings) -> tuple[int, ...] | None:
    """The tile (KL) or sliding window (VQ-VAE) of stage 1's validation: ``autoencoder.logging.sliding_window_roi_size``
    (default ``autoencoder.tile_size``, then ``data.voxel_size``) when validation volumes are whole
    (``autoencoder.logging.use_sliding_window``, or training
    on random patches without ``data.augmentation.use_center_crop_for_val``: :func:`data.validates_whole_volumes`),
    else None (validation volumes are ``voxel_size`` and go in one piece)."""
    log = settings.autoencoder.logging
    if not (log.use_sliding_window or validates_whole_volumes(settings.data)):
        return None
    return tuple(log.sliding_window_roi_size or settings.autoencoder.tile_size or settings.data.voxel_size)
