"""Build networks from settings and rebuild them from self-describing checkpoints.

Checkpoints store a network's *architecture* arguments only. How it executes (``use_flash_attention``,
``use_checkpointing``) is not part of the architecture: it comes from the current settings, so a resumed run, stage 2
or sampling may switch it freely.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monai.networks.nets import DiffusionModelUNet

from generative.networks.nets import AutoencoderKL

from .engine import load_checkpoint, load_weights


# constructor arguments that change how a network runs, not what it computes
EXECUTION_ARGS = ("use_flash_attention", "use_checkpointing")


def architecture(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` without the execution knobs (:data:`EXECUTION_ARGS`): what a checkpoint stores and compares."""
    return {k: v for k, v in args.items() if k not in EXECUTION_ARGS}


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def autoencoder_args(ae: Any) -> dict[str, Any]:
    """Architecture arguments of the fork's AutoencoderKL from the ``autoencoder`` settings section."""
    return {
        "spatial_dims": ae.spatial_dims,
        "in_channels": ae.in_channels,
        "out_channels": ae.out_channels,
        "num_channels": _plain(ae.num_channels),
        "num_res_blocks": _plain(ae.num_res_blocks),
        "attention_levels": _plain(ae.attention_levels),
        "latent_channels": ae.latent_channels,
        "norm_num_groups": ae.norm_num_groups,
        "with_encoder_nonlocal_attn": ae.with_encoder_nonlocal_attn,
        "with_decoder_nonlocal_attn": ae.with_decoder_nonlocal_attn,
        "use_convtranspose": ae.use_convtranspose,
        "downsample_factors": _plain(ae.downsample_factors),
        "upsample_factors": _plain(ae.upsample_factors),
        # AutoencoderKL.init_args (what checkpoints store) records these two only when they are not the default
        "initial_downsample_factor": _plain(ae.initial_downsample_factor),
        "use_conv_downsample": ae.use_conv_downsample,
    }


def autoencoder_execution(ae: Any) -> dict[str, Any]:
    """The execution knobs of the autoencoder from the ``autoencoder`` settings section."""
    return {"use_flash_attention": ae.use_flash_attention,
            "use_checkpointing": ae.training.use_gradient_checkpointing}


def build_autoencoder(ae: Any) -> AutoencoderKL:
    """The stage-1 network described by the ``autoencoder`` settings section."""
    return AutoencoderKL(**autoencoder_args(ae), **autoencoder_execution(ae))


def autoencoder_from_args(args: dict[str, Any], **execution: Any) -> AutoencoderKL:
    """An AutoencoderKL from stored architecture arguments (older checkpoints also stored the execution knobs;
    they are dropped) and the execution knobs wanted now."""
    return AutoencoderKL(**architecture(args), **execution)


def load_autoencoder(path: str | Path, **execution: Any) -> tuple[AutoencoderKL, dict[str, Any]]:
    """Rebuild the autoencoder of a stage-1 checkpoint from the checkpoint alone (not from any YAML).

    Args:
        path: a stage-1 checkpoint.
        execution: execution knobs (``use_flash_attention``, ``use_checkpointing``) for the rebuilt network.

    Returns the model (eval mode, on CPU) and the checkpoint dictionary.
    """
    ckpt = load_checkpoint(path, expected_stage="autoencoder")
    model = autoencoder_from_args(ckpt["model_args"], **execution)
    load_weights(model, ckpt["state_dict"]["autoencoder"], path)
    return model.eval(), ckpt


def unet_args(df: Any, num_classes: int | None = None, num_covariates: int = 0) -> dict[str, Any]:
    """Constructor arguments of MONAI core's DiffusionModelUNet from the ``diffusion`` settings section.

    Args:
        df: the ``diffusion`` settings section.
        num_classes: classes of the categorical condition; one more embedding is added for "no class"
            (classifier-free guidance). None: no class conditioning.
        num_covariates: continuous covariates given as cross-attention context; the context has one more entry,
            a presence flag, so that an all-zero context means "no condition". 0: no cross-attention.
    """
    levels = len(df.num_channels)
    heads = df.num_head_channels
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * levels
    # MONAI core asks for a head size at every level; where attention is off the value is unused
    heads = [h if h > 0 else df.num_channels[i] for i, h in enumerate(heads)]
    return {
        "spatial_dims": df.spatial_dims,
        "in_channels": df.in_channels,
        "out_channels": df.out_channels,
        "channels": list(df.num_channels),
        "attention_levels": [bool(a) for a in df.attention_levels],
        "num_head_channels": heads,
        "num_res_blocks": list(df.num_res_blocks) if isinstance(df.num_res_blocks, (list, tuple)) else df.num_res_blocks,
        "norm_num_groups": df.norm_num_groups,
        "num_class_embeds": None if num_classes is None else num_classes + 1,
        "with_conditioning": num_covariates > 0,
        "cross_attention_dim": num_covariates + 1 if num_covariates > 0 else None,
    }


def build_unet(args: dict[str, Any], use_flash_attention: bool = False) -> DiffusionModelUNet:
    """MONAI core's DiffusionModelUNet from the architecture arguments of :func:`unet_args` (as stored in
    checkpoints; an older checkpoint's ``use_flash_attention`` is dropped) and the execution knob wanted now."""
    return DiffusionModelUNet(**architecture(args), use_flash_attention=use_flash_attention)
