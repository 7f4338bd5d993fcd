"""Build networks from settings and rebuild them from self-describing checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
