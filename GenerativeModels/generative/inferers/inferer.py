# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
Inferers of monai-generative on top of MONAI core's, which take 0.2.3's arguments in the same order with the same
defaults; ``sample`` additionally accepts core's ``cfg`` and ``cfg_fill_value`` (classifier-free guidance, off by
default). They only call methods on the models and schedulers they are given, so this package's networks and
schedulers work with them. This module tracks upstream's final main (0.2.3 plus #477 and #481):

- ``DiffusionInferer`` and ``VQVAETransformerInferer`` are core's classes.
- ``LatentDiffusionInferer`` and ``ControlNetLatentDiffusionInferer``: ``__call__`` and ``get_likelihood`` take
  upstream main's ``quantized`` flag (last argument, default ``True``): with a VQ-VAE as the autoencoder,
  ``quantized=False`` gives the diffusion model the encoder's output before quantisation (#481). Other
  autoencoders ignore it.
- The two ControlNet inferers give the ControlNet the same input as the diffusion model, as upstream main does
  (#477, a fix): in ``mode="concat"`` the noisy image with the condition channels appended, in
  ``mode="crossattn"`` the ``context``. 0.2.3 gave the ControlNet the noisy image alone and never the context, so
  ControlNets trained with 0.2.3 were built for that; to keep them working, a ControlNet whose ``in_channels``
  is smaller than the diffusion model's input gets the first ``in_channels`` channels (the image), and one built
  without ``with_conditioning`` gets no ``context``. Both cases fail in upstream main and in core, so no call
  that works there changes. MONAI core before 1.5 called the ControlNet as 0.2.3 did; there the inferers add the
  condition channels and the ``context`` themselves, so the behaviour is the same on every supported MONAI.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import monai
import torch
from monai.inferers import ControlNetDiffusionInferer as _CoreControlNetDiffusionInferer
from monai.inferers import ControlNetLatentDiffusionInferer as _CoreControlNetLatentDiffusionInferer
from monai.inferers import DiffusionInferer, VQVAETransformerInferer
from monai.inferers import LatentDiffusionInferer as _CoreLatentDiffusionInferer
from monai.networks.nets import VQVAE as _CoreVQVAE

__all__ = [
    "ControlNetDiffusionInferer",
    "ControlNetLatentDiffusionInferer",
    "DiffusionInferer",
    "LatentDiffusionInferer",
    "VQVAETransformerInferer",
]


class _UnquantizedVQVAE:
    """
    A VQ-VAE seen through ``encode_stage_2_inputs(x, quantized=False)``: the inferers of core call
    ``encode_stage_2_inputs(x)`` alone, so this stand-in answers it with the latents before quantisation and passes
    every other attribute to the model.

    Args:
        vqvae: a VQ-VAE (this package's or MONAI core's).
    """

    def __init__(self, vqvae: _CoreVQVAE) -> None:
        self._vqvae = vqvae

    def encode_stage_2_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's output before quantisation (the codebook is still consulted, as upstream did)."""
        z = self._vqvae.encode(x)
        self._vqvae.quantize(z)
        return z

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vqvae, name)


def _stage_1(autoencoder_model: Any, quantized: bool) -> Any:
    """``autoencoder_model``, or for ``quantized=False`` and a VQ-VAE its unquantised stand-in."""
    if not quantized and isinstance(autoencoder_model, _CoreVQVAE):
        return _UnquantizedVQVAE(autoencoder_model)
    return autoencoder_model


class LatentDiffusionInferer(_CoreLatentDiffusionInferer):
    """
    ``monai.inferers.LatentDiffusionInferer`` with upstream main's ``quantized`` flag on ``__call__`` and
    ``get_likelihood`` (see the module docstring); everything else is core's.

    Args:
        scheduler: the diffusion scheduler.
        scale_factor: scale applied to the latents.
        ldm_latent_shape: spatial shape of the latents the diffusion model expects (crop/pad), or ``None``.
        autoencoder_latent_shape: spatial shape of the autoencoder's latents, or ``None``.
    """

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        autoencoder_model: Any,
        diffusion_model: Any,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor | None = None,
        mode: str = "crossattn",
        seg: torch.Tensor | None = None,
        quantized: bool = True,
    ) -> torch.Tensor:
        """
        Training forward pass: see ``monai.inferers.LatentDiffusionInferer.__call__``.

        Args:
            quantized: with a VQ-VAE, ``False`` trains on the latents before quantisation.
        """
        return super().__call__(
            inputs=inputs,
            autoencoder_model=_stage_1(autoencoder_model, quantized),
            diffusion_model=diffusion_model,
            noise=noise,
            timesteps=timesteps,
            condition=condition,
            mode=mode,
            seg=seg,
        )

    def get_likelihood(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        autoencoder_model: Any,
        diffusion_model: Any,
        scheduler: Any = None,
        save_intermediates: bool | None = False,
        conditioning: torch.Tensor | None = None,
        mode: str = "crossattn",
        original_input_range: tuple | None = (0, 255),
        scaled_input_range: tuple | None = (0, 1),
        verbose: bool = True,
        resample_latent_likelihoods: bool = False,
        resample_interpolation_mode: str = "nearest",
        seg: torch.Tensor | None = None,
        quantized: bool = True,
    ) -> Any:
        """
        Log-likelihood of the latents: see ``monai.inferers.LatentDiffusionInferer.get_likelihood``.

        Args:
            quantized: with a VQ-VAE, ``False`` evaluates the latents before quantisation.
        """
        return super().get_likelihood(
            inputs=inputs,
            autoencoder_model=_stage_1(autoencoder_model, quantized),
            diffusion_model=diffusion_model,
            scheduler=scheduler,
            save_intermediates=save_intermediates,
            conditioning=conditioning,
            mode=mode,
            original_input_range=original_input_range,
            scaled_input_range=scaled_input_range,
            verbose=verbose,
            resample_latent_likelihoods=resample_latent_likelihoods,
            resample_interpolation_mode=resample_interpolation_mode,
            seg=seg,
        )


# MONAI core 1.5 made its ControlNet inferers pass the diffusion model's input and context to the ControlNet (as
# upstream's #477 did); before that core passed the noisy image alone.
_CORE_GIVES_CONTROLNET_THE_CONDITION = tuple(int(n) for n in re.findall(r"\d+", monai.__version__)[:2]) >= (1, 5)


class _ControlNetCall:
    """
    Call a ControlNet as upstream main does (the diffusion model's input and ``context``), except where the
    ControlNet was built the 0.2.3 way and that call cannot work: a ControlNet with fewer ``in_channels`` than ``x``
    gets the first ``in_channels`` channels (the noisy image without the ``concat`` condition), one without
    ``with_conditioning`` gets no ``context``.

    Args:
        controlnet: a ControlNet (this package's or MONAI core's).
        mode: the conditioning mode of the call, when core does not pass the condition itself (MONAI < 1.5).
        condition: the condition of the call in that case (``None`` otherwise).
    """

    def __init__(self, controlnet: Any, mode: str | None = None, condition: torch.Tensor | None = None) -> None:
        self.controlnet = controlnet
        self.mode = mode
        self.condition = condition
        in_channels = getattr(controlnet, "in_channels", None)
        if in_channels is None and hasattr(getattr(controlnet, "conv_in", None), "conv"):
            in_channels = controlnet.conv_in.conv.in_channels
        self.in_channels: int | None = in_channels  # None: a model of unknown input size gets ``x`` unchanged
        self.takes_context: bool = bool(getattr(controlnet, "with_conditioning", True))

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
            x: the diffusion model's input.
            timesteps: diffusion timesteps.
            controlnet_cond: the control image.
            context: cross-attention context.
            kwargs: passed on (e.g. ``conditioning_scale``).
        """
        if self.condition is not None:  # MONAI < 1.5: core gave the image alone; give what upstream main gives
            if self.mode == "concat":
                x = torch.cat([x, self.condition], dim=1)
            else:
                context = self.condition
        if self.in_channels is not None and x.shape[1] > self.in_channels:
            x = x[:, : self.in_channels]
        if not self.takes_context:
            context = None
        return self.controlnet(x=x, timesteps=timesteps, controlnet_cond=controlnet_cond, context=context, **kwargs)


def _wrap_controlnet(method: Any, args: tuple, kwargs: dict, position: int) -> tuple[tuple, dict]:
    """
    Replace the ``controlnet`` argument (keyword, or positional at ``position``) of a call to ``method`` (core's
    ``__call__``, ``sample`` or ``get_likelihood``, unbound) by its call wrapper.
    """
    if "controlnet" in kwargs:
        controlnet = kwargs["controlnet"]
    elif len(args) > position:
        controlnet = args[position]
    else:
        return args, kwargs  # missing: let core report it
    if isinstance(controlnet, _ControlNetCall):
        return args, kwargs
    mode, condition = None, None
    if not _CORE_GIVES_CONTROLNET_THE_CONDITION:
        bound = inspect.signature(method).bind(None, *args, **kwargs)
        bound.apply_defaults()
        mode = bound.arguments["mode"]
        condition = bound.arguments.get("condition", bound.arguments.get("conditioning"))
    wrapped = _ControlNetCall(controlnet, mode, condition)
    if "controlnet" in kwargs:
        return args, dict(kwargs, controlnet=wrapped)
    return args[:position] + (wrapped,) + args[position + 1 :], kwargs


class ControlNetDiffusionInferer(_CoreControlNetDiffusionInferer):
    """
    ``monai.inferers.ControlNetDiffusionInferer`` calling the ControlNet as upstream main does, and 0.2.3-built
    ControlNets as 0.2.3 did (see the module docstring). Arguments, order and defaults of ``__call__``, ``sample`` and ``get_likelihood`` are core's,
    which are 0.2.3's plus core's optional extras (``seg``, ``cfg``, ``cfg_fill_value``).

    Args:
        scheduler: the diffusion scheduler.
    """

    _controlnet_position = 2  # (inputs, diffusion_model, controlnet, ...)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        """Training forward pass: see ``monai.inferers.ControlNetDiffusionInferer.__call__``."""
        args, kwargs = _wrap_controlnet(
            _CoreControlNetDiffusionInferer.__call__, args, kwargs, self._controlnet_position
        )
        return super().__call__(*args, **kwargs)

    def sample(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Reverse process: see ``monai.inferers.ControlNetDiffusionInferer.sample``."""
        args, kwargs = _wrap_controlnet(
            _CoreControlNetDiffusionInferer.sample, args, kwargs, self._controlnet_position
        )
        return super().sample(*args, **kwargs)

    def get_likelihood(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Log-likelihood: see ``monai.inferers.ControlNetDiffusionInferer.get_likelihood``."""
        args, kwargs = _wrap_controlnet(
            _CoreControlNetDiffusionInferer.get_likelihood, args, kwargs, self._controlnet_position
        )
        return super().get_likelihood(*args, **kwargs)


class ControlNetLatentDiffusionInferer(_CoreControlNetLatentDiffusionInferer, ControlNetDiffusionInferer):
    """
    ``monai.inferers.ControlNetLatentDiffusionInferer`` calling the ControlNet as :class:`ControlNetDiffusionInferer`
    does (core's latent methods encode, then pass the ControlNet by keyword to the next class in the method
    resolution order, :class:`ControlNetDiffusionInferer`, which wraps it), with upstream main's ``quantized`` flag on
    ``__call__`` and ``get_likelihood``. Arguments, order and defaults are core's (0.2.3's plus optional extras).

    Args:
        scheduler: the diffusion scheduler.
        scale_factor: scale applied to the latents.
        ldm_latent_shape: spatial shape of the latents the diffusion model expects (crop/pad), or ``None``.
        autoencoder_latent_shape: spatial shape of the autoencoder's latents, or ``None``.
    """

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        autoencoder_model: Any,
        diffusion_model: Any,
        controlnet: Any,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        cn_cond: torch.Tensor,
        condition: torch.Tensor | None = None,
        mode: str = "crossattn",
        seg: torch.Tensor | None = None,
        quantized: bool = True,
    ) -> torch.Tensor:
        """
        Training forward pass: see ``monai.inferers.ControlNetLatentDiffusionInferer.__call__``.

        Args:
            quantized: with a VQ-VAE, ``False`` trains on the latents before quantisation.
        """
        return super().__call__(
            inputs=inputs,
            autoencoder_model=_stage_1(autoencoder_model, quantized),
            diffusion_model=diffusion_model,
            controlnet=controlnet,
            noise=noise,
            timesteps=timesteps,
            cn_cond=cn_cond,
            condition=condition,
            mode=mode,
            seg=seg,
        )

    def get_likelihood(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        autoencoder_model: Any,
        diffusion_model: Any,
        controlnet: Any,
        cn_cond: torch.Tensor,
        scheduler: Any = None,
        save_intermediates: bool | None = False,
        conditioning: torch.Tensor | None = None,
        mode: str = "crossattn",
        original_input_range: tuple | None = (0, 255),
        scaled_input_range: tuple | None = (0, 1),
        verbose: bool = True,
        resample_latent_likelihoods: bool = False,
        resample_interpolation_mode: str = "nearest",
        seg: torch.Tensor | None = None,
        quantized: bool = True,
    ) -> Any:
        """
        Log-likelihood of the latents: see ``monai.inferers.ControlNetLatentDiffusionInferer.get_likelihood``.

        Args:
            quantized: with a VQ-VAE, ``False`` evaluates the latents before quantisation.
        """
        return super().get_likelihood(
            inputs=inputs,
            autoencoder_model=_stage_1(autoencoder_model, quantized),
            diffusion_model=diffusion_model,
            controlnet=controlnet,
            cn_cond=cn_cond,
            scheduler=scheduler,
            save_intermediates=save_intermediates,
            conditioning=conditioning,
            mode=mode,
            original_input_range=original_input_range,
            scaled_input_range=scaled_input_range,
            verbose=verbose,
            resample_latent_likelihoods=resample_latent_likelihoods,
            resample_interpolation_mode=resample_interpolation_mode,
            seg=seg,
        )
