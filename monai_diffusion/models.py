"""Build networks from settings and rebuild them from self-describing checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monai.networks.nets import DiffusionModelUNet

from generative.networks.nets import AutoencoderKL

from .engine import RunError, load_checkpoint


def autoencoder_args(ae: Any) -> dict[str, Any]:
    """Constructor arguments of the fork's AutoencoderKL from the ``autoencoder`` settings section."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return {
        "spatial_dims": ae.spatial_dims,
        "in_channels": ae.in_channels,
        "out_channels": ae.out_channels,
        "num_channels": plain(ae.num_channels),
        "num_res_blocks": plain(ae.num_res_blocks),
        "attention_levels": plain(ae.attention_levels),
        "latent_channels": ae.latent_channels,
        "norm_num_groups": ae.norm_num_groups,
        "with_encoder_nonlocal_attn": ae.with_encoder_nonlocal_attn,
        "with_decoder_nonlocal_attn": ae.with_decoder_nonlocal_attn,
        "use_flash_attention": ae.use_flash_attention,
        "use_checkpointing": ae.training.use_gradient_checkpointing,
        "use_convtranspose": ae.use_convtranspose,
        "downsample_factors": plain(ae.downsample_factors),
        "upsample_factors": plain(ae.upsample_factors),
    }


def build_autoencoder(ae: Any) -> AutoencoderKL:
    """The stage-1 network described by the ``autoencoder`` settings section."""
    return AutoencoderKL(**autoencoder_args(ae))


def load_autoencoder(path: str | Path) -> tuple[AutoencoderKL, dict[str, Any]]:
    """Rebuild the autoencoder of a stage-1 checkpoint from the checkpoint alone (not from any YAML).

    Returns the model (eval mode, on CPU) and the checkpoint dictionary.
    """
    ckpt = load_checkpoint(path, expected_stage="autoencoder")
    args = ckpt.get("model_args")
    if not isinstance(args, dict):
        raise RunError(f"{path} has no 'model_args': it does not describe the autoencoder it holds.")
    model = AutoencoderKL(**args)
    model.load_state_dict(ckpt["state_dict"]["autoencoder"])
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
        "use_flash_attention": df.use_flash_attention,
        "num_class_embeds": None if num_classes is None else num_classes + 1,
        "with_conditioning": num_covariates > 0,
        "cross_attention_dim": num_covariates + 1 if num_covariates > 0 else None,
    }


def build_unet(args: dict[str, Any]) -> DiffusionModelUNet:
    """MONAI core's DiffusionModelUNet from the arguments of :func:`unet_args` (as stored in checkpoints)."""
    return DiffusionModelUNet(**args)
