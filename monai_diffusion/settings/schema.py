"""The settings schema: one frozen dataclass per YAML section, each field with its default, one-line doc and bounds.

The dataclasses are the single source of every key name, default, help text and key order: the converter
(:mod:`.load`) builds them from YAML, :mod:`.checks` validates them across fields, and :mod:`.reference` prints them
as ``docs/configuration.md``. The registries a key's allowed values come from are plain data owned here or in
:mod:`.synthetic_kinds`: :data:`SAMPLERS` (sampler names per training objective; ``monai_diffusion.sampling``
implements them, a test keeps the two in step) and the synthetic dataset kinds with their parameter dataclasses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional, Tuple, Union

import yaml

from ..fileio import plain
from .fields import section as _section
from .fields import setting as _f
from .synthetic_kinds import KINDS, PARAMS

IntList = Tuple[int, ...]
Factor = Union[int, Tuple[int, ...]]

# the samplers that can sample a model of each training objective (diffusion.scheduler.type), the first being the
# default (sampling.scheduler: auto)
SAMPLERS: dict[str, tuple[str, ...]] = {"ddpm": ("ddim", "ddpm"), "rflow": ("rflow",)}
OBJECTIVES = tuple(SAMPLERS)
# sampling.scheduler: auto, then every sampler once
SAMPLER_NAMES = ("auto", *dict.fromkeys(name for names in SAMPLERS.values() for name in names))

STAGES = ("autoencoder", "diffusion", "sampling")


def _synthetic_settings_class() -> type:
    """``data.synthetic``: the switch, the kind, counts and seed, then every generator parameter of every kind
    (their names are unique across kinds; only the chosen kind's are used), taken from ``synthetic_kinds.PARAMS``."""
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


def synthetic_params(synthetic: SyntheticDataSettings) -> dict[str, Any]:
    """The generator parameters of the chosen ``data.synthetic.kind``, from the ``data.synthetic`` settings."""
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
class TrainingLoopSettings:
    """The keys of the training loop that both stages' ``training`` sections hold (``engine.loop_config`` reads
    them). Declared once here; :func:`_loop` places each in a section, where the section's own key order wants it."""

    n_epochs: int = _f(100, "number of epochs", ge=1)
    batch_size: Union[int, Literal["auto"]] = _f(
        1, "volumes per batch (per process); auto = the largest that fits the device, found with the memory "
           "estimate before training, with gradient_accumulation_steps reaching effective_batch_size", ge=1
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
    gradient_accumulation_steps: int = _f(1, "batches per optimizer step", ge=1)
    effective_batch_size: Optional[int] = _f(
        None, "with batch_size: auto, the volumes each optimizer step should see (per process): "
              "gradient_accumulation_steps becomes ceil(N / the batch that fits); null = no auto batch", ge=1
    )
    grad_clip_norm: Optional[float] = _f(None, "clip gradient norm to this value; null = no clipping", gt=0)


_LOOP_FIELDS = {f.name: f for f in dataclasses.fields(TrainingLoopSettings)}


def _loop(name: str) -> Any:
    """The field of the shared training-loop key ``name``: default, doc and bounds of :class:`TrainingLoopSettings`.
    (Inheriting would put the shared keys first; each training section keeps its own order instead.)"""
    return _shared(_LOOP_FIELDS[name])


def _shared(f: dataclasses.Field) -> Any:
    """A section's copy of a field declared once elsewhere: the same default, doc and bounds."""
    return dataclasses.field(default=f.default, metadata=f.metadata)


@dataclass(frozen=True)
class AutoencoderTrainingSettings:
    """Stage 1 (autoencoder) training."""

    n_epochs: int = _loop("n_epochs")
    batch_size: Union[int, Literal["auto"]] = _loop("batch_size")
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
    gradient_accumulation_steps: int = _loop("gradient_accumulation_steps")
    effective_batch_size: Optional[int] = _loop("effective_batch_size")
    grad_clip_norm: Optional[float] = _loop("grad_clip_norm")
    autoencoder_warm_up_n_epochs: int = _f(5, "epochs before the adversarial loss is switched on", ge=0)
    discriminator: DiscriminatorSettings = _section(DiscriminatorSettings, "patch discriminator")
    loss: ReconstructionLossSettings = _section(ReconstructionLossSettings, "reconstruction loss (docs/losses.md)")
    denoising: CorruptionSettings = _section(
        CorruptionSettings, "denoising autoencoder: train on corrupted inputs against the clean volumes"
    )
    val_interval: int = _loop("val_interval")
    save_interval: int = _loop("save_interval")
    fast_dev_run: bool = _loop("fast_dev_run")
    fast_dev_run_batches: int = _loop("fast_dev_run_batches")
    on_nonfinite: Literal["stop", "skip"] = _loop("on_nonfinite")
    max_consecutive_skips: int = _loop("max_consecutive_skips")


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
class TrackingSettings:
    """The logging keys both stages' ``logging`` sections hold (where the run's scalars and pictures go). Declared
    once here; :func:`_logging` places each in a section, as :func:`_loop` does for the training-loop keys."""

    log_dir: Optional[str] = _f(None, "TensorBoard folder; null = <checkpoints.output_dir>/logs")
    log_interval: int = _f(10, "log training losses every N steps", ge=1)
    tracker: Literal["tensorboard", "mlflow", "none"] = _f(
        "tensorboard", "experiment tracker: tensorboard (log_dir) | mlflow (the resolved settings as parameters, every "
                       "logged scalar, the pictures and config.yaml as artifacts; a resumed run continues the same "
                       "MLflow run; needs pip install -e \".[mlflow]\") | none"
    )
    mlflow_uri: Optional[str] = _f(
        None, "MLflow tracking URI (logging.tracker mlflow); null = a local store in mlruns/ of the folder above "
              "checkpoints.output_dir (a SQLite file mlflow.db and artifacts/: runs/quickstart/mlruns for the "
              "quickstart)"
    )


_LOGGING_FIELDS = {f.name: f for f in dataclasses.fields(TrackingSettings)}


def _logging(name: str) -> Any:
    """The field of the shared logging key ``name``: default, doc and bounds of :class:`TrackingSettings`."""
    return _shared(_LOGGING_FIELDS[name])


@dataclass(frozen=True)
class LoggingSettings:
    """Logging of stage 1 (TensorBoard, MLflow or none)."""

    log_dir: Optional[str] = _logging("log_dir")
    log_interval: int = _logging("log_interval")
    tracker: Literal["tensorboard", "mlflow", "none"] = _logging("tracker")
    mlflow_uri: Optional[str] = _logging("mlflow_uri")
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
    """Logging of stage 2 (TensorBoard, MLflow or none): samples (diffusion.training.generate_samples_interval and
    num_samples_to_generate) and samples next to real validation volumes (visualize_interval)."""

    log_dir: Optional[str] = _logging("log_dir")
    log_interval: int = _logging("log_interval")
    tracker: Literal["tensorboard", "mlflow", "none"] = _logging("tracker")
    mlflow_uri: Optional[str] = _logging("mlflow_uri")
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
    use_flash_attention: bool = _f(
        True, "attention via torch scaled_dot_product_attention: the same result without an N x N matrix in memory "
              "(an execution knob, not architecture: checkpoints load either way); false = the explicit matrix"
    )
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

    type: Literal[OBJECTIVES] = _f(
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

    n_epochs: int = _loop("n_epochs")
    batch_size: Union[int, Literal["auto"]] = _loop("batch_size")
    learning_rate: float = _f(1.0e-4, "UNet learning rate", gt=0)
    val_interval: int = _loop("val_interval")
    save_interval: int = _loop("save_interval")
    generate_samples_interval: int = _f(10, "generate and log samples every N epochs", ge=1)
    num_samples_to_generate: int = _f(1, "samples generated each time", ge=0)
    fast_dev_run: bool = _loop("fast_dev_run")
    fast_dev_run_batches: int = _loop("fast_dev_run_batches")
    on_nonfinite: Literal["stop", "skip"] = _loop("on_nonfinite")
    max_consecutive_skips: int = _loop("max_consecutive_skips")
    gradient_accumulation_steps: int = _loop("gradient_accumulation_steps")
    effective_batch_size: Optional[int] = _loop("effective_batch_size")
    grad_clip_norm: Optional[float] = _loop("grad_clip_norm")
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
    use_flash_attention: bool = _f(
        True, "attention via torch scaled_dot_product_attention: the same result without an N x N matrix in memory "
              "(an execution knob, not architecture: checkpoints load either way); false = the explicit matrix"
    )
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
    scheduler: Literal[SAMPLER_NAMES] = _f(
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
    mixed_precision: Union[bool, Literal["fp16", "bf16", "auto"]] = _f(
        False, "true | false | fp16 | bf16 | auto; true = bf16 on CPU and on GPUs with native bf16 (A100, H100, H200), "
               "fp16 with loss scaling on older GPUs (see runtime.resolve_precision); auto = bf16 on a CPU with "
               "avx512_bf16 or AMX, else fp32 (docs/performance.md), printed and recorded in config.yaml"
    )
    channels_last: Union[bool, Literal["auto"]] = _f(
        "auto", "networks and their inputs in channels_last_3d (2D: channels_last) memory format for training, "
                "validation and sampling: the same numbers up to float rounding; auto = on where it was measured "
                "faster (docs/performance.md), printed and recorded in config.yaml"
    )
    compile: Union[bool, Literal["auto"]] = _f(
        "auto", "torch.compile the trained network (autoencoder, UNet) for the training step; checkpoints are "
                "unchanged, and a failure to compile falls back to eager with one warning; auto = on where it was "
                "measured faster (docs/performance.md), printed and recorded in config.yaml"
    )
    memory_check: bool = _f(
        True, "before a stage trains, estimate one step's memory (fake tensors, no allocation) and stop with the "
              "--set changes that would fit when the device has less available; false = run anyway"
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
        return plain(self)

    def to_yaml(self) -> str:
        """The settings as YAML text (loads back to equal settings)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

