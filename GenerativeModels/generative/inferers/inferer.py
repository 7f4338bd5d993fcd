# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
Inferers of monai-generative 0.2.3 on top of MONAI core's, which take the same arguments in the same order with the
same defaults; ``sample`` additionally accepts core's ``cfg`` and ``cfg_fill_value`` (classifier-free guidance, off
by default). They only call methods on the models and schedulers they are given, so this package's networks and
schedulers work with them.

``DiffusionInferer``, ``LatentDiffusionInferer`` and ``VQVAETransformerInferer`` are core's classes. The two
ControlNet inferers differ from core's in how they call the ControlNet, and here do what 0.2.3 did:

- 0.2.3 gave the ControlNet the noisy image alone; in ``mode="concat"`` core gives it the image with the condition
  channels appended, which a ControlNet built with 0.2.3's ``in_channels`` cannot take;
- 0.2.3 never gave the ControlNet the cross-attention ``context``; core does in ``mode="crossattn"``, which fails on
  a ControlNet built without ``with_conditioning``.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import ControlNetDiffusionInferer as _CoreControlNetDiffusionInferer
from monai.inferers import ControlNetLatentDiffusionInferer as _CoreControlNetLatentDiffusionInferer
from monai.inferers import DiffusionInferer, LatentDiffusionInferer, VQVAETransformerInferer

__all__ = [
    "ControlNetDiffusionInferer",
    "ControlNetLatentDiffusionInferer",
    "DiffusionInferer",
    "LatentDiffusionInferer",
    "VQVAETransformerInferer",
]


class _ControlNet023Call:
    """
    Call a ControlNet as 0.2.3's inferers did: on the first ``in_channels`` channels of ``x`` (the noisy image, without
    the condition that ``mode="concat"`` appends) and without ``context``.

    Args:
        controlnet: a ControlNet (this package's or MONAI core's).
    """

    def __init__(self, controlnet: Any) -> None:
        self.controlnet = controlnet
        in_channels = getattr(controlnet, "in_channels", None)
        if in_channels is None and hasattr(getattr(controlnet, "conv_in", None), "conv"):
            in_channels = controlnet.conv_in.conv.in_channels
        self.in_channels: int | None = in_channels  # None: a model of unknown input size gets ``x`` unchanged

    def __call__(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        controlnet_cond: torch.Tensor,
        context: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Any, torch.Tensor]:
        """
        Args:
            x: the diffusion model's input; only its first ``in_channels`` channels reach the ControlNet.
            timesteps: diffusion timesteps.
            controlnet_cond: the control image.
            context: cross-attention context, dropped (0.2.3 never gave it to the ControlNet).
            kwargs: passed on (e.g. ``conditioning_scale``).
        """
        if self.in_channels is not None:
            x = x[:, : self.in_channels]
        return self.controlnet(x=x, timesteps=timesteps, controlnet_cond=controlnet_cond, **kwargs)


def _wrap_controlnet(args: tuple, kwargs: dict, position: int) -> tuple[tuple, dict]:
    """Replace the ``controlnet`` argument (keyword, or positional at ``position``) by its 0.2.3-style call."""
    if "controlnet" in kwargs:
        if not isinstance(kwargs["controlnet"], _ControlNet023Call):
            kwargs = dict(kwargs, controlnet=_ControlNet023Call(kwargs["controlnet"]))
    elif len(args) > position and not isinstance(args[position], _ControlNet023Call):
        args = args[:position] + (_ControlNet023Call(args[position]),) + args[position + 1 :]
    return args, kwargs


class ControlNetDiffusionInferer(_CoreControlNetDiffusionInferer):
    """
    ``monai.inferers.ControlNetDiffusionInferer`` calling the ControlNet as monai-generative 0.2.3 did (see the
    module docstring). Arguments, order and defaults of ``__call__``, ``sample`` and ``get_likelihood`` are core's,
    which are 0.2.3's plus core's optional extras (``seg``, ``cfg``, ``cfg_fill_value``).

    Args:
        scheduler: the diffusion scheduler.
    """

    _controlnet_position = 2  # (inputs, diffusion_model, controlnet, ...)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        """Training forward pass: see ``monai.inferers.ControlNetDiffusionInferer.__call__``."""
        args, kwargs = _wrap_controlnet(args, kwargs, self._controlnet_position)
        return super().__call__(*args, **kwargs)

    def sample(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Reverse process: see ``monai.inferers.ControlNetDiffusionInferer.sample``."""
        args, kwargs = _wrap_controlnet(args, kwargs, self._controlnet_position)
        return super().sample(*args, **kwargs)

    def get_likelihood(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Log-likelihood: see ``monai.inferers.ControlNetDiffusionInferer.get_likelihood``."""
        args, kwargs = _wrap_controlnet(args, kwargs, self._controlnet_position)
        return super().get_likelihood(*args, **kwargs)


class ControlNetLatentDiffusionInferer(_CoreControlNetLatentDiffusionInferer, ControlNetDiffusionInferer):
    """
    ``monai.inferers.ControlNetLatentDiffusionInferer`` calling the ControlNet as monai-generative 0.2.3 did (see the
    module docstring): core's latent methods encode, then pass the ControlNet by keyword to the next class in the
    method resolution order, :class:`ControlNetDiffusionInferer`, which wraps it.
    Arguments, order and defaults are core's (0.2.3's plus optional extras).

    Args:
        scheduler: the diffusion scheduler.
        scale_factor: scale applied to the latents.
        ldm_latent_shape: spatial shape of the latents the diffusion model expects (crop/pad), or ``None``.
        autoencoder_latent_shape: spatial shape of the autoencoder's latents, or ``None``.
    """
