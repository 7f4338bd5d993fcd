"""Build networks from settings and rebuild them from self-describing checkpoints.

Stage 1 is either the fork's AutoencoderKL (``autoencoder.type: kl``) or MONAI core's VQVAE (``type: vq``). Code
that works on any stage-1 network goes through the small interface at the end of this module
(:func:`encode_to_latent`, :func:`decode_latent`, :func:`reconstruct`, :func:`latent_channels`, :func:`total_factor`,
:func:`latent_spatial`). The first three take an optional ``tile_size``: the KL autoencoder then runs in exact tiles
(``encode_tiled`` / ``decode_tiled``), the result equal to the whole-volume pass, memory bounded by the tile.

Checkpoints store a network's *architecture* arguments only. How it executes (``use_flash_attention``,
``use_checkpointing``) is not part of the architecture: it comes from the current settings, so a resumed run, stage 2
or sampling may switch it freely.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.nets import VQVAE, DiffusionModelUNet

from generative.networks.nets import AutoencoderKL

from . import geometry
from .checkpoints import load_checkpoint, load_weights
from .conditioning import NULL_PROJECTION
from .fileio import plain
from .settings import AutoencoderSettings, DiffusionSettings, vq_sampling_parameters


# constructor arguments that change how a network runs, not what it computes
EXECUTION_ARGS = ("use_flash_attention", "use_checkpointing")


def architecture(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` without the execution knobs (:data:`EXECUTION_ARGS`): what a checkpoint stores and compares."""
    return {k: v for k, v in args.items() if k not in EXECUTION_ARGS}


def autoencoder_args(ae: AutoencoderSettings) -> dict[str, Any]:
    """Architecture arguments of the fork's AutoencoderKL from the ``autoencoder`` settings section."""
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
        "use_convtranspose": ae.use_convtranspose,
        "downsample_factors": plain(ae.downsample_factors),
        "upsample_factors": plain(ae.upsample_factors),
        # AutoencoderKL.init_args (what checkpoints store) records these two only when they are not the default
        "initial_downsample_factor": plain(ae.initial_downsample_factor),
        "use_conv_downsample": ae.use_conv_downsample,
    }


def autoencoder_execution(ae: AutoencoderSettings) -> dict[str, Any]:
    """The execution knobs of the autoencoder from the ``autoencoder`` settings section."""
    return {"use_flash_attention": ae.use_flash_attention,
            "use_checkpointing": ae.training.use_gradient_checkpointing}


def vqvae_args(ae: AutoencoderSettings) -> dict[str, Any]:
    """Architecture arguments of MONAI core's VQVAE from the ``autoencoder`` settings section (``type: vq``; the
    network keys are in ``autoencoder.vqvae``, the defaults of the parameter lists filled in)."""
    vq = ae.vqvae
    down, up = vq_sampling_parameters(vq)
    return {
        "spatial_dims": ae.spatial_dims,
        "in_channels": ae.in_channels,
        "out_channels": ae.out_channels,
        "channels": plain(vq.num_channels),
        "num_res_layers": vq.num_res_layers,
        "num_res_channels": plain(vq.num_res_channels),
        "downsample_parameters": plain(down),
        "upsample_parameters": plain(up),
        "num_embeddings": vq.num_embeddings,
        "embedding_dim": vq.embedding_dim,
        "embedding_init": vq.embedding_init,
        "commitment_cost": vq.commitment_cost,
        "decay": vq.decay,
        "epsilon": vq.epsilon,
        "dropout": vq.dropout,
        "act": vq.act.upper(),
        "output_act": None if vq.output_act is None else vq.output_act.upper(),
    }


def is_vq_args(args: dict[str, Any]) -> bool:
    """Whether stored stage-1 arguments describe a VQ-VAE (they have a codebook) rather than an AutoencoderKL."""
    return "num_embeddings" in args


def build_autoencoder(ae: AutoencoderSettings) -> nn.Module:
    """The stage-1 network described by the ``autoencoder`` settings section (AutoencoderKL or VQVAE)."""
    if ae.type == "vq":
        return autoencoder_from_args(vqvae_args(ae), **autoencoder_execution(ae))
    return AutoencoderKL(**autoencoder_args(ae), **autoencoder_execution(ae))


def autoencoder_from_args(args: dict[str, Any], **execution: Any) -> nn.Module:
    """The stage-1 network from stored architecture arguments (older checkpoints also stored the execution knobs;
    they are dropped) and the execution knobs wanted now.

    A VQ-VAE (see :func:`is_vq_args`) is MONAI core's VQVAE; it has no flash attention, so that knob is ignored. Like
    the fork's AutoencoderKL it carries its arguments as ``init_args`` (what checkpoints store).
    """
    if not is_vq_args(args):
        return AutoencoderKL(**architecture(args), **execution)
    arch = architecture(args)
    checkpointing = bool(execution.get("use_checkpointing", False))
    model = VQVAE(**{**arch, "downsample_parameters": [tuple(p) for p in arch["downsample_parameters"]],
                     "upsample_parameters": [tuple(p) for p in arch["upsample_parameters"]]},
                  use_checkpointing=checkpointing)
    model.init_args = {**arch, "use_checkpointing": checkpointing}
    return model


def load_autoencoder(path: str | Path, **execution: Any) -> tuple[nn.Module, dict[str, Any]]:
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


def unet_args(df: DiffusionSettings, num_classes: int | None = None, num_covariates: int = 0) -> dict[str, Any]:
    """Constructor arguments of MONAI core's DiffusionModelUNet from the ``diffusion`` settings section.

    Args:
        df: the ``diffusion`` settings section.
        num_classes: classes of the categorical condition; one more embedding is added for "no class"
            (classifier-free guidance). None: no class conditioning.
        num_covariates: continuous covariates given as cross-attention context; the context has one more entry,
            a presence flag, so that an all-zero context means "no condition". 0: no cross-attention.

    With ``df.condition_channels`` set (projection conditioning) the cross-attention context is the projection
    encoder's tokens, of size ``df.condition_embed_dim``.
    """
    levels = len(df.num_channels)
    heads = df.num_head_channels
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * levels
    # MONAI core asks for a head size at every level; where attention is off the value is unused
    heads = [h if h > 0 else df.num_channels[i] for i, h in enumerate(heads)]
    context_dim = None
    if getattr(df, "condition_channels", None) is not None:  # a projection condition: context tokens of this size
        context_dim = df.condition_embed_dim
    elif num_covariates > 0:
        context_dim = num_covariates + 1
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
        "with_conditioning": context_dim is not None,
        "cross_attention_dim": context_dim,
    }


def build_unet(args: dict[str, Any], use_flash_attention: bool = False) -> DiffusionModelUNet:
    """MONAI core's DiffusionModelUNet from the architecture arguments of :func:`unet_args` (as stored in
    checkpoints; an older checkpoint's ``use_flash_attention`` is dropped) and the execution knob wanted now."""
    return DiffusionModelUNet(**architecture(args), use_flash_attention=use_flash_attention)


# ----------------------------------------------------------------------------------------------------------------
# one interface over both stage-1 networks
# ----------------------------------------------------------------------------------------------------------------


def is_vq(autoencoder: nn.Module) -> bool:
    """Whether a stage-1 network is the VQ-VAE (MONAI core's VQVAE)."""
    return isinstance(autoencoder, VQVAE)


def latent_channels(autoencoder: nn.Module) -> int:
    """Channels of the latent the diffusion UNet works on: ``latent_channels`` (KL) or ``embedding_dim`` (VQ)."""
    return int(autoencoder.embedding_dim if is_vq(autoencoder) else autoencoder.latent_channels)


def total_factor(autoencoder: nn.Module) -> tuple[int, ...]:
    """Total downsample factor per spatial axis (VQ-VAE: the product of its downsampling strides)."""
    if not is_vq(autoencoder):
        return tuple(autoencoder.total_downsample_factor)
    return geometry.vq_total_factor(autoencoder.init_args["downsample_parameters"], autoencoder.spatial_dims)


def latent_spatial(autoencoder: nn.Module, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """The latent's spatial size for volumes of ``spatial`` voxels.

    Raises:
        ValueError: when a size is not divisible by the total factor of its axis (naming the axis and the factor).
    """
    if not is_vq(autoencoder):
        return tuple(autoencoder.latent_shape(tuple(spatial)))
    factor = total_factor(autoencoder)
    if len(spatial) != len(factor):
        raise ValueError(f"expected {len(factor)} spatial sizes, got {list(spatial)}")
    try:
        return geometry.latent_shape(spatial, factor)
    except ValueError as e:
        raise ValueError(f"the VQ-VAE's total downsample factor is {factor[0]} per axis; {e}") from None


def _tile(autoencoder: nn.Module, tile_size: Sequence[int] | None) -> tuple[int, ...] | None:
    """``tile_size`` as a tuple, or None; refused for a network without exact tiling (the VQ-VAE)."""
    if tile_size is None:
        return None
    if is_vq(autoencoder):
        raise ValueError(f"tile size {list(tile_size)}: exact tiled encoding and decoding is for the KL autoencoder "
                         f"(autoencoder.type: kl); the VQ-VAE runs whole volumes")
    return tuple(int(t) for t in tile_size)


def encode_to_latent(
    autoencoder: nn.Module, images: torch.Tensor, tile_size: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What stage 2 learns from: the latent mean and standard deviation of ``images``.

    KL: the encoder's ``z_mu`` and ``z_sigma``; with ``tile_size`` (``autoencoder.tile_size``) computed by the exact
    tiled encoder (``encode_tiled``: the same numbers up to float rounding, memory bounded by the tile). VQ-VAE: the
    quantised latent (the codebook vectors the decoder reads, as the seed system and MONAI's
    ``encode_stage_2_inputs`` use) with a standard deviation of zero, so that drawing a latent gives the quantised
    one. The network should be in eval mode (a VQ-VAE in training mode updates its codebook while quantising).
    """
    tile = _tile(autoencoder, tile_size)
    if is_vq(autoencoder):
        z = autoencoder.encode_stage_2_inputs(images)
        return z, torch.zeros_like(z)
    if tile is not None:
        return autoencoder.encode_tiled(images, tile_size=tile)
    return autoencoder.encode(images)


def decode_latent(autoencoder: nn.Module, z: torch.Tensor, tile_size: Sequence[int] | None = None,
                  progress: bool = False) -> torch.Tensor:
    """A (unscaled) latent back to an image: KL ``decode`` (``decode_tiled`` with ``tile_size``: exact, bounded
    memory, with a progress bar of its tile passes when ``progress``); the VQ-VAE quantises to its codebook first
    (``decode_stage_2_outputs``)."""
    tile = _tile(autoencoder, tile_size)
    if tile is not None:
        return autoencoder.decode_tiled(z, tile_size=tile, progress=progress)
    return autoencoder.decode_stage_2_outputs(z)


def reconstruct(autoencoder: nn.Module, images: torch.Tensor, tile_size: Sequence[int] | None = None) -> torch.Tensor:
    """``images`` through the whole stage-1 network (KL: the mean latent, no sampling; VQ: quantised). With
    ``tile_size`` (KL only) the encoder and decoder run in exact tiles: the result equals the whole-volume pass up to
    float rounding, with memory bounded by the tile. KL: a volume whose size the total downsample factor does not
    divide (a whole validation volume) is padded with zeros at the end of each axis to the next multiple, and the
    reconstruction cropped back to its size."""
    tile = _tile(autoencoder, tile_size)
    if is_vq(autoencoder):
        return autoencoder(images)[0]
    sizes = images.shape[2:]
    padded = geometry.rounded_up(sizes, total_factor(autoencoder))
    if list(sizes) != padded:
        pads = [p for n, m in zip(reversed(sizes), reversed(padded)) for p in (0, m - n)]
        images = torch.nn.functional.pad(images, pads)
    if tile is not None:
        z_mu, _ = autoencoder.encode_tiled(images, tile_size=tile)
        out = autoencoder.decode_tiled(z_mu, tile_size=tile)
    else:
        out = autoencoder.reconstruct(images)
    return out[(..., *(slice(0, n) for n in sizes))]


def code_usage(indices: torch.Tensor, num_embeddings: int) -> tuple[float, float]:
    """Codebook usage of a batch of code indices.

    Args:
        indices: the code chosen at every latent voxel (any shape, integers in ``[0, num_embeddings)``).
        num_embeddings: codebook size.

    Returns:
        ``(perplexity, fraction_used)``: perplexity is exp of the entropy of the code histogram (1 when one code is
        used everywhere, ``num_embeddings`` when all are used equally); fraction_used is the share of codes used at
        least once.
    """
    if num_embeddings < 1:
        raise ValueError(f"num_embeddings must be >= 1, got {num_embeddings}")
    counts = torch.bincount(indices.flatten().long(), minlength=num_embeddings).double()
    if counts.numel() != num_embeddings:
        raise ValueError(f"indices must lie in [0, {num_embeddings}), got a maximum of {int(indices.max())}")
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(entropy.exp()), float((counts > 0).double().mean())


# ------------------------------------------------------------------------------------------ projection conditioning
class ProjectionEncoder(nn.Module):
    """A small 2D CNN that turns a projection image into cross-attention context tokens.

    Stride-2 convolutions (MONAI ``Convolution``: 3x3, GroupNorm, Swish) halve the image once per entry of
    ``channels``; a 1x1 convolution maps the last feature map to ``embed_dim``; each of its pixels is one token, with
    a learned position embedding added (the image size is fixed, so the token grid is too).

    Args:
        in_channels: channels of the projection (the image channels).
        embed_dim: size of each token (the UNet's ``cross_attention_dim``).
        image_size: ``(H, W)`` of the projection the encoder takes.
        channels: channels of the stride-2 convolutions, one halving each.
    """

    def __init__(self, in_channels: int, embed_dim: int, image_size: Sequence[int], channels: Sequence[int]) -> None:
        super().__init__()
        if in_channels < 1 or embed_dim < 1:
            raise ValueError(f"in_channels and embed_dim must be >= 1, got {in_channels} and {embed_dim}")
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size must be two positive ints (H, W), got {list(image_size)}")
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive ints, got {list(channels)}")
        self.init_args = {"in_channels": in_channels, "embed_dim": embed_dim,
                          "image_size": [int(v) for v in image_size], "channels": [int(c) for c in channels]}
        layers, previous = [], in_channels
        for c in channels:
            layers.append(Convolution(2, previous, c, strides=2, kernel_size=3, act="swish",
                                      norm=("group", {"num_groups": math.gcd(c, 8)})))
            previous = c
        layers.append(nn.Conv2d(previous, embed_dim, kernel_size=1))
        self.net = nn.Sequential(*layers)
        grid = list(image_size)
        for _ in channels:
            grid = [(g + 1) // 2 for g in grid]  # a 3x3 stride-2 convolution with padding 1
        self.num_tokens = grid[0] * grid[1]
        self.position = nn.Parameter(torch.randn(1, self.num_tokens, embed_dim) * 0.02)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` projection -> ``(B, tokens, embed_dim)`` context."""
        expected = (self.init_args["in_channels"], *self.init_args["image_size"])
        if tuple(image.shape[1:]) != expected:
            raise ValueError(f"projection condition of shape {tuple(image.shape[1:])}, expected {expected}")
        features = self.net(image)
        return features.flatten(2).transpose(1, 2) + self.position


class ProjectionConditionedUNet(nn.Module):
    """MONAI's DiffusionModelUNet (built with cross-attention) and the :class:`ProjectionEncoder` whose tokens are
    its context, trained together as one network: ``forward(x, timesteps, projection=...)``.

    With ``concat_axis`` the projection also reaches the UNet spatially aligned: resized (area average) to the
    input's grid across that axis, repeated along it, and concatenated to the input as extra channels, so every
    voxel sees the projection value of its own column (the UNet then has ``in_channels`` + the projection's
    channels inputs).

    Args:
        unet: the DiffusionModelUNet, ``with_conditioning=True``, ``cross_attention_dim`` = the encoder's
            ``embed_dim``.
        encoder: the projection encoder.
        concat_axis: the spatial axis (0-based) the projection was summed along, or None: tokens only.
    """

    def __init__(self, unet: DiffusionModelUNet, encoder: ProjectionEncoder, concat_axis: int | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.encoder = encoder
        self.concat_axis = concat_axis

    def spread(self, projection: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        """``(B, C, H, W)`` projection -> ``(B, C, *spatial)``: area-resized to ``spatial`` without the projection
        axis, repeated along it."""
        axis = self.concat_axis
        assert axis is not None
        plane = [n for i, n in enumerate(spatial) if i != axis]
        if list(projection.shape[2:]) != plane:
            projection = torch.nn.functional.interpolate(projection, size=plane, mode="area")
        shape = list(projection.shape[:2]) + list(spatial)
        return projection.unsqueeze(2 + axis).expand(shape)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, projection: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's output with the projection's tokens as context; no ``projection`` means "no condition" (the
        null projection of classifier-free guidance). ``context`` must be None: the tokens are the context."""
        if context is not None:
            raise ValueError("a projection-conditioned UNet makes its own context; pass projection=, not context=")
        if projection is None:
            a = self.encoder.init_args
            projection = torch.full((x.shape[0], a["in_channels"], *a["image_size"]), NULL_PROJECTION,
                                    device=x.device, dtype=x.dtype)
        projection = projection.to(x.dtype)
        if self.concat_axis is not None:
            x = torch.cat([x, self.spread(projection, x.shape[2:])], dim=1)
        return self.unet(x, timesteps, context=self.encoder(projection), class_labels=class_labels)


def projection_encoder_args(df: DiffusionSettings, voxel_size: Sequence[int]) -> dict[str, Any] | None:
    """Arguments of the :class:`ProjectionEncoder` of a ``diffusion`` settings section (None without
    ``condition_channels``): the projection of a ``voxel_size`` image along ``df.projection_axis``."""
    if getattr(df, "condition_channels", None) is None:
        return None
    size = [int(v) for i, v in enumerate(voxel_size) if i != df.projection_axis]
    return {"in_channels": df.condition_channels, "embed_dim": df.condition_embed_dim, "image_size": size,
            "channels": [int(c) for c in df.condition_encoder_channels],
            "concat_axis": int(df.projection_axis) if df.condition_concat else None}


# keys of a checkpoint's ``condition_encoder`` that are the encoder's own arguments (the rest describe the wiring)
_ENCODER_KEYS = ("in_channels", "embed_dim", "image_size", "channels")


def build_diffusion_network(args: dict[str, Any], encoder_args: dict[str, Any] | None = None,
                            use_flash_attention: bool = False) -> nn.Module:
    """The stage-2 network: :func:`build_unet`, wrapped with its :class:`ProjectionEncoder` when ``encoder_args``
    (as stored in a checkpoint's ``condition_encoder``) are given."""
    if encoder_args is None:
        return build_unet(args, use_flash_attention)
    if args.get("cross_attention_dim") != encoder_args["embed_dim"]:
        raise ValueError(f"the UNet's cross_attention_dim ({args.get('cross_attention_dim')}) must equal the "
                         f"projection encoder's embed_dim ({encoder_args['embed_dim']})")
    concat_axis = encoder_args.get("concat_axis")  # absent in checkpoints written before it existed: tokens only
    if concat_axis is not None:  # the UNet also reads the spread projection as input channels
        args = {**args, "in_channels": args["in_channels"] + encoder_args["in_channels"]}
    encoder = ProjectionEncoder(**{k: encoder_args[k] for k in _ENCODER_KEYS})
    return ProjectionConditionedUNet(build_unet(args, use_flash_attention), encoder, concat_axis)
