"""YAML file (+ ``--set key=value`` overrides) -> validated, typed settings.

Every configuration error is found here, before any data is read or any network is built:

* unknown keys at any level (with the closest valid name: ``did you mean 'n_epochs'?``),
* wrong types (``true`` is not an integer, ``2.5`` is not an integer, a scalar is not a list, ...),
* values out of range and unknown enum values,
* list lengths that do not match ``spatial_dims`` / the number of levels,
* a ``data.voxel_size`` the autoencoder cannot divide (with the nearest valid sizes),
* missing or conflicting data sources and (with ``check_paths``) folders/files that do not exist.

Every error is a :class:`ConfigError` naming the dotted key path (``autoencoder.training.n_epochs``), what was given
and what was expected. All problems found in one phase are reported together.

Notes on values:

* Floats: YAML 1.1 (PyYAML) reads ``1e-4`` (no dot in the mantissa) as the *string* ``"1e-4"``. Float fields accept
  such strings when they parse as a number, so ``learning_rate: 1e-4`` and ``learning_rate: 1.0e-4`` mean the same.
  Integer fields never accept strings, floats or booleans.
* Enum values (``crop_mode``, ``schedule``, ...) are matched case-insensitively and stored in their canonical
  lower-case spelling.
* A section written with nothing under it (``training:``) means "all defaults".
* Relative paths are kept as written; they are relative to the working directory of the process, not to the YAML.

Public API: :class:`Settings` (and its section dataclasses), :class:`ConfigError`, :func:`load_settings`,
:func:`settings_from_dict`, :func:`add_config_args`, :func:`settings_from_args`, :func:`total_downsample_factor`,
:func:`unet_fit_problems`, :func:`build_data_settings`, :func:`apply_overrides`, :func:`fold_seed_vqvae`,
:func:`latent_channels_of`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Tuple, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError

__all__ = [
    "ConfigError",
    "Settings",
    "DataSettings",
    "SyntheticDataSettings",
    "IntensitySettings",
    "AugmentationSettings",
    "AutoencoderSettings",
    "VQVAESettings",
    "AutoencoderTrainingSettings",
    "DiscriminatorSettings",
    "ReconstructionLossSettings",
    "WeightedLossSettings",
    "DiceLossSettings",
    "CombinedLossSettings",
    "CorruptionSettings",
    "CheckpointSettings",
    "DiffusionCheckpointSettings",
    "LoggingSettings",
    "DiffusionSettings",
    "SchedulerSettings",
    "DiffusionTrainingSettings",
    "ConditioningSettings",
    "PointCloudSettings",
    "SamplingSettings",
    "DeviceSettings",
    "load_settings",
    "settings_from_dict",
    "apply_overrides",
    "add_config_args",
    "settings_from_args",
    "total_downsample_factor",
    "initial_downsample_factor",
    "unet_fit_problems",
    "build_data_settings",
    "fold_seed_vqvae",
    "latent_channels_of",
]


# --------------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------------


class _Problem(Exception):
    """Internal: one problem at one key path, raised while converting a value."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(key, message)
        self.key = key
        self.message = message


# --------------------------------------------------------------------------------------------------------------------
# field helper
# --------------------------------------------------------------------------------------------------------------------


def _f(
    default: Any, doc: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None
) -> Any:
    """A settings field: default, one-line doc, numeric bounds applied to the value (or every number in a list)."""
    return field(default=default, metadata={"doc": doc, "ge": ge, "gt": gt, "le": le})


def _section(cls: type, doc: str) -> Any:
    """A nested settings section with all its defaults."""
    return field(default_factory=cls, metadata={"doc": doc})


IntList = Tuple[int, ...]
Factor = Union[int, Tuple[int, ...]]


# --------------------------------------------------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------------------------------------------------


def _synthetic_settings_class() -> type:
    """``data.synthetic``: the switch, the kind, counts and seed, then every generator parameter of every kind
    (their names are unique across kinds; only the chosen kind's are used), taken from ``synthetic.PARAMS``."""
    from .synthetic import KINDS, PARAMS

    base = [
        ("enabled", bool, _f(False, "use a built-in synthetic dataset instead of folders or a datalist")),
        ("kind", Literal[KINDS], _f("phantom", "which one: " + " | ".join(KINDS) + " (see docs/datasets.md)")),
        ("num_train", int, _f(16, "number of synthetic training volumes", ge=1)),
        ("num_val", int, _f(4, "number of synthetic validation volumes", ge=1)),
        ("seed", int, _f(0, "seed of the synthetic generator (same seed -> same volumes)", ge=0)),
    ]
    params = []
    for kind, cls in PARAMS.items():
        for f in dataclasses.fields(cls):
            meta = dict(f.metadata)
            params.append((f.name, type(f.default), _f(f.default, f"{kind}: {meta['doc']}", ge=meta.get("ge"),
                                                       gt=meta.get("gt"), le=meta.get("le"))))
    cls = dataclasses.make_dataclass("SyntheticDataSettings", base + params, frozen=True)
    cls.__module__ = __name__
    cls.__doc__ = ("Built-in synthetic dataset, written as NIfTI under the run folder: phantom, microtubules or "
                   "brain, with the chosen kind's generator parameters.")
    return cls


SyntheticDataSettings = _synthetic_settings_class()


def synthetic_params(synthetic: Any) -> dict[str, Any]:
    """The generator parameters of the chosen ``data.synthetic.kind``, from the ``data.synthetic`` settings."""
    from .synthetic import PARAMS

    return {f.name: getattr(synthetic, f.name) for f in dataclasses.fields(PARAMS[synthetic.kind])}


@dataclass(frozen=True)
class IntensitySettings:
    """Per-volume intensity scaling to [0, 1] between two percentiles (MONAI ScaleIntensityRangePercentiles), or of
    a fixed range (MONAI ScaleIntensityRange); the built-in synthetic datasets are made in [0, 1] and not scaled."""

    lower_percentile: float = _f(0.5, "percentile mapped to 0", ge=0, le=100)
    upper_percentile: float = _f(99.5, "percentile mapped to 1", ge=0, le=100)
    clip: bool = _f(True, "clip values outside [0, 1] after scaling")
    range: Optional[Tuple[float, ...]] = _f(
        None, "[min, max]: map this fixed intensity range to [0, 1] instead of the percentiles (e.g. [0, 255] for "
              "8-bit data); null = percentile scaling"
    )


@dataclass(frozen=True)
class AugmentationSettings:
    """Training-time augmentation (validation data is never augmented)."""

    enabled: bool = _f(False, "apply augmentation to training volumes")
    random_flip_prob: float = _f(0.5, "probability of flipping along each spatial axis", ge=0, le=1)
    random_rotate_prob: float = _f(
        0.0, "probability of a random 90-degree rotation in the plane of the first two spatial axes (needs "
             "voxel_size[0] == voxel_size[1])", ge=0, le=1
    )
    use_patch_based: bool = _f(
        False, "train on random voxel_size patches (padded first if smaller), as crop_mode: random_patch does; "
               "applies whether or not augmentation is enabled"
    )
    use_center_crop_for_val: Optional[bool] = _f(
        None, "validation volumes: true = centre crop (pad if smaller) to voxel_size | false = resize to voxel_size | "
              "null = as crop_mode (whole volumes with random patches)"
    )
    invert_intensity: bool = _f(
        False, "after intensity scaling, each volume becomes max + min - value (training and validation data; "
               "applies whether or not augmentation is enabled)"
    )


@dataclass(frozen=True)
class DataSettings:
    """Where the volumes come from and how they are turned into network inputs."""

    train_data_dir: Optional[str] = _f(None, "folder of training .nii/.nii.gz volumes")
    val_data_dir: Optional[str] = _f(None, "optional folder of validation volumes (only with train_data_dir)")
    datalist: Optional[str] = _f(
        None, 'decathlon-style JSON with "training"/"validation" lists of {"image": path, ...}'
    )
    synthetic: SyntheticDataSettings = _section(SyntheticDataSettings, "built-in synthetic dataset")
    voxel_size: IntList = _f(
        (64, 64, 64), "spatial size fed to the network, one int per spatial axis (one int = a cube)", ge=1
    )
    voxel_resize: Optional[IntList] = _f(
        None, "resize every volume to this size first (one int per axis, or one int = a cube), then crop or patch "
              "it to voxel_size (crop_mode resize then means a centre crop); null = no resize first", ge=1
    )
    max_data_size_for_train: Optional[int] = _f(
        None, "use only the first N training files (sorted folder, datalist order, or the synthetic ones); null = all",
        ge=1,
    )
    max_data_size_for_val: Optional[int] = _f(None, "use only the first N validation files; null = all", ge=1)
    spacing: Optional[Tuple[float, ...]] = _f(None, "target voxel spacing in mm per axis; null = keep spacing", gt=0)
    orientation: Optional[str] = _f(
        "RAS", "axis codes to reorient to (e.g. RAS, LPS; 2D: RA, or the first two of three); null = keep orientation"
    )
    intensity: IntensitySettings = _section(IntensitySettings, "intensity scaling")
    crop_mode: Literal["resize", "pad_crop", "random_patch"] = _f(
        "resize", "how volumes reach voxel_size: resize (a centre crop when voxel_resize is set) | pad_crop (centre) | "
                  "random_patch (random crop)"
    )
    cache_rate: float = _f(1.0, "fraction of the dataset cached in memory (MONAI CacheDataset)", ge=0, le=1)
    cache_dir: Optional[str] = _f(None, "if set, cache preprocessed volumes on disk there (MONAI PersistentDataset)")
    num_workers: int = _f(0, "DataLoader worker processes", ge=0)
    pin_memory: bool = _f(False, "DataLoader pin_memory")
    on_read_error: Literal["fail", "skip"] = _f(
        "fail", "what to do with a volume that cannot be read: fail (stop) | skip (warn and leave it out)"
    )
    augmentation: AugmentationSettings = _section(AugmentationSettings, "training-time augmentation")


@dataclass(frozen=True)
class DiscriminatorSettings:
    """Patch discriminator of the adversarial loss (MONAI PatchDiscriminator)."""

    num_layers_d: int = _f(3, "number of strided convolution layers", ge=1)
    num_channels: int = _f(32, "channels of the first layer", ge=1)
    learning_rate: Optional[float] = _f(None, "discriminator learning rate; null = autoencoder learning_rate", gt=0)


@dataclass(frozen=True)
class WeightedLossSettings:
    """Foreground-weighted reconstruction loss: each voxel's error times a weight chosen by its target intensity."""

    loss_type: Literal["l1", "mse"] = _f("l1", "per-voxel error: l1 (|x - y|) | mse ((x - y)^2)")
    recon_loss_type: Optional[Literal["l1", "mse"]] = _f(
        None, "the same as loss_type under the name the seed's VQ config uses; when set it is used (null = loss_type)"
    )
    foreground_weight: float = _f(20.0, "weight of voxels whose target is above threshold (the foreground)", gt=0)
    background_weight: float = _f(1.0, "weight of the other voxels (the background)", ge=0)
    threshold: float = _f(0.1, "target intensity above which a voxel is foreground (intensities are in [0, 1])",
                          ge=0, le=1)


@dataclass(frozen=True)
class DiceLossSettings:
    """Soft Dice loss (1 - Dice) on the [0, 1] intensities (MONAI DiceLoss)."""

    smooth: float = _f(1.0e-5, "added to numerator and denominator of the Dice ratio (empty volumes give Dice 1)",
                       gt=0)
    sigmoid: bool = _f(False, "apply a sigmoid to the reconstruction before the Dice ratio")


@dataclass(frozen=True)
class CombinedLossSettings:
    """dice_weight * Dice loss + recon_weight * foreground-weighted reconstruction loss."""

    dice_weight: float = _f(1.0, "weight of the Dice loss term", ge=0)
    recon_weight: float = _f(1.0, "weight of the foreground-weighted reconstruction term", ge=0)
    recon_loss_type: Literal["l1", "mse"] = _f("l1", "per-voxel error of the reconstruction term: l1 | mse")
    foreground_weight: float = _f(20.0, "weight of voxels whose target is above threshold", gt=0)
    background_weight: float = _f(1.0, "weight of the other voxels", ge=0)
    threshold: float = _f(0.1, "target intensity above which a voxel is foreground", ge=0, le=1)
    dice_smooth: float = _f(1.0e-5, "smoothing term of the Dice ratio", gt=0)


@dataclass(frozen=True)
class ReconstructionLossSettings:
    """Stage 1's reconstruction loss (see docs/losses.md); the KL, adversarial and perceptual terms are added to it."""

    reconstruction_loss_type: Literal["l1", "mse", "weighted", "dice", "combined"] = _f(
        "l1", "l1 | mse | weighted (foreground-weighted l1/mse) | dice (soft Dice) | combined (Dice + weighted)"
    )
    weighted: WeightedLossSettings = _section(WeightedLossSettings, "used when reconstruction_loss_type is weighted")
    dice: DiceLossSettings = _section(DiceLossSettings, "used when reconstruction_loss_type is dice")
    combined: CombinedLossSettings = _section(CombinedLossSettings, "used when reconstruction_loss_type is combined")


@dataclass(frozen=True)
class CorruptionSettings:
    """Input corruption: autoencoder.training.denoising (stage 1) and diffusion.training.input_noise (stage 2)."""

    enabled: bool = _f(
        False, "corrupt the training inputs (stage 1 compares with the clean volumes); validation inputs stay clean"
    )
    noise_type: Literal["gaussian", "dropout", "mixed"] = _f(
        "gaussian", "gaussian (add N(0, noise_std)) | dropout (zero voxels with dropout_prob) | mixed (both)"
    )
    noise_std: float = _f(0.1, "standard deviation of the added Gaussian noise (intensities are in [0, 1])", ge=0)
    dropout_prob: float = _f(0.1, "probability that a voxel is set to 0; must be below 1", ge=0, le=1)


@dataclass(frozen=True)
class AutoencoderTrainingSettings:
    """Stage 1 (autoencoder) training."""

    n_epochs: int = _f(100, "number of epochs", ge=1)
    batch_size: int = _f(1, "volumes per batch", ge=1)
    learning_rate: float = _f(1.0e-4, "generator learning rate", gt=0)
    adv_weight: float = _f(0.01, "weight of the adversarial loss", ge=0)
    perceptual_weight: float = _f(0.001, "weight of the perceptual loss", ge=0)
    kl_weight: float = _f(1.0e-6, "weight of the KL loss", ge=0)
    use_perceptual_loss: bool = _f(False, "add a perceptual loss (needs perceptual_weights_path)")
    perceptual_weights_path: Optional[str] = _f(None, "local weights file of perceptual_network (no downloads)")
    perceptual_network: Literal[
        "squeeze", "alex", "vgg", "medicalnet_resnet10_23datasets", "medicalnet_resnet50_23datasets",
        "radimagenet_resnet50", "resnet50",
    ] = _f("squeeze", "MONAI PerceptualLoss network_type; 2D nets run fake-3D, medicalnet_* run true 3D")
    perceptual_fake_3d_ratio: float = _f(0.2, "fraction of slices per axis used by fake-3D perceptual loss", ge=0, le=1)
    use_gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory (slower)")
    gradient_accumulation_steps: int = _f(1, "batches per optimizer step", ge=1)
    grad_clip_norm: Optional[float] = _f(None, "clip gradient norm to this value; null = no clipping", gt=0)
    autoencoder_warm_up_n_epochs: int = _f(5, "epochs before the adversarial loss is switched on", ge=0)
    discriminator: DiscriminatorSettings = _section(DiscriminatorSettings, "patch discriminator")
    loss: ReconstructionLossSettings = _section(ReconstructionLossSettings, "reconstruction loss (docs/losses.md)")
    denoising: CorruptionSettings = _section(
        CorruptionSettings, "denoising autoencoder: train on corrupted inputs against the clean volumes"
    )
    val_interval: int = _f(1, "validate every N epochs", ge=1)
    save_interval: int = _f(1, "save a checkpoint every N epochs", ge=1)
    fast_dev_run: bool = _f(False, "run a few batches of every step, then stop; writes no checkpoints or logs")
    fast_dev_run_batches: int = _f(2, "batches per step in fast_dev_run", ge=1)
    on_nonfinite: Literal["stop", "skip"] = _f(
        "stop", "a non-finite loss on any process: stop (every process, keeping the last good checkpoint) | skip "
                "(drop the step's gradients and go on)"
    )
    max_consecutive_skips: int = _f(10, "with on_nonfinite: skip, stop after this many non-finite batches in a row",
                                    ge=1)


@dataclass(frozen=True)
class CheckpointSettings:
    """Where a stage writes checkpoints and what it resumes from."""

    output_dir: str = _f("runs/autoencoder", "folder of this stage's checkpoints")
    save_best: bool = _f(True, "also keep best_model.pt (lowest validation loss)")
    resume_from: Optional[str] = _f(
        None, "checkpoint to resume training from, or latest (the newest complete checkpoint in output_dir); "
              "null = start fresh"
    )
    start_fresh_if_none: bool = _f(
        False, "with resume_from: latest, start a new run when output_dir holds no checkpoint yet (job scripts "
               "that are requeued); false = that is an error"
    )
    every_n_steps: Optional[int] = _f(
        None, "also write step_checkpoint_<step>.pt every N optimizer steps (resumes inside the epoch); null = off",
        ge=1,
    )
    keep_last: Optional[int] = _f(
        None, "keep only the newest K step checkpoints (never latest_checkpoint.pt or best_model.pt); null = all",
        ge=1,
    )
    init_from: Optional[str] = _f(
        None, "start from the network weights of this checkpoint (same architecture, any input size; optimizer, "
              "epoch and output folder start fresh), e.g. for progressive resolution; null = random init"
    )


@dataclass(frozen=True)
class DiffusionCheckpointSettings(CheckpointSettings):
    """Stage 2 checkpoints (the same keys as stage 1's); the autoencoder is rebuilt from its own checkpoint."""

    output_dir: str = _f("runs/diffusion", "folder of this stage's checkpoints")
    autoencoder_path: Optional[str] = _f(None, "stage 1 checkpoint (e.g. runs/autoencoder/best_model.pt)")


@dataclass(frozen=True)
class LoggingSettings:
    """TensorBoard logging of stage 1."""

    log_dir: Optional[str] = _f(None, "TensorBoard folder; null = <checkpoints.output_dir>/logs")
    log_interval: int = _f(10, "log training losses every N steps", ge=1)
    visualize_interval: int = _f(1, "log input / reconstruction / error slices every N epochs", ge=1)
    num_visualize_samples: int = _f(1, "validation volumes shown per visualization", ge=0)
    use_sliding_window: bool = _f(
        False, "validate (losses, PSNR, SSIM, pictures) on whole validation volumes, not cropped or resized to "
               "data.voxel_size (validation batch size 1, so pictures show one volume); data.crop_mode random_patch "
               "always does. The KL autoencoder reconstructs them in exact tiles (the result of the whole-volume "
               "pass, memory bounded by the tile), the VQ-VAE by MONAI sliding windows (overlap 0.25, Gaussian "
               "blending)"
    )
    sliding_window_roi_size: Optional[IntList] = _f(
        None, "tile / window size, one int per spatial axis, each divisible by the autoencoder's total downsample "
              "factor; null = autoencoder.tile_size, or data.voxel_size when that is null too", ge=1
    )
    sliding_window_batch_size: int = _f(1, "VQ-VAE windows reconstructed together (more = faster, more memory); the "
                                           "KL autoencoder's exact tiles run one at a time", ge=1)


@dataclass(frozen=True)
class DiffusionLoggingSettings:
    """TensorBoard logging of stage 2: samples (diffusion.training.generate_samples_interval and
    num_samples_to_generate) and samples next to real validation volumes (visualize_interval)."""

    log_dir: Optional[str] = _f(None, "TensorBoard folder; null = <checkpoints.output_dir>/logs")
    log_interval: int = _f(10, "log training losses every N steps", ge=1)
    visualize_interval: int = _f(
        10, "every N epochs, log generated mid-slices next to real validation mid-slices (TensorBoard image "
            "compare/generated_vs_real and <log_dir>/compare_epoch_<N>.png)", ge=1
    )
    num_visualize_samples: int = _f(1, "generated (and real) volumes in that picture, one row each; 0 = none", ge=0)
    num_inference_steps: Optional[int] = _f(
        None, "sampling steps of every picture made during training (these and the samples of "
              "training.generate_samples_interval); null = sampling.num_inference_steps", ge=1
    )


VQ_ACTIVATIONS = ("relu", "leakyrelu", "prelu", "elu", "gelu", "silu", "tanh", "sigmoid")


@dataclass(frozen=True)
class VQVAESettings:
    """VQ-VAE stage 1 (MONAI core monai.networks.nets.VQVAE), used when autoencoder.type is vq. Every level
    downsamples: levels = len(num_channels), total factor = product of the strides."""

    num_channels: IntList = _f((64, 128, 256), "channels of each level (every level downsamples once)", ge=1)
    num_res_channels: Union[int, IntList] = _f(256, "channels inside the residual layers: int or one per level", ge=1)
    num_res_layers: int = _f(2, "residual layers per level", ge=0)
    num_embeddings: int = _f(256, "codebook size (number of codes)", ge=2)
    embedding_dim: int = _f(32, "channels of the latent and of every code; diffusion.in_channels must equal it", ge=1)
    downsample_parameters: Optional[Tuple[IntList, ...]] = _f(
        None, "one [stride, kernel, dilation, padding] per level; null = [2, 4, 1, 1] at every level", ge=0
    )
    upsample_parameters: Optional[Tuple[IntList, ...]] = _f(
        None, "one [stride, kernel, dilation, padding, output_padding] per decoder level (latent first); "
              "null = [2, 4, 1, 1, 0] at every level", ge=0
    )
    commitment_cost: float = _f(0.25, "weight of the commitment term in the quantisation loss", ge=0)
    decay: float = _f(0.5, "EMA decay of the codebook updates (MONAI VQVAE default)", ge=0, le=1)
    epsilon: float = _f(1.0e-5, "EMA smoothing of the code counts", gt=0)
    embedding_init: Literal["normal", "kaiming_uniform"] = _f("normal", "codebook initialisation")
    init_codebook_from_data: bool = _f(
        True, "at the first step of a new run, set the codes to encoder outputs of that batch (keeps codes in use; "
              "false = MONAI's random codebook only, as the seed system)"
    )
    dropout: float = _f(0.0, "dropout ratio of the encoder and decoder", ge=0, le=1)
    act: Literal[VQ_ACTIVATIONS] = _f("relu", "activation of the encoder and decoder")
    output_act: Optional[Literal[VQ_ACTIVATIONS]] = _f(
        "relu", "activation of the decoder output (the seed system used relu); null = none"
    )


@dataclass(frozen=True)
class AutoencoderSettings:
    """Stage 1: KL autoencoder (generative.networks.nets.AutoencoderKL) or VQ-VAE (type vq; MONAI VQVAE, see the
    vqvae section and docs/vq_vae.md) and its training."""

    type: Literal["kl", "vq"] = _f(
        "kl", "kl (AutoencoderKL: the keys below up to use_convtranspose) | vq (VQ-VAE: the vqvae section); a "
              "top-level vqvae: section (seed config) selects vq"
    )
    spatial_dims: int = _f(3, "number of spatial axes (2 or 3)")
    in_channels: int = _f(1, "image channels", ge=1)
    out_channels: int = _f(1, "reconstructed channels", ge=1)
    num_channels: IntList = _f((32, 64, 64), "channels of each level (levels = len(num_channels))", ge=1)
    downsample_factors: Optional[Tuple[Factor, ...]] = _f(
        None, "one per downsampling level (len(num_channels)-1): int or one int per axis; null = 2 per level", ge=1
    )
    upsample_factors: Optional[Tuple[Factor, ...]] = _f(
        None, "decoder factors, latent first; null = downsample_factors reversed", ge=1
    )
    initial_downsample_factor: Factor = _f(
        1, "extra resampling at the encoder's input and the decoder's output: int or one int per axis; a patchify "
           "convolution (kernel = stride = factor, no voxel skipped); total factor = this * prod(downsample_factors)",
        ge=1,
    )
    use_conv_downsample: bool = _f(True, "levels downsample with strided convolutions; false = average pooling "
                                         "(kernel = stride = factor, no parameters)")
    latent_channels: int = _f(3, "channels of the latent", ge=1)
    num_res_blocks: Union[int, IntList] = _f(1, "residual blocks per level: int or one per level", ge=1)
    norm_num_groups: int = _f(32, "GroupNorm groups; every num_channels entry must be divisible by it", ge=1)
    attention_levels: Tuple[bool, ...] = _f((False, False, False), "attention at each level (one per level)")
    with_encoder_nonlocal_attn: bool = _f(True, "attention block at the end of the encoder")
    with_decoder_nonlocal_attn: bool = _f(True, "attention block at the start of the decoder")
    use_flash_attention: bool = _f(False, "attention via torch scaled_dot_product_attention (less memory)")
    use_convtranspose: bool = _f(False, "decoder upsamples with transposed convolutions instead of interpolation")
    tile_size: Optional[IntList] = _f(
        None, "encode and decode outside training in exact tiles of this many voxels per axis (each a multiple of the "
              "total downsample factor): stage 2's encoding and latent cache, evaluate's reconstructions, whole-volume "
              "validation and sampling (unless sampling.tile_size is set). Same result as whole volumes, memory "
              "bounded by the tile; KL only; null = whole volumes", ge=1
    )
    vqvae: VQVAESettings = _section(VQVAESettings, "VQ-VAE network (type vq only)")
    training: AutoencoderTrainingSettings = _section(AutoencoderTrainingSettings, "stage 1 training")
    checkpoints: CheckpointSettings = _section(CheckpointSettings, "stage 1 checkpoints")
    logging: LoggingSettings = _section(LoggingSettings, "stage 1 logging")


@dataclass(frozen=True)
class SchedulerSettings:
    """The training objective: DDPM (MONAI DDPMScheduler; DDIM samples it too) or rectified flow (MONAI
    RFlowScheduler: velocity prediction, few sampling steps)."""

    type: Literal["ddpm", "rflow"] = _f(
        "ddpm", "ddpm (noise schedule + prediction_type) | rflow (rectified flow; schedule, betas and "
                "prediction_type unused)"
    )
    num_train_timesteps: int = _f(1000, "diffusion timesteps during training", ge=1)
    sample_method: Literal["uniform", "logit-normal"] = _f(
        "uniform", "rflow: how training timesteps are drawn (logit-normal favours the middle)"
    )
    use_timestep_transform: bool = _f(
        True, "rflow: shift timesteps by the latent's size relative to 32 voxels per axis (as MAISI does)"
    )
    schedule: Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"] = _f(
        "scaled_linear_beta", "beta schedule"
    )
    beta_start: float = _f(0.0015, "first beta", gt=0, le=1)
    beta_end: float = _f(0.0195, "last beta", gt=0, le=1)
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = _f("epsilon", "what the UNet predicts")


@dataclass(frozen=True)
class DiffusionTrainingSettings:
    """Stage 2 (latent diffusion) training."""

    n_epochs: int = _f(100, "number of epochs", ge=1)
    batch_size: int = _f(1, "volumes per batch", ge=1)
    learning_rate: float = _f(1.0e-4, "UNet learning rate", gt=0)
    val_interval: int = _f(1, "validate every N epochs", ge=1)
    save_interval: int = _f(1, "save a checkpoint every N epochs", ge=1)
    generate_samples_interval: int = _f(10, "generate and log samples every N epochs", ge=1)
    num_samples_to_generate: int = _f(1, "samples generated each time", ge=0)
    fast_dev_run: bool = _f(False, "run a few batches of every step, then stop; writes no checkpoints or logs")
    fast_dev_run_batches: int = _f(2, "batches per step in fast_dev_run", ge=1)
    on_nonfinite: Literal["stop", "skip"] = _f(
        "stop", "a non-finite loss on any process: stop (every process, keeping the last good checkpoint) | skip "
                "(drop the step's gradients and go on)"
    )
    max_consecutive_skips: int = _f(10, "with on_nonfinite: skip, stop after this many non-finite batches in a row",
                                    ge=1)
    gradient_accumulation_steps: int = _f(1, "batches per optimizer step", ge=1)
    grad_clip_norm: Optional[float] = _f(None, "clip gradient norm to this value; null = no clipping", gt=0)
    lr_warmup_steps: int = _f(0, "optimizer steps of linear learning-rate warm-up from 0", ge=0)
    lr_schedule: Literal["constant", "cosine"] = _f("constant", "learning rate after warm-up: constant | cosine decay")
    ema_decay: Optional[float] = _f(None, "EMA of UNet weights (e.g. 0.999), used for sampling; null = off", gt=0, le=1)
    latent_sampling: Literal["sample", "mean"] = _f(
        "sample", "latent drawn from the encoder: sample (mu + sigma * noise) | mean (mu, deterministic)"
    )
    cache_latents: bool = _f(False, "encode the training set once and train on the stored latents (no augmentation; "
                                    "latent space only)")
    input_noise: CorruptionSettings = _section(
        CorruptionSettings, "corrupt training volumes before they are encoded (not with cache_latents)"
    )
    scale_factor_batches: int = _f(4, "batches used to estimate the latent scale factor 1/std", ge=1)


@dataclass(frozen=True)
class ConditioningSettings:
    """Optional per-volume conditions read from the datalist entries (unconditioned when both are unset)."""

    class_key: Optional[str] = _f(None, "datalist key of a categorical label (ints 0..num_classes-1) -> class embedding")
    num_classes: Optional[int] = _f(None, "number of classes of class_key", ge=1)
    covariate_keys: Tuple[str, ...] = _f((), "datalist keys of continuous covariates (e.g. age) -> cross-attention")
    dropout: float = _f(0.1, "probability of dropping the condition in training (classifier-free guidance)", ge=0, le=1)


@dataclass(frozen=True)
class DiffusionSettings:
    """Stage 2: diffusion UNet (MONAI DiffusionModelUNet) on the autoencoder's latents or, with ``space: pixel``, on
    the images themselves, and its training."""

    space: Literal["latent", "pixel"] = _f(
        "latent", "latent (the UNet works on a stage-1 autoencoder's latents) | pixel (on the images directly: no "
                  "autoencoder; autoencoder.spatial_dims and in_channels still state the images' axes and channels)"
    )
    spatial_dims: int = _f(3, "number of spatial axes; must equal autoencoder.spatial_dims")
    in_channels: int = _f(3, "must equal autoencoder.latent_channels (space pixel: autoencoder.in_channels)", ge=1)
    out_channels: int = _f(3, "must equal autoencoder.latent_channels (space pixel: autoencoder.in_channels)", ge=1)
    num_channels: IntList = _f((64, 128, 128), "channels of each level", ge=1)
    attention_levels: Tuple[bool, ...] = _f((False, True, True), "attention at each level (one per level)")
    num_head_channels: Union[int, IntList] = _f(
        (0, 32, 32), "channels per attention head: int or one per level (ignored where attention is off)", ge=0
    )
    num_res_blocks: Union[int, IntList] = _f(1, "residual blocks per level: int or one per level", ge=1)
    norm_num_groups: int = _f(32, "GroupNorm groups; every num_channels entry must be divisible by it", ge=1)
    use_flash_attention: bool = _f(False, "attention via torch scaled_dot_product_attention (less memory)")
    condition_channels: Optional[int] = _f(
        None, "condition on the volume's 2D sum-projection along projection_axis (3D only): its channels, = the "
              "image channels; null = no projection conditioning. A config that sets it but neither diffusion.space "
              "nor an autoencoder_path is the seed's conditional config: space pixel, norm_num_groups 8 unless given",
        ge=1,
    )
    condition_embed_dim: int = _f(8, "size of the projection's context tokens (the UNet's cross_attention_dim)", ge=1)
    projection_axis: int = _f(2, "volume axis the condition is summed along (0, 1 or 2, an axis of voxel_size)", ge=0)
    condition_encoder_channels: IntList = _f(
        (16, 32, 64), "channels of the projection encoder's stride-2 convolutions (one halving each); tokens = the "
                      "last feature map's pixels", ge=1,
    )
    condition_concat: bool = _f(
        True, "also give the UNet the projection itself, spread along projection_axis (averaged down to the latent "
              "grid in latent space), as extra input channels: every voxel sees its own column's projection value. "
              "false = cross-attention tokens only (the seed's network)"
    )
    scheduler: SchedulerSettings = _section(SchedulerSettings, "noise scheduler")
    conditioning: ConditioningSettings = _section(ConditioningSettings, "optional class / covariate conditioning")
    training: DiffusionTrainingSettings = _section(DiffusionTrainingSettings, "stage 2 training")
    checkpoints: DiffusionCheckpointSettings = _section(DiffusionCheckpointSettings, "stage 2 checkpoints")
    logging: DiffusionLoggingSettings = _section(DiffusionLoggingSettings, "stage 2 logging")


@dataclass(frozen=True)
class PointCloudSettings:
    """Point-cloud export of samples (``sampling.save_format`` pointcloud or both; see docs/pointclouds.md)."""

    num_points: int = _f(100000, "points per sample (always exactly this many rows, unless no voxel is above "
                                 "threshold: then an empty file and a warning)", ge=1)
    threshold: float = _f(0.1, "voxels with intensity above this are candidates", ge=0)
    method: Literal["probabilistic", "center", "random", "weighted"] = _f(
        "probabilistic", "probabilistic (P ~ intensity - threshold, sub-voxel jitter) | center (P ~ intensity, voxel "
                         "centres) | random (uniform over candidates, jitter) | weighted (P ~ intensity, jitter)"
    )
    unit: Literal["mm", "um", "nm"] = _f("mm", "unit of the coordinates written (the affine is in mm)")
    ply: bool = _f(False, "also write a binary PLY of the same points")


@dataclass(frozen=True)
class SamplingSettings:
    """Generating new volumes from a trained diffusion model."""

    num_inference_steps: int = _f(50, "denoising steps (<= diffusion.scheduler.num_train_timesteps)", ge=1)
    num_samples: int = _f(4, "volumes to generate", ge=1)
    batch_size: int = _f(1, "volumes generated at once", ge=1)
    output_dir: str = _f("samples", "folder the samples are written to")
    save_format: Literal["auto", "nifti", "npy", "png", "pointcloud", "both"] = _f(
        "auto", "auto (png for 2D, nifti for 3D) | nifti (.nii.gz) | npy | png (2D only, 8-bit) | pointcloud "
                "(CSV of sampling.pointcloud points, 2D: x,y) | both (nifti + pointcloud)"
    )
    seed: Optional[int] = _f(None, "sampling seed; null = use the top-level seed", ge=0)
    checkpoint: Optional[str] = _f(None, "stage 2 checkpoint; null = <diffusion.checkpoints.output_dir>/best_model.pt")
    scheduler: Literal["auto", "ddim", "ddpm", "rflow"] = _f(
        "auto", "sampler: auto (ddim for ddpm-trained, rflow for rflow-trained models) | ddim (num_inference_steps) "
                "| ddpm (all training steps) | rflow (num_inference_steps)"
    )
    use_ema: bool = _f(True, "sample with the EMA weights when the checkpoint has them")
    guidance_scale: float = _f(1.0, "classifier-free guidance scale (1 = plain conditional sampling)", ge=0)
    class_label: Optional[int] = _f(None, "class to generate (conditioned models); null = sample classes uniformly", ge=0)
    covariates: Optional[Tuple[float, ...]] = _f(None, "covariate values in diffusion.conditioning.covariate_keys order")
    save_png: bool = _f(True, "also write a PNG of three orthogonal mid-slices per sample")
    clip: bool = _f(True, "clip decoded samples to [0, 1], the range the data is scaled to; false = raw decoder output")
    tile_size: Optional[IntList] = _f(
        None, "decode the latent in exact tiles of this many voxels per axis (each a multiple of the total downsample "
              "factor): the same samples as whole-volume decoding, memory bounded by the tile; null = "
              "autoencoder.tile_size (null: whole volumes)", ge=1
    )
    pointcloud: PointCloudSettings = _section(PointCloudSettings, "point-cloud export (save_format pointcloud | both)")


@dataclass(frozen=True)
class DeviceSettings:
    """Where and in which precision to run."""

    use_cuda: bool = _f(True, "use a CUDA GPU when one is available (falls back to CPU)")
    gpu_id: int = _f(0, "CUDA device index", ge=0)
    mixed_precision: Union[bool, Literal["fp16", "bf16"]] = _f(
        False, "true | false | fp16 | bf16; true = fp16 on CUDA, bf16 on CPU (see engine.resolve_precision)"
    )


@dataclass(frozen=True)
class Settings:
    """All settings of the application; build with :func:`load_settings` or :func:`settings_from_dict`."""

    data: DataSettings = _section(DataSettings, "data sources and preprocessing")
    autoencoder: AutoencoderSettings = _section(AutoencoderSettings, "stage 1: autoencoder")
    diffusion: DiffusionSettings = _section(DiffusionSettings, "stage 2: latent diffusion")
    sampling: SamplingSettings = _section(SamplingSettings, "sample generation")
    device: DeviceSettings = _section(DeviceSettings, "device and precision")
    seed: Optional[int] = _f(42, "global random seed; null = not seeded", ge=0)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (lists, not tuples), safe for ``yaml.safe_dump``; inverse of settings_from_dict."""
        return _to_plain(self)

    def to_yaml(self) -> str:
        """The settings as YAML text (loads back to equal settings)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


# --------------------------------------------------------------------------------------------------------------------
# conversion of plain values to typed settings
# --------------------------------------------------------------------------------------------------------------------

_NONE = type(None)
_FLOAT_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML, with its YAML type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (boolean)"
    kind = {int: "integer", float: "float", str: "string", list: "list", tuple: "list", dict: "mapping"}.get(
        type(value), type(value).__name__
    )
    shown = repr(value) if not isinstance(value, (list, tuple, dict)) else _short(value)
    return f"{shown} ({kind})"


def _short(value: Any, limit: int = 60) -> str:
    text = yaml.safe_dump(_to_plain(value), default_flow_style=True).strip()
    if text.endswith("\n..."):
        text = text[:-4].strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(tp: Any, plural: bool = False) -> str:
    """Human description of an expected type."""
    origin = get_origin(tp)
    if tp is bool:
        return "true/false values" if plural else "true or false"
    if tp is int:
        return "integers" if plural else "an integer"
    if tp is float:
        return "numbers" if plural else "a number"
    if tp is str:
        return "strings" if plural else "a string"
    if dataclasses.is_dataclass(tp):
        return "sections" if plural else "a section (a mapping of keys)"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (tuple, Tuple):
        inner = get_args(tp)[0]
        if get_origin(inner) is Union:
            return f"a list whose entries are each {_describe(inner)}"
        return f"a list of {_describe(inner, plural=True)}"
    if origin is Union:
        args = [a for a in get_args(tp) if a is not _NONE]
        text = " or ".join(_describe(a, plural) for a in args)
        return text + (" or null" if _NONE in get_args(tp) else "")
    return str(tp)


def _path(parent: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return "valid keys: " + ", ".join(choices)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a plain YAML value to ``tp`` or raise _Problem naming ``key``."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Union:
        args = get_args(tp)
        if value is None:
            if _NONE in args:
                return None
            raise _Problem(key, f"expected {_describe(tp)}, got null")
        options = [a for a in args if a is not _NONE]
        # pick the branch that has the value's shape so that errors point inside it
        if isinstance(value, (list, tuple)):
            shaped = [a for a in options if get_origin(a) in (tuple, Tuple)]
        elif isinstance(value, Mapping):
            shaped = [a for a in options if dataclasses.is_dataclass(a)]
        else:
            shaped = [a for a in options if get_origin(a) not in (tuple, Tuple) and not dataclasses.is_dataclass(a)]
        if len(shaped) == 1:
            try:
                return _convert(value, shaped[0], key)
            except _Problem as p:
                if p.key != key or len(options) == 1:
                    raise
                raise _Problem(key, f"expected {_describe(tp)}, got {_show(value)}") from None
        for option in shaped:
            try:
                return _convert(value, option, key)
            except _Problem:
                continue
        raise _Problem(key, f"expected {_describe(tp)}, got {_show(value)}")
    if value is None:
        raise _Problem(key, f"expected {_describe(tp)}, got null")
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise _Problem(key, f"expected {_describe(tp)}, got {_show(value)}")
        inner = get_args(tp)[0]
        return tuple(_convert(v, inner, _path(key, i)) for i, v in enumerate(value))
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, str):
            for choice in choices:
                if isinstance(choice, str) and value.lower() == choice:
                    return choice
        hint = difflib.get_close_matches(str(value).lower(), [c for c in choices if isinstance(c, str)], n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise _Problem(key, f"expected {_describe(tp)}, got {_show(value)}{extra}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Problem(key, f"expected true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        extra = ""
        if isinstance(value, float) and value.is_integer():
            extra = f"; write {int(value)}"
        elif isinstance(value, bool):
            extra = " (YAML true/false are booleans, not numbers)"
        raise _Problem(key, f"expected an integer, got {_show(value)}{extra}")
    if tp is float:
        if isinstance(value, bool):
            raise _Problem(key, f"expected a number, got {_show(value)}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            # YAML 1.1 reads 1e-4 (no dot) as a string: accept it as the number it obviously is
            return float(value)
        raise _Problem(key, f"expected a number (e.g. 1.0e-4), got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Problem(key, f"expected a string, got {_show(value)} (quote it in YAML if it should be text)")
    raise TypeError(f"unsupported settings type {tp!r} at {key}")  # pragma: no cover - schema bug


def _check_bounds(value: Any, meta: Mapping[str, Any], key: str) -> None:
    """Apply ge/gt/le bounds to a number, or to every number inside nested lists."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, tuple):
        for i, v in enumerate(value):
            _check_bounds(v, meta, _path(key, i))
        return
    if not isinstance(value, (int, float)):
        return
    ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
    if ge is not None and value < ge:
        raise _Problem(key, f"must be >= {_num(ge)}, got {_num(value)}")
    if gt is not None and not value > gt:
        raise _Problem(key, f"must be > {_num(gt)}, got {_num(value)}")
    if le is not None and value > le:
        span = f" (between {_num(ge if ge is not None else gt)} and {_num(le)})" if (ge, gt) != (None, None) else ""
        raise _Problem(key, f"must be <= {_num(le)}{span}, got {_num(value)}")


def _num(x: Any) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def _build(cls: type, raw: Any, key: str, problems: list[tuple[str, str]] | None = None) -> Any:
    """Build dataclass ``cls`` from a mapping; problems of fields are appended to ``problems`` (or raised)."""
    own = problems is None
    problems = [] if own else problems
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        p = _Problem(key or "<top level>", f"expected a section (a mapping of keys), got {_show(raw)}")
        if own:
            raise p
        problems.append((p.key, p.message))
        return cls()
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name in raw:
        if name not in names:
            problems.append((_path(key, name), f"unknown key; {_suggest(name, names)}"))
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        sub = _path(key, f.name)
        tp = hints[f.name]
        try:
            if dataclasses.is_dataclass(tp):
                kwargs[f.name] = _build(tp, raw[f.name], sub, problems)
            else:
                value = _convert(raw[f.name], tp, sub)
                _check_bounds(value, f.metadata, sub)
                kwargs[f.name] = value
        except _Problem as p:
            problems.append((p.key, p.message))
    if own and problems:
        raise _Problem(*problems[0])
    return cls(**kwargs)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------------------------------
# cross-field checks
# --------------------------------------------------------------------------------------------------------------------


def _per_axis_factors(
    factors: Optional[Tuple[Factor, ...]], levels: int, spatial_dims: int, key: str, problems: list[tuple[str, str]]
) -> Optional[list[tuple[int, ...]]]:
    """Expand factors to one tuple per level; report shape problems; None when they cannot be expanded."""
    if factors is None:
        return [(2,) * spatial_dims for _ in range(levels)]
    ok = True
    if len(factors) != levels:
        problems.append(
            (key, f"expected len(num_channels) - 1 = {levels} entries (one per resampling level), "
                  f"got {len(factors)}: {_short(factors)}")
        )
        ok = False
    out = []
    for i, f in enumerate(factors):
        if isinstance(f, int):
            out.append((f,) * spatial_dims)
        elif len(f) != spatial_dims:
            problems.append(
                (_path(key, i), f"expected an integer or a list of spatial_dims = {spatial_dims} integers "
                                f"(one per axis), got {len(f)}: {_short(f)}")
            )
            ok = False
        else:
            out.append(tuple(f))
    return out if ok else None


def _prod(factors: Sequence[Sequence[int]], spatial_dims: int) -> tuple[int, ...]:
    return tuple(math.prod(level[a] for level in factors) for a in range(spatial_dims))


def _nearest_multiples(size: int, factor: int) -> str:
    lo, hi = (size // factor) * factor, (size // factor + 1) * factor
    return f"{hi}" if lo < 1 else f"{lo} and {hi}"


def _check_unet_lists(
    prefix: str, num_channels: Sequence[int], attention_levels: Sequence[bool], num_res_blocks: Any,
    norm_num_groups: int, problems: list[tuple[str, str]],
) -> None:
    levels = len(num_channels)
    if levels == 0:
        problems.append((f"{prefix}.num_channels", "expected at least one level, got an empty list"))
        return
    if len(attention_levels) != levels:
        problems.append(
            (f"{prefix}.attention_levels", f"expected one entry per level of num_channels ({levels}), "
                                           f"got {len(attention_levels)}: {_short(attention_levels)}")
        )
    if isinstance(num_res_blocks, tuple) and len(num_res_blocks) != levels:
        problems.append(
            (f"{prefix}.num_res_blocks", f"expected an integer or one entry per level of num_channels ({levels}), "
                                         f"got {len(num_res_blocks)}: {_short(num_res_blocks)}")
        )
    bad = [c for c in num_channels if c % norm_num_groups]
    if bad:
        # the largest group count <= the requested one that divides every level's channels
        fit = max(g for g in range(1, norm_num_groups + 1) if all(c % g == 0 for c in num_channels))
        problems.append(
            (f"{prefix}.num_channels", f"every entry must be divisible by {prefix}.norm_num_groups "
                                       f"({norm_num_groups}); {_short(bad)} are not: "
                                       f"--set {prefix}.norm_num_groups={fit} (or change the channels)")
        )


def _check_autoencoder(s: Settings, problems: list[tuple[str, str]]) -> Optional[tuple[int, ...]]:
    """Autoencoder checks; returns the total downsample factor per axis when it is well defined."""
    ae = s.autoencoder
    if ae.spatial_dims not in (2, 3):
        problems.append(("autoencoder.spatial_dims", f"expected 2 or 3, got {ae.spatial_dims}"))
        return None
    if ae.type == "vq":
        return _check_vqvae(ae, problems)
    _check_unet_lists("autoencoder", ae.num_channels, ae.attention_levels, ae.num_res_blocks, ae.norm_num_groups,
                      problems)
    levels = len(ae.num_channels) - 1
    if levels < 0:
        return None
    down = _per_axis_factors(ae.downsample_factors, levels, ae.spatial_dims, "autoencoder.downsample_factors",
                             problems)
    if ae.upsample_factors is not None:
        up = _per_axis_factors(ae.upsample_factors, levels, ae.spatial_dims, "autoencoder.upsample_factors",
                               problems)
        if up is not None and down is not None and _prod(up, ae.spatial_dims) != _prod(down, ae.spatial_dims):
            problems.append(
                ("autoencoder.upsample_factors",
                 f"multiply to {list(_prod(up, ae.spatial_dims))} per axis but autoencoder.downsample_factors "
                 f"multiply to {list(_prod(down, ae.spatial_dims))}; the decoder must restore the input size")
            )
    initial = ae.initial_downsample_factor
    if not isinstance(initial, int) and len(initial) != ae.spatial_dims:
        problems.append(
            ("autoencoder.initial_downsample_factor",
             f"expected an integer or a list of spatial_dims = {ae.spatial_dims} integers (one per axis), "
             f"got {len(initial)}: {_short(initial)}")
        )
        return None
    return None if down is None else _prod([initial_downsample_factor(ae), *down], ae.spatial_dims)


def vq_sampling_parameters(vq: VQVAESettings) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """The VQ-VAE's downsample and upsample parameters, one tuple per level (the defaults filled in)."""
    levels = len(vq.num_channels)
    down = [(2, 4, 1, 1)] * levels if vq.downsample_parameters is None else [tuple(p) for p in vq.downsample_parameters]
    up = [(2, 4, 1, 1, 0)] * levels if vq.upsample_parameters is None else [tuple(p) for p in vq.upsample_parameters]
    return down, up


def _check_vq_parameters(params: Sequence[Sequence[int]], levels: int, key: str, up: bool,
                         problems: list[tuple[str, str]]) -> bool:
    """Shape of ``autoencoder.vqvae.{down,up}sample_parameters`` and, per level, whether the (transposed)
    convolution changes the size by exactly its stride; True when every entry is usable."""
    names = "[stride, kernel, dilation, padding, output_padding]" if up else "[stride, kernel, dilation, padding]"
    width = 5 if up else 4
    if len(params) != levels:
        problems.append((key, f"expected len(autoencoder.vqvae.num_channels) = {levels} entries (every VQ-VAE level "
                              f"resamples once), got {len(params)}: {_short(params)}"))
        return False
    ok = True
    for i, p in enumerate(params):
        where = _path(key, i)
        if len(p) != width:
            problems.append((where, f"expected {width} integers {names}, got {len(p)}: {_short(p)}"))
            ok = False
            continue
        stride, kernel, dilation, padding = p[:4]
        if min(stride, kernel, dilation) < 1:
            problems.append((where, f"stride, kernel and dilation must be >= 1, got {_short(p)}"))
            ok = False
            continue
        reach = dilation * (kernel - 1) + 1  # voxels one kernel application covers
        if not up:
            # exact n -> n / stride for every n divisible by stride needs 2 * padding = reach - stride
            if (reach - stride) % 2 or reach < stride:
                problems.append((where, f"a kernel reaching {reach} voxels (kernel {kernel}, dilation {dilation}) "
                                        f"cannot shrink a size by exactly the stride {stride}: choose kernel and "
                                        f"stride with dilation*(kernel-1)+1-stride even and >= 0, e.g. "
                                        f"[{stride}, {2 * stride}, 1, {stride // 2}] for an even stride"))
                ok = False
            elif 2 * padding != reach - stride:
                fixed = [stride, kernel, dilation, (reach - stride) // 2]
                problems.append((where, f"padding {padding} makes this level shrink a size by other than the stride "
                                        f"{stride}; use padding {fixed[3]}: {_short(fixed)}"))
                ok = False
        else:
            # a transposed convolution gives (n - 1) * stride - 2 * padding + reach + output_padding: n * stride needs
            out_pad = stride + 2 * padding - reach
            if p[4] != out_pad:
                if 0 <= out_pad < max(stride, dilation):
                    fix = f"use output_padding {out_pad}: {_short([*p[:4], out_pad])}"
                else:
                    fix = f"use padding {max(0, (reach - stride) // 2)} and output_padding {(reach - stride) % 2}"
                problems.append((where, f"this level does not enlarge a size by exactly the stride {stride} "
                                        f"(output_padding {p[4]}); {fix}"))
                ok = False
    return ok


def _check_vqvae(ae: AutoencoderSettings, problems: list[tuple[str, str]]) -> Optional[tuple[int, ...]]:
    """VQ-VAE checks (``autoencoder.type: vq``); returns the total downsample factor per axis when well defined."""
    vq, key = ae.vqvae, "autoencoder.vqvae"
    levels = len(vq.num_channels)
    if levels == 0:
        problems.append((f"{key}.num_channels", "expected at least one level, got an empty list"))
        return None
    if isinstance(vq.num_res_channels, tuple) and len(vq.num_res_channels) != levels:
        problems.append((f"{key}.num_res_channels", f"expected an integer or one entry per level of num_channels "
                                                    f"({levels}), got {len(vq.num_res_channels)}: "
                                                    f"{_short(vq.num_res_channels)}"))
    down, up = vq_sampling_parameters(vq)
    ok = _check_vq_parameters(down, levels, f"{key}.downsample_parameters", False, problems)
    ok = _check_vq_parameters(up, levels, f"{key}.upsample_parameters", True, problems) and ok
    if not ok:
        return None
    total_down, total_up = math.prod(p[0] for p in down), math.prod(p[0] for p in up)
    if total_down != total_up:
        problems.append((f"{key}.upsample_parameters",
                         f"strides multiply to {total_up} but downsample_parameters' strides multiply to "
                         f"{total_down}; the decoder must restore the input size"))
        return None
    return (total_down,) * ae.spatial_dims


def _check_data_shape(s: Settings, total: Optional[tuple[int, ...]], problems: list[tuple[str, str]]) -> None:
    _check_data_section(s.data, s.autoencoder.spatial_dims, total, problems)


def _check_divisible(key: str, sizes: Sequence[int], total: Sequence[int], problems: list[tuple[str, str]]) -> None:
    """One problem per axis of ``sizes`` (the key's value) that the autoencoder's total factor does not divide."""
    for axis, (size, factor) in enumerate(zip(sizes, total)):
        if size % factor:
            problems.append(
                (key, f"axis {axis}: {size} is not divisible by {factor} (the autoencoder's total downsample factor "
                      f"on that axis: initial_downsample_factor x the product of downsample_factors); nearest valid "
                      f"sizes are {_nearest_multiples(size, factor)}")
            )


def _check_data_section(d: DataSettings, dims: int, total: Optional[tuple[int, ...]],
                        problems: list[tuple[str, str]]) -> None:
    if len(d.voxel_size) != dims:
        problems.append(
            ("data.voxel_size", f"expected autoencoder.spatial_dims = {dims} entries (one per axis), "
                                f"got {len(d.voxel_size)}: {_short(d.voxel_size)}")
        )
    elif total is not None:
        _check_divisible("data.voxel_size", d.voxel_size, total, problems)
    if d.spacing is not None and len(d.spacing) != dims:
        problems.append(
            ("data.spacing", f"expected autoencoder.spatial_dims = {dims} entries (mm per axis) or null, "
                             f"got {len(d.spacing)}: {_short(d.spacing)}")
        )
    if d.orientation is not None:
        code = d.orientation.upper()
        pairs = [set("LR"), set("AP"), set("SI")]
        used = [next((i for i, p in enumerate(pairs) if c in p), None) for c in code]
        # 2D takes two letters, or three of which the first two are used (so the default RAS serves both)
        if len(code) not in ((2, 3) if dims == 2 else (3,)) or None in used or len(set(used)) != len(used):
            problems.append(
                ("data.orientation", f"expected {dims} axis codes" + (" (or 3, of which the first 2 are used)"
                                                                      if dims == 2 else "")
                 + f", one from each of L/R, A/P, S/I (e.g. {'RAS'[:dims]!r}), got {d.orientation!r}")
            )
    if d.intensity.lower_percentile >= d.intensity.upper_percentile:
        problems.append(
            ("data.intensity.lower_percentile", f"must be below data.intensity.upper_percentile "
                                                f"({_num(d.intensity.upper_percentile)}), "
                                                f"got {_num(d.intensity.lower_percentile)}")
        )
    rng = d.intensity.range
    if rng is not None:
        if len(rng) != 2:
            problems.append(("data.intensity.range", f"expected [min, max] (2 numbers) or null, got {len(rng)}: "
                                                     f"{_short(rng)}"))
        elif not rng[0] < rng[1]:
            problems.append(("data.intensity.range", f"min must be below max, got [{_num(rng[0])}, {_num(rng[1])}]"))
    if d.voxel_resize is not None:
        if len(d.voxel_resize) != dims:
            problems.append(
                ("data.voxel_resize", f"expected an integer or autoencoder.spatial_dims = {dims} entries (one per "
                                      f"axis) or null, got {len(d.voxel_resize)}: {_short(d.voxel_resize)}")
            )
        elif len(d.voxel_size) == dims:
            small = [a for a in range(dims) if d.voxel_resize[a] < d.voxel_size[a]]
            if small:
                problems.append(
                    ("data.voxel_resize",
                     f"{_short(d.voxel_resize)} is smaller than data.voxel_size {_short(d.voxel_size)} on "
                     f"{'axes' if len(small) > 1 else 'axis'} {', '.join(map(str, small))}: the crop to voxel_size would pad there; make voxel_resize at "
                     "least voxel_size on every axis, or set it to null")
                )
    aug = d.augmentation
    if aug.enabled and aug.random_rotate_prob > 0 and len(d.voxel_size) >= 2 and d.voxel_size[0] != d.voxel_size[1]:
        problems.append(
            ("data.augmentation.random_rotate_prob",
             f"is {_num(aug.random_rotate_prob)}: 90-degree turns in the plane of the first two axes swap them, but "
             f"data.voxel_size {_short(d.voxel_size)} differs on them, so the shape would change; make "
             "data.voxel_size[0] == data.voxel_size[1] or set random_rotate_prob to 0")
        )


def _check_diffusion(s: Settings, total: Optional[tuple[int, ...]], problems: list[tuple[str, str]]) -> None:
    ae, df = s.autoencoder, s.diffusion
    if df.spatial_dims != ae.spatial_dims:
        problems.append(
            ("diffusion.spatial_dims",
             f"must equal autoencoder.spatial_dims ({ae.spatial_dims}), got {df.spatial_dims}"
             + (" (in pixel space autoencoder.spatial_dims still states the images' axes: set both)"
                if df.space == "pixel" else ""))
        )
    _check_unet_lists("diffusion", df.num_channels, df.attention_levels, df.num_res_blocks, df.norm_num_groups,
                      problems)
    levels = len(df.num_channels)
    heads = df.num_head_channels
    if isinstance(heads, tuple) and len(heads) != levels:
        problems.append(
            ("diffusion.num_head_channels", f"expected an integer or one entry per level of num_channels ({levels}), "
                                            f"got {len(heads)}: {_short(heads)}")
        )
    elif levels and len(df.attention_levels) == levels:
        per_level = heads if isinstance(heads, tuple) else (heads,) * levels
        # the middle block always has attention with the last level's head size
        needs = [i for i in range(levels) if df.attention_levels[i] or i == levels - 1]
        for i in needs:
            key = f"diffusion.num_head_channels[{i}]" if isinstance(heads, tuple) else "diffusion.num_head_channels"
            h, c = per_level[i], df.num_channels[i]
            why = "attention is on at this level" if df.attention_levels[i] else "the middle block always has attention"
            if h < 1:
                problems.append((key, f"must be >= 1 because {why}, got {h}"))
            elif c % h:
                problems.append((key, f"must divide diffusion.num_channels[{i}] ({c}) because {why}, got {h}"))
    if df.space == "pixel":
        if len(s.data.voxel_size) == ae.spatial_dims:
            problems += unet_fit_problems(df, ae.in_channels, ae.spatial_dims, s.data.voxel_size,
                                          (1,) * ae.spatial_dims, space="pixel")
        if df.training.cache_latents:
            problems.append(("diffusion.training.cache_latents",
                             "is true, but diffusion.space is pixel: there is no autoencoder, so no latents to cache "
                             "(the images themselves are cached by data.cache_rate); "
                             "--set diffusion.training.cache_latents=false"))
    elif (total is not None and len(s.data.voxel_size) == ae.spatial_dims
            and all(v % t == 0 for v, t in zip(s.data.voxel_size, total))):
        problems += unet_fit_problems(df, latent_channels_of(ae), ae.spatial_dims, s.data.voxel_size, total,
                                      latent_key=latent_channels_key(ae))
    cond = df.conditioning
    if (cond.class_key is None) != (cond.num_classes is None):
        problems.append(
            ("diffusion.conditioning.num_classes",
             "class_key and num_classes must be given together (a categorical condition needs both)")
        )
    if (cond.class_key is not None or cond.covariate_keys) and s.data.datalist is None:
        problems.append(
            ("diffusion.conditioning", "conditions are read from datalist entries: set data.datalist")
        )
    if cond.covariate_keys and not any(df.attention_levels):
        problems.append(
            ("diffusion.attention_levels",
             "covariate conditioning uses cross-attention: switch attention on at one level at least")
        )
    _check_projection_conditioning(s, problems)
    if s.sampling.covariates is not None and len(s.sampling.covariates) != len(cond.covariate_keys):
        problems.append(
            ("sampling.covariates",
             f"expected one value per diffusion.conditioning.covariate_keys {list(cond.covariate_keys)}, "
             f"got {list(s.sampling.covariates)}")
        )
    if (s.sampling.class_label is not None and cond.num_classes is not None
            and s.sampling.class_label >= cond.num_classes):
        problems.append(
            ("sampling.class_label", f"must be < diffusion.conditioning.num_classes ({cond.num_classes}), "
                                     f"got {s.sampling.class_label}")
        )
    if s.sampling.save_format == "png" and ae.spatial_dims != 2:
        problems.append(("sampling.save_format", f"png holds 2D images, but autoencoder.spatial_dims is "
                                                 f"{ae.spatial_dims}; use nifti or npy (or auto)"))
    if s.sampling.save_format in ("pointcloud", "both") and ae.out_channels != 1:
        problems.append(("sampling.save_format", f"{s.sampling.save_format} exports single-channel samples, but "
                                                 f"autoencoder.out_channels is {ae.out_channels}; use nifti or npy"))
    sch = df.scheduler
    from .sampling import SAMPLERS

    if s.sampling.scheduler != "auto" and s.sampling.scheduler not in SAMPLERS[sch.type]:
        problems.append(
            ("sampling.scheduler", f"{s.sampling.scheduler} cannot sample a model trained with "
                                   f"diffusion.scheduler.type={sch.type}; use one of "
                                   f"{', '.join(('auto',) + SAMPLERS[sch.type])}")
        )
    if sch.beta_start >= sch.beta_end:
        problems.append(
            ("diffusion.scheduler.beta_start",
             f"must be below diffusion.scheduler.beta_end ({sch.beta_end}), got {sch.beta_start}")
        )
    if s.sampling.num_inference_steps > sch.num_train_timesteps:
        problems.append(
            ("sampling.num_inference_steps",
             f"must be <= diffusion.scheduler.num_train_timesteps ({sch.num_train_timesteps}), "
             f"got {s.sampling.num_inference_steps}")
        )


def _check_tile_size(key: str, tile: Optional[Sequence[int]], s: Settings, total: Optional[tuple[int, ...]],
                     problems: list[tuple[str, str]]) -> None:
    """``autoencoder.tile_size`` / ``sampling.tile_size``: exact tiling exists for the KL autoencoder's encoder and
    decoder; one size per spatial axis, each a multiple of that axis's total factor."""
    if tile is None:
        return
    ae = s.autoencoder
    if key == "sampling.tile_size" and s.diffusion.space == "pixel":
        problems.append((key, "tiles the autoencoder's decoding, but diffusion.space is pixel (no decoder); set "
                              f"{key}=null"))
    elif ae.type == "vq":
        problems.append((key, f"exact tiled encoding and decoding is for the KL autoencoder; the VQ-VAE runs whole "
                              f"volumes: set {key}=null"))
    elif len(tile) != ae.spatial_dims:
        problems.append((key, f"expected {ae.spatial_dims} sizes (one per spatial axis), got {list(tile)}"))
    elif total is not None:
        _check_divisible(key, tile, total, problems)


def _check_logging(s: Settings, total: Optional[tuple[int, ...]], problems: list[tuple[str, str]]) -> None:
    """The tiles of inference (``autoencoder.tile_size``, ``sampling.tile_size``), the sliding windows of stage 1's
    validation and the sampling steps of stage 2's pictures."""
    for tile_key, tile in (("autoencoder.tile_size", s.autoencoder.tile_size),
                           ("sampling.tile_size", s.sampling.tile_size)):
        _check_tile_size(tile_key, tile, s, total, problems)
    roi, dims = s.autoencoder.logging.sliding_window_roi_size, s.autoencoder.spatial_dims
    key = "autoencoder.logging.sliding_window_roi_size"
    if roi is not None and len(roi) != dims:
        problems.append((key, f"expected autoencoder.spatial_dims = {dims} entries (one per axis) or null "
                              f"(= data.voxel_size), got {len(roi)}: {_short(roi)}"))
    elif roi is not None and total is not None:
        _check_divisible(key, roi, total, problems)
    steps, timesteps = s.diffusion.logging.num_inference_steps, s.diffusion.scheduler.num_train_timesteps
    if steps is not None and steps > timesteps:
        problems.append(("diffusion.logging.num_inference_steps",
                         f"must be <= diffusion.scheduler.num_train_timesteps ({timesteps}), got {steps}"))


def _check_projection_conditioning(s: Settings, problems: list[tuple[str, str]]) -> None:
    """``diffusion.condition_channels``: the condition is the sum-projection of a 3D image along an axis of
    ``data.voxel_size``, with the image's channels, given to the UNet as cross-attention context (MONAI's middle block
    always has cross-attention once ``with_conditioning`` is on, so no attention level is required)."""
    df, ae = s.diffusion, s.autoencoder
    if df.condition_channels is None:
        return
    if ae.spatial_dims != 3:
        problems.append(("diffusion.condition_channels",
                         f"projection conditioning sums a 3D volume to a 2D image, but autoencoder.spatial_dims is "
                         f"{ae.spatial_dims}; --set diffusion.condition_channels=null"))
    elif df.projection_axis >= 3:
        problems.append(("diffusion.projection_axis",
                         f"must be 0, 1 or 2 (an axis of data.voxel_size {list(s.data.voxel_size)}), got "
                         f"{df.projection_axis}"))
    if df.condition_channels != ae.in_channels:
        problems.append(("diffusion.condition_channels",
                         f"the condition is the image's projection, with the image's {ae.in_channels} channel(s) "
                         f"(autoencoder.in_channels), got {df.condition_channels}; --set "
                         f"diffusion.condition_channels={ae.in_channels}"))
    if df.conditioning.covariate_keys:
        problems.append(("diffusion.conditioning.covariate_keys",
                         f"{list(df.conditioning.covariate_keys)} and diffusion.condition_channels both need the "
                         "UNet's cross-attention context; use one of them (--set diffusion.conditioning."
                         "covariate_keys=[] or --set diffusion.condition_channels=null)"))


def _seed_conditional_defaults(d: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The seed's ``conditional_diffusion_config.yaml`` names ``diffusion.condition_channels`` but neither
    ``diffusion.space`` nor a stage-1 checkpoint: it is a pixel-space model, whose code fixed GroupNorm at 8 groups.
    Such a config gets ``space: pixel`` and (unless given) ``norm_num_groups: 8``; every other config is returned
    as it is."""
    df = d.get("diffusion") if isinstance(d, Mapping) else None
    if not isinstance(df, Mapping) or df.get("condition_channels") is None or "space" in df:
        return d
    ckpts = df.get("checkpoints")
    if isinstance(ckpts, Mapping) and ckpts.get("autoencoder_path") is not None:
        return d
    return {**d, "diffusion": {"space": "pixel", "norm_num_groups": 8, **df}}


def _two_adic(n: int) -> int:
    """Largest k with 2**k dividing n (n > 0)."""
    k = 0
    while n > 0 and n % 2 == 0:
        n //= 2
        k += 1
    return k


def _set_value(value: Any) -> str:
    """A value as written after ``--set key=``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_set_value(v) for v in value) + "]"
    return str(value)


def unet_fit_problems(
    df: DiffusionSettings, latent_channels: int, spatial_dims: int, voxel_size: Sequence[int],
    total_factor: Sequence[int], autoencoder_source: str = "autoencoder", space: str = "latent",
    latent_key: str = "latent_channels",
) -> list[tuple[str, str]]:
    """Does the diffusion UNet fit the autoencoder's latent (or, in pixel space, the images)? One ``(key, message)``
    per problem, each with the ``--set`` lines that fix it.

    The one place this is checked: settings validation calls it with the YAML's autoencoder, stage 2 with the
    autoencoder stored in its checkpoint (``autoencoder_source`` names it in the messages).

    Args:
        df: the ``diffusion`` settings.
        latent_channels: channels of the autoencoder's latent.
        spatial_dims: the autoencoder's number of spatial axes.
        voxel_size: the volumes' spatial size (divisible by ``total_factor``).
        total_factor: the autoencoder's total downsample factor per axis.
        autoencoder_source: how the messages name the autoencoder: ``"autoencoder"`` (the settings section) or
            e.g. ``"the autoencoder in runs/ae/best_model.pt"``.
        space: ``"latent"``, or ``"pixel"``: the UNet works on the images, ``latent_channels`` is then the image
            channels (``autoencoder.in_channels``) and ``total_factor`` is 1 on every axis.
        latent_key: the autoencoder's key of the latent channels (``"vqvae.embedding_dim"`` for a VQ-VAE).
    """
    problems: list[tuple[str, str]] = []

    def of(name: str) -> str:
        return f"autoencoder.{name}" if autoencoder_source == "autoencoder" else f"{name} of {autoencoder_source}"

    if df.spatial_dims != spatial_dims:
        problems.append(("diffusion.spatial_dims", f"must equal {of('spatial_dims')} ({spatial_dims}), got "
                                                   f"{df.spatial_dims}: --set diffusion.spatial_dims={spatial_dims}"))
    pixel = space == "pixel"
    channels_key, works_on = ("in_channels", "the images (diffusion.space is pixel)") if pixel else \
        (latent_key, "latents")
    for name in ("in_channels", "out_channels"):
        if getattr(df, name) != latent_channels:
            problems.append((f"diffusion.{name}", f"must equal {of(channels_key)} ({latent_channels}) because "
                                                  f"the UNet works on {works_on}, got {getattr(df, name)}: "
                                                  f"--set diffusion.{name}={latent_channels}"))
    levels = len(df.num_channels)
    if not levels:
        return problems
    latent = [v // t for v, t in zip(voxel_size, total_factor)]
    need = 2 ** (levels - 1)
    bad = [(axis, size) for axis, size in enumerate(latent) if size % need]
    if not bad:
        return problems
    fixes = []
    keep = 1 + min(_two_adic(n) for n in latent)
    if keep < levels:
        channels = list(df.num_channels[:keep])
        sets = [f"--set diffusion.num_channels={_set_value(channels)}",
                f"--set diffusion.attention_levels={_set_value(list(df.attention_levels[:keep]))}"]
        if isinstance(df.num_head_channels, tuple):
            heads = list(df.num_head_channels[:keep])
            # the last level always has attention (middle block): its head size must divide its channels
            if heads[-1] < 1 or channels[-1] % heads[-1]:
                last = df.num_head_channels[-1]
                heads[-1] = last if last >= 1 and channels[-1] % last == 0 else channels[-1]
            sets.append(f"--set diffusion.num_head_channels={_set_value(heads)}")
        if isinstance(df.num_res_blocks, tuple):
            sets.append(f"--set diffusion.num_res_blocks={_set_value(list(df.num_res_blocks[:keep]))}")
        fixes.append(f"use {keep} UNet level(s): " + " ".join(sets))
    step = [t * need for t in total_factor]
    sizes = []
    for v, m in zip(voxel_size, step):
        lo, hi = (v // m) * m, (v // m + 1) * m
        sizes.append(lo if lo >= 1 and v - lo <= hi - v else hi)
    if pixel:
        fixes.append(f"or make every axis a multiple of {need}: --set data.voxel_size={_set_value(sizes)}")
        where = ", ".join(f"axis {a} is {n}" for a, n in bad)
        problems.append(("diffusion.num_channels",
                         f"{levels} UNet levels halve the image {levels - 1} time(s) (diffusion.space is pixel), so "
                         f"each axis of data.voxel_size must be divisible by {need}, but {where}; " + "; ".join(fixes)))
        return problems
    fixes.append(f"or make every latent axis a multiple of {need}: --set data.voxel_size={_set_value(sizes)}")
    where = ", ".join(f"axis {a} is {n} (data.voxel_size {voxel_size[a]} / total factor {total_factor[a]})"
                      for a, n in bad)
    problems.append(("diffusion.num_channels",
                     f"{levels} UNet levels halve the latent {levels - 1} time(s), so each latent axis must be "
                     f"divisible by {need}, but latent {where}; " + "; ".join(fixes)))
    return problems


def _check_perceptual(s: Settings, check_paths: bool, problems: list[tuple[str, str]]) -> None:
    t = s.autoencoder.training
    if t.perceptual_network.startswith("medicalnet_") and s.autoencoder.spatial_dims != 3:
        problems.append(
            ("autoencoder.training.perceptual_network",
             f"{t.perceptual_network!r} needs autoencoder.spatial_dims 3; use 'squeeze', 'alex' or 'vgg' for 2D")
        )
    if not t.use_perceptual_loss:
        return
    key = "autoencoder.training.perceptual_weights_path"
    if t.perceptual_weights_path is None:
        problems.append(
            (key, f"autoencoder.training.use_perceptual_loss is true but no weights file is given; pretrained "
                  f"weights cannot be downloaded here: pass a local state-dict file of the "
                  f"{t.perceptual_network!r} network, e.g. --set {key}=/path/to/weights.pth, or set "
                  f"autoencoder.training.use_perceptual_loss false")
        )
    elif check_paths and not Path(t.perceptual_weights_path).expanduser().is_file():
        problems.append(
            (key, f"file not found: {t.perceptual_weights_path!r} (resolved to "
                  f"{Path(t.perceptual_weights_path).expanduser().resolve()}); pretrained weights cannot be "
                  f"downloaded here, pass an existing local weights file")
        )


_HOW_TO_GIVE_DATA = (
    "set data.train_data_dir (a folder of .nii/.nii.gz volumes, optionally with data.val_data_dir), "
    "or data.datalist (a decathlon-style JSON), or data.synthetic.enabled: true (built-in synthetic volumes, "
    "e.g. --set data.synthetic.enabled=true)"
)


def _check_data_sources(s: Settings, check_paths: bool, require_data: bool, problems: list[tuple[str, str]]) -> None:
    d = s.data
    if d.synthetic.enabled:
        from .synthetic import make_params

        try:  # cross-parameter checks of the chosen kind (e.g. min_filaments <= max_filaments)
            make_params(d.synthetic.kind, synthetic_params(d.synthetic))
        except ValueError as exc:
            problems.append(("data.synthetic", str(exc)))
        if s.autoencoder.in_channels != 1:
            problems.append(("autoencoder.in_channels", f"the built-in datasets have 1 channel, got "
                                                        f"{s.autoencoder.in_channels}"))
    given = [name for name, on in (("data.train_data_dir", d.train_data_dir is not None),
                                   ("data.datalist", d.datalist is not None),
                                   ("data.synthetic.enabled", d.synthetic.enabled)) if on]
    if len(given) > 1:
        problems.append(
            ("data", f"give exactly one data source, got {len(given)}: {', '.join(given)}; "
                     f"remove (set to null/false) all but one")
        )
    if d.val_data_dir is not None and d.train_data_dir is None:
        problems.append(
            ("data.val_data_dir", "is set but data.train_data_dir is not; a validation folder goes with a training "
                                  "folder (a datalist has its own \"validation\" list)")
        )
    if not require_data:
        return
    if not given and check_paths:
        problems.append(("data", f"no data source given; {_HOW_TO_GIVE_DATA}"))
    if not check_paths:
        return
    for key, value, want_dir in (("data.train_data_dir", d.train_data_dir, True),
                                 ("data.val_data_dir", d.val_data_dir, True),
                                 ("data.datalist", d.datalist, False)):
        if value is None:
            continue
        p = Path(value).expanduser()
        if want_dir and not p.is_dir():
            what = "is a file, expected a folder" if p.exists() else "folder not found"
            problems.append((key, f"{what}: {value!r} (resolved to {p.resolve()}); point it at a folder of "
                                  f".nii/.nii.gz volumes, e.g. --set {key}=/path/to/folder"))
        elif not want_dir and not p.is_file():
            what = "is a folder, expected a JSON file" if p.exists() else "file not found"
            problems.append((key, f"{what}: {value!r} (resolved to {p.resolve()}); point it at a decathlon-style "
                                  f"JSON datalist, e.g. --set {key}=/path/to/datalist.json"))


def _check_checkpoints(s: Settings, check_paths: bool, problems: list[tuple[str, str]]) -> None:
    for section in ("autoencoder", "diffusion"):
        c = getattr(s, section).checkpoints
        if c.init_from is not None and c.resume_from is not None:
            problems.append((f"{section}.checkpoints.init_from",
                             f"cannot be combined with {section}.checkpoints.resume_from (resuming restores the "
                             "weights already); set one of them to null"))
        if c.start_fresh_if_none and c.resume_from != "latest":
            problems.append((f"{section}.checkpoints.start_fresh_if_none",
                             f"applies only with {section}.checkpoints.resume_from: latest (it is "
                             f"{c.resume_from!r}); set it to false or resume_from to latest"))
        for name in ("init_from", "resume_from"):
            path = getattr(c, name)
            if name == "resume_from" and path == "latest":
                continue  # the newest complete checkpoint in output_dir, found when the run starts
            if check_paths and path is not None and not Path(path).expanduser().is_file():
                problems.append((f"{section}.checkpoints.{name}",
                                 f"file not found: {path!r} (resolved to {Path(path).expanduser().resolve()})"))


def _check_stage(s: Settings, stage: Optional[str], check_paths: bool, problems: list[tuple[str, str]]) -> None:
    """Checks that only one command needs: stage 2 learns whole volumes from a stage-1 checkpoint (or, in pixel space,
    without one); a pixel-space config has no stage 1."""
    if stage == "autoencoder" and s.diffusion.space == "pixel":
        problems.append(("diffusion.space", "is pixel: the UNet learns the images directly and no autoencoder is "
                                            "trained; run train_diffusion.py with this config (or --set "
                                            "diffusion.space=latent to train a latent pipeline's autoencoder)"))
    if stage != "diffusion":
        return
    if s.data.crop_mode == "random_patch":
        problems.append(("data.crop_mode", "random_patch is for stage 1 only: the diffusion model learns whole "
                                           "volumes; use --set data.crop_mode=resize or pad_crop"))
    elif s.data.augmentation.use_patch_based:
        problems.append(("data.augmentation.use_patch_based",
                         "random patches are for stage 1 only: the diffusion model learns whole volumes; use --set "
                         "data.augmentation.use_patch_based=false (and data.crop_mode resize or pad_crop)"))
    path = s.diffusion.checkpoints.autoencoder_path
    key = "diffusion.checkpoints.autoencoder_path"
    if s.diffusion.space == "pixel":
        if path is not None:
            problems.append((key, f"is {path!r}, but diffusion.space is pixel: the UNet learns the images directly, "
                                  f"without an autoencoder; --set {key}=null (or --set diffusion.space=latent)"))
        return
    if path is None:
        pixel_hint = ""
        if s.diffusion.in_channels == s.autoencoder.in_channels:
            pixel_hint = (f"; or, since diffusion.in_channels equals the image channels ({s.autoencoder.in_channels}),"
                          " train on the images without an autoencoder: --set diffusion.space=pixel")
        problems.append((key, f"is not set: point it at the stage-1 checkpoint, e.g. --set {key}="
                              f"{Path(s.autoencoder.checkpoints.output_dir) / 'best_model.pt'}" + pixel_hint))
    elif check_paths and not Path(path).expanduser().is_file():
        problems.append((key, f"file not found: {path!r} (resolved to {Path(path).expanduser().resolve()}); "
                              "train stage 1 first, or point it at its best_model.pt"))


def _check_losses(s: Settings, problems: list[tuple[str, str]]) -> None:
    """Stage 1's reconstruction loss and the input corruption of both stages (docs/losses.md)."""
    weighted = s.autoencoder.training.loss.weighted
    if weighted.recon_loss_type is not None and weighted.recon_loss_type != weighted.loss_type != "l1":
        problems.append(("autoencoder.training.loss.weighted.recon_loss_type",
                         f"names the same thing as weighted.loss_type but differs: {weighted.recon_loss_type!r} vs "
                         f"{weighted.loss_type!r}; give one of them"))
    combined = s.autoencoder.training.loss.combined
    if combined.dice_weight == 0 and combined.recon_weight == 0:
        problems.append(("autoencoder.training.loss.combined.dice_weight",
                         "dice_weight and recon_weight are both 0, so the combined loss is 0: make one positive"))
    for key, c in (("autoencoder.training.denoising", s.autoencoder.training.denoising),
                   ("diffusion.training.input_noise", s.diffusion.training.input_noise)):
        if c.dropout_prob >= 1:
            problems.append((f"{key}.dropout_prob",
                             f"must be below 1 (1 zeroes every voxel), got {_num(c.dropout_prob)}"))
    if s.diffusion.training.input_noise.enabled and s.diffusion.training.cache_latents:
        problems.append(("diffusion.training.input_noise.enabled",
                         "input noise corrupts the images before they are encoded, but diffusion.training."
                         "cache_latents encodes them once, uncorrupted; use --set diffusion.training.cache_latents="
                         "false (or --set diffusion.training.input_noise.enabled=false)"))


STAGES = ("autoencoder", "diffusion", "sampling")


def _validate(s: Settings, check_paths: bool, require_data: bool, stage: Optional[str] = None) -> None:
    problems: list[tuple[str, str]] = []
    total = _check_autoencoder(s, problems)
    if s.diffusion.space == "pixel":
        total = None  # no autoencoder downsamples the images: the UNet's own fit is checked in _check_diffusion
    _check_data_shape(s, total, problems)
    _check_logging(s, total, problems)
    _check_diffusion(s, total, problems)
    _check_losses(s, problems)
    _check_perceptual(s, check_paths, problems)
    _check_data_sources(s, check_paths, require_data, problems)
    _check_checkpoints(s, check_paths, problems)
    _check_stage(s, stage, check_paths, problems)
    if problems:
        raise ConfigError(problems=problems)


# --------------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------------


# keys of the seed's top-level ``vqvae:`` section that land in ``autoencoder`` itself (the rest in autoencoder.vqvae)
_SEED_VQVAE_SHARED = ("spatial_dims", "in_channels", "out_channels", "training", "checkpoints", "logging")


def fold_seed_vqvae(raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """Map the seed system's top-level ``vqvae:`` section (``vq_ldm_config_local.yaml``) onto this schema.

    ``vqvae.{spatial_dims, in_channels, out_channels, training, checkpoints, logging}`` become the same keys of
    ``autoencoder``; every other ``vqvae.X`` becomes ``autoencoder.vqvae.X``; ``autoencoder.type`` becomes ``vq``; the
    seed's ``diffusion.checkpoints.vqvae_path`` becomes ``diffusion.checkpoints.autoencoder_path``. The seed trained its
    VQ-VAE without a discriminator, so ``autoencoder.training.adv_weight`` is 0 unless ``vqvae.training`` gives it.
    A document without these keys is returned unchanged (as a copy).

    Raises:
        ConfigError: naming each seed key that is also given under its new name, or is not a VQ-VAE key.
    """
    import copy

    out: dict[str, Any] = copy.deepcopy(dict(raw)) if raw else {}
    problems: list[tuple[str, str]] = []
    ckpts = out.get("diffusion", {}).get("checkpoints") if isinstance(out.get("diffusion"), Mapping) else None
    if isinstance(ckpts, dict) and "vqvae_path" in ckpts:
        if ckpts.get("autoencoder_path") is not None:
            problems.append(("diffusion.checkpoints.vqvae_path", "is the seed's name of "
                             "diffusion.checkpoints.autoencoder_path, which is given too; keep one of them"))
        else:
            ckpts["autoencoder_path"] = ckpts.pop("vqvae_path")
    if "vqvae" in out:
        seed = out.pop("vqvae")
        seed = {} if seed is None else seed
        ae = out.get("autoencoder")
        ae = {} if ae is None else ae
        if not isinstance(seed, Mapping):
            problems.append(("vqvae", f"expected a section (a mapping of keys), got {_show(seed)}"))
        elif not isinstance(ae, dict):
            problems.append(("autoencoder", f"expected a section (a mapping of keys), got {_show(ae)}"))
        else:
            if ae.get("type", "vq") != "vq":
                problems.append(("autoencoder.type", f"a top-level vqvae section selects the VQ-VAE, but "
                                                     f"autoencoder.type is {ae['type']!r}; remove one of them"))
            ae["type"] = "vq"
            if ae.get("vqvae") is None:
                ae["vqvae"] = {}
            vq = ae["vqvae"] if isinstance(ae["vqvae"], dict) else None
            vq_names = [f.name for f in dataclasses.fields(VQVAESettings)]
            for key, value in seed.items():
                if key in _SEED_VQVAE_SHARED:
                    target, where = ae, f"autoencoder.{key}"
                elif key in vq_names and vq is not None:
                    target, where = vq, f"autoencoder.vqvae.{key}"
                else:
                    problems.append((f"vqvae.{key}", f"unknown key of the seed's vqvae section; "
                                                     f"{_suggest(key, [*_SEED_VQVAE_SHARED, *vq_names])}"))
                    continue
                if key in target:
                    problems.append((f"vqvae.{key}", f"is given twice: here and as {where} (the top-level vqvae "
                                                     f"section maps onto it); keep one of them"))
                    continue
                target[key] = copy.deepcopy(value)
            training = ae.get("training")
            if training is None:
                training = ae["training"] = {}
            if isinstance(training, dict):
                training.setdefault("adv_weight", 0.0)
            out["autoencoder"] = ae
    if problems:
        raise ConfigError(problems=problems)
    return out


def _seed_names(raw: Mapping[str, Any] | None) -> dict[str, str]:
    """Where each key of a seed ``vqvae:`` section lands (``autoencoder.vqvae.num_channels`` ->
    ``vqvae.num_channels``), so that problems name the key as the user wrote it."""
    seed = raw.get("vqvae") if isinstance(raw, Mapping) else None
    if not isinstance(seed, Mapping):
        return {}
    return {(f"autoencoder.{k}" if k in _SEED_VQVAE_SHARED else f"autoencoder.vqvae.{k}"): f"vqvae.{k}" for k in seed}


def _renamed(err: ConfigError, names: Mapping[str, str]) -> ConfigError:
    """``err`` with each problem's key given in the seed's naming where it came from a seed ``vqvae:`` section."""
    if not names:
        return err

    def rename(key: str) -> str:
        for new, old in names.items():
            if key == new or key.startswith((new + ".", new + "[")):
                return old + key[len(new):]
        return key

    return ConfigError(problems=[(rename(k), m) for k, m in err.problems], source=err.source)


def settings_from_dict(
    d: Mapping[str, Any] | None, check_paths: bool = True, *, require_data: bool = True, stage: Optional[str] = None
) -> Settings:
    """Validate a plain (YAML-like) dict and build typed settings.

    Args:
        d: nested dict with the keys of :class:`Settings`; missing keys take their defaults; None = all defaults.
        check_paths: check that data folders / the datalist / the perceptual weights file exist, and that a data
            source is given at all. False validates the document only (no filesystem access).
        require_data: False skips the data-source presence and existence checks (for tools that read no data,
            like sampling); conflicting sources are still an error.
        stage: the command the settings are for (``"autoencoder"``, ``"diffusion"``, ``"sampling"``) or None;
            ``"diffusion"`` adds stage 2's own checks (no ``random_patch``, the stage-1 checkpoint is given and
            exists).

    Raises:
        ConfigError: listing every problem found (key path, given value, expected value).
    """
    if stage is not None and stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES} or None, got {stage!r}")
    problems: list[tuple[str, str]] = []
    names = _seed_names(d)
    # the seed's top-level vqvae: section, if any, as autoencoder.type vq; its conditional config as pixel space
    folded = _seed_conditional_defaults(fold_seed_vqvae(d))
    settings = _build(Settings, _expand_cube_sizes(folded, _raw_spatial_dims(folded)), "", problems)
    if problems:
        raise _renamed(ConfigError(problems=problems), names)
    try:
        _validate(settings, check_paths, require_data, stage)
    except ConfigError as e:
        raise _renamed(e, names) from None
    return settings


_CUBE_KEYS = ("voxel_size", "voxel_resize")


def _raw_spatial_dims(d: Mapping[str, Any] | None) -> int:
    """``autoencoder.spatial_dims`` of a raw document when it is 2 or 3, else the default 3 (a wrong value is
    reported by the checks)."""
    ae = d.get("autoencoder") if isinstance(d, Mapping) else None
    dims = ae.get("spatial_dims") if isinstance(ae, Mapping) else None
    return dims if isinstance(dims, int) and not isinstance(dims, bool) and dims in (2, 3) else 3


def _expand_cube_sizes(d: Mapping[str, Any] | None, dims: int, section: str | None = "data") -> Any:
    """A copy of the raw document in which an int ``data.voxel_size`` / ``data.voxel_resize`` (a cube) is one int
    per axis, so that the typed settings always hold a tuple. Anything else is left for the schema to judge.

    Args:
        d: the raw document (or, with ``section=None``, the raw ``data`` section itself).
        dims: number of spatial axes.
        section: the key of the data section in ``d``, or None when ``d`` is the section.
    """
    data = d if section is None else (d.get(section) if isinstance(d, Mapping) else None)
    if not isinstance(data, Mapping):
        return d
    cubes = {k: [data[k]] * dims for k in _CUBE_KEYS
             if isinstance(data.get(k), int) and not isinstance(data.get(k), bool)}
    if not cubes:
        return d
    data = {**data, **cubes}
    return data if section is None else {**d, section: data}


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice in one mapping (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is written twice in the same section (first at line "
                            f"{seen[key].start_mark.line + 1})", key_node.start_mark,
            )
        if isinstance(key, (str, int, float, bool)):
            seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        what = "is a folder, expected a YAML file" if path.exists() else "not found"
        raise ConfigError(f"config file {what}: {str(path)!r} (resolved to {path.resolve()})", key="--config")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse YAML: {e}", key="", source=str(path)) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"the top level must be a mapping of sections (data:, autoencoder:, ...), "
                          f"got {_show(raw)}", source=str(path))
    return raw


def _split_key(dotted: str) -> list[str]:
    return [part.strip() for part in dotted.split(".")]


def apply_overrides(d: Mapping[str, Any] | None, overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``d`` with ``"a.b.c=value"`` overrides applied (values parsed with ``yaml.safe_load``).

    Key names are checked against the schema (unknown key -> ConfigError with the closest valid name); values are
    validated later, with the rest of the settings.
    """
    import copy

    out: dict[str, Any] = copy.deepcopy(dict(d)) if d else {}
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} must look like KEY=VALUE, e.g. autoencoder.training.n_epochs=5",
                              key="--set")
        dotted, text = item.split("=", 1)
        parts = _split_key(dotted)
        if not dotted.strip() or any(not p for p in parts):
            raise ConfigError(f"override {item!r} has an empty key part; expected e.g. data.voxel_size=[64, 64, 64]",
                              key="--set")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse the value of override {item!r} as YAML: {e}",
                              key=dotted.strip()) from None
        # check the key path against the schema
        cls: Any = Settings
        for i, part in enumerate(parts):
            here = ".".join(parts[: i + 1])
            if not dataclasses.is_dataclass(cls):
                raise ConfigError(f"override --set {item!r}: {'.'.join(parts[:i])} is a value, not a section",
                                  key=here)
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                raise ConfigError(f"unknown key in override --set {item!r}; {_suggest(part, names)}", key=here)
            cls = _hints(cls)[part]
        # set it in the raw dict
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(
                    f"cannot apply --set {item!r}: the config gives {'.'.join(parts[: i + 1])} the value "
                    f"{_show(nxt)} instead of a section", key=".".join(parts[: i + 1]),
                )
            node = nxt
        node[parts[-1]] = value
    return out


def load_settings(
    path: str | Path | None, overrides: Sequence[str] = (), check_paths: bool = True, *, require_data: bool = True,
    stage: Optional[str] = None,
) -> Settings:
    """Read a YAML config, apply ``--set`` overrides, validate, and return typed settings.

    Args:
        path: YAML file; None = defaults only.
        overrides: ``"a.b.c=value"`` strings, applied in order after the file; values are parsed as YAML
            (``5``, ``true``, ``[4, 2]``, ``null``, ``1e-4``).
        check_paths: see :func:`settings_from_dict`.
        require_data: see :func:`settings_from_dict`.
        stage: see :func:`settings_from_dict`.

    Raises:
        ConfigError: for an unreadable file, an unknown override key, or any invalid value (the file is named).
    """
    raw = {} if path is None else _read_yaml(Path(path).expanduser())
    names = _seed_names(raw)  # problems of a seed vqvae: section name its keys as written there
    try:
        raw = apply_overrides(fold_seed_vqvae(raw), overrides)
        return settings_from_dict(raw, check_paths=check_paths, require_data=require_data, stage=stage)
    except ConfigError as e:
        e = _renamed(e, names)
        if path is not None and e.source is None:
            raise e.with_source(path) from None
        raise e from None


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config PATH`` and ``--set KEY=VALUE`` (repeatable) to ``parser``; returns the parser."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", "-c", metavar="PATH", default=None,
                       help="YAML config file (default: built-in defaults); see monai_diffusion/config/")
    group.add_argument("--set", dest="set", metavar="KEY=VALUE", action="append", default=[],
                       help="override one config value, e.g. --set autoencoder.training.n_epochs=5 "
                            "--set data.voxel_size='[64, 64, 32]' (repeatable; values are YAML)")
    return parser


def settings_from_args(
    args: argparse.Namespace, check_paths: bool = True, *, require_data: bool = True, stage: Optional[str] = None
) -> Settings:
    """Settings from the ``--config`` / ``--set`` arguments added by :func:`add_config_args`."""
    return load_settings(getattr(args, "config", None), getattr(args, "set", None) or (),
                         check_paths=check_paths, require_data=require_data, stage=stage)


def build_data_settings(raw: Mapping[str, Any] | None = None, spatial_dims: int = 3) -> DataSettings:
    """The ``data`` section alone, validated with the same schema and checks as in :func:`settings_from_dict`
    (shape, orientation, spacing and intensity checks for ``spatial_dims`` axes; no autoencoder, no paths).

    For tools and tests that read volumes without a whole config (``evaluate --real``).

    Raises:
        ConfigError: naming each ``data.*`` key that is wrong.
    """
    problems: list[tuple[str, str]] = []
    data = _build(DataSettings, _expand_cube_sizes(raw, spatial_dims, section=None), "data", problems)
    if not problems:
        _check_data_section(data, spatial_dims, None, problems)
    if problems:
        raise ConfigError(problems=problems)
    return data


def initial_downsample_factor(autoencoder: AutoencoderSettings) -> tuple[int, ...]:
    """``autoencoder.initial_downsample_factor`` as one int per axis. Assumes validated settings."""
    f = autoencoder.initial_downsample_factor
    return (f,) * autoencoder.spatial_dims if isinstance(f, int) else tuple(f)


def sampling_tile(s: Settings, pixel: bool = False) -> tuple[Optional[tuple[int, ...]], str]:
    """The exact tile sampling decodes in and the key that sets it: ``sampling.tile_size``, else
    ``autoencoder.tile_size`` (which a pixel-space model, ``pixel``, has no decoder for); ``(None, key)`` = whole
    volumes."""
    if s.sampling.tile_size is not None:
        return tuple(s.sampling.tile_size), "sampling.tile_size"
    if not pixel and s.autoencoder.tile_size is not None:
        return tuple(s.autoencoder.tile_size), "autoencoder.tile_size"
    return None, "sampling.tile_size"


def total_downsample_factor(autoencoder: AutoencoderSettings) -> tuple[int, ...]:
    """Total downsample factor of the autoencoder per spatial axis: initial_downsample_factor times the product of
    downsample_factors (None = 2 per level, with len(num_channels) - 1 levels); for a VQ-VAE the product of its
    downsampling strides. Assumes validated settings."""
    if autoencoder.type == "vq":
        return (math.prod(p[0] for p in vq_sampling_parameters(autoencoder.vqvae)[0]),) * autoencoder.spatial_dims
    dims, levels = autoencoder.spatial_dims, len(autoencoder.num_channels) - 1
    if autoencoder.downsample_factors is None:
        per_level = [(2,) * dims] * levels
    else:
        per_level = [(f,) * dims if isinstance(f, int) else tuple(f) for f in autoencoder.downsample_factors]
    return _prod([initial_downsample_factor(autoencoder), *per_level], dims)


def latent_channels_of(autoencoder: AutoencoderSettings) -> int:
    """Channels of the stage-1 latent: ``latent_channels`` (kl) or ``vqvae.embedding_dim`` (vq)."""
    return autoencoder.vqvae.embedding_dim if autoencoder.type == "vq" else autoencoder.latent_channels


def latent_channels_key(autoencoder: AutoencoderSettings) -> str:
    """The key (under ``autoencoder.``) that sets the latent channels: ``latent_channels`` or
    ``vqvae.embedding_dim``."""
    return "vqvae.embedding_dim" if autoencoder.type == "vq" else "latent_channels"


def settings_reference() -> str:
    """Markdown reference of every configuration key (type, default, meaning), generated from the dataclasses."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `monai_diffusion/settings.py` by `python -m monai_diffusion.settings --reference`;",
        "a test keeps this file in step with the code. Every key is optional; unknown keys are errors.",
        "",
    ]

    def walk(cls: type, prefix: str) -> None:
        hints = _hints(cls)
        rows = []
        nested = []
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(hints[f.name]):
                nested.append((f, hints[f.name], key))
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            shown = yaml.safe_dump(_to_plain(default), default_flow_style=True).strip().removesuffix("...").strip()
            kind = _describe(hints[f.name])
            doc = f.metadata.get("doc", "")
            cells = [f"`{key}`", kind, f"`{shown}`", doc]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        if rows:
            title = prefix.rstrip(".") or "top level"
            doc = (cls.__doc__ or "").strip().splitlines()[0].replace(":func:", "") if cls.__doc__ else ""
            lines.extend([f"## `{title}`", "", doc, "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"])
            lines.extend(rows)
            lines.append("")
        for f, sub, key in nested:
            walk(sub, f"{key}.")

    walk(Settings, "")
    return "\n".join(lines)


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m monai_diffusion.settings --config X [--set ...]``: validate and print the resolved settings."""
    parser = add_config_args(argparse.ArgumentParser(description="Validate a config and print the resolved settings"))
    parser.add_argument("--no-check-paths", action="store_true", help="do not look at the filesystem")
    parser.add_argument("--reference", action="store_true", help="print the Markdown reference of every key and exit")
    args = parser.parse_args(argv)
    if args.reference:
        print(settings_reference())
        return 0
    try:
        settings = settings_from_args(args, check_paths=not args.no_check_paths)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    print(settings.to_yaml(), end="")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
