"""YAML file (+ ``--set key=value`` overrides) -> validated, typed settings.

Every configuration error is found here, before any data is read or any network is built, and every error is a
:class:`ConfigError` naming the dotted key path (``autoencoder.training.n_epochs``), what was given and what was
expected; all problems found in one phase are reported together. The package, layer 2 of the application (it imports
only the ground floor: ``errors``, ``fileio``, ``geometry``):

* :mod:`.schema`: the dataclasses (every key, default, doc and bound) and the registries they name (samplers);
  :mod:`.synthetic_kinds`: the built-in datasets' kinds and parameter dataclasses; :mod:`.fields`: how a field
  is declared.
* :mod:`.load`: YAML reading, ``--set`` overrides, the converter (types, enums, did-you-mean), ``--config``/``--set``
  arguments.
* :mod:`.checks`: the cross-field checks, and the sizes and channels they derive (total downsample factor, ...).
* :mod:`.legacy`: the seed system's configs folded onto the schema.
* :mod:`.reference`: the Markdown reference (``docs/configuration.md``); ``python -m monai_diffusion.settings``
  validates a config or prints that reference.

Public API: :class:`Settings` (and its section dataclasses), :class:`ConfigError`, :func:`load_settings`,
:func:`settings_from_dict`, :func:`add_config_args`, :func:`settings_from_args`, :func:`total_downsample_factor`,
:func:`unet_fit_problems`, :func:`build_data_settings`, :func:`apply_overrides`, :func:`fold_seed_vqvae`,
:func:`latent_channels_of`.
"""

from __future__ import annotations

from ..errors import ConfigError
from .checks import (
    initial_downsample_factor,
    latent_channels_key,
    latent_channels_of,
    sampling_tile,
    total_downsample_factor,
    unet_fit_problems,
    vq_sampling_parameters,
)
from .legacy import fold_seed_vqvae
from .load import (
    add_config_args,
    apply_overrides,
    build_data_settings,
    load_settings,
    settings_from_args,
    settings_from_dict,
)
from .messages import set_value
from .reference import settings_reference
from .schema import (
    SAMPLERS,
    STAGES,
    VQ_ACTIVATIONS,
    AugmentationSettings,
    AutoencoderSettings,
    AutoencoderTrainingSettings,
    CheckpointSettings,
    CombinedLossSettings,
    ConditioningSettings,
    CorruptionSettings,
    DataSettings,
    DeviceSettings,
    DiceLossSettings,
    DiffusionCheckpointSettings,
    DiffusionLoggingSettings,
    DiffusionSettings,
    DiffusionTrainingSettings,
    DiscriminatorSettings,
    IntensitySettings,
    LoggingSettings,
    PointCloudSettings,
    ReconstructionLossSettings,
    SamplingSettings,
    SchedulerSettings,
    Settings,
    SyntheticDataSettings,
    TrainingLoopSettings,
    VQVAESettings,
    WeightedLossSettings,
    synthetic_params,
)

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
    # also used by the application's modules
    "DiffusionLoggingSettings",
    "TrainingLoopSettings",
    "SAMPLERS",
    "STAGES",
    "VQ_ACTIVATIONS",
    "latent_channels_key",
    "sampling_tile",
    "synthetic_params",
    "vq_sampling_parameters",
    "settings_reference",
    "set_value",
]
