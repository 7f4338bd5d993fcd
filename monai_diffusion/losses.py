"""Reconstruction losses of stage 1 and the input corruption of both stages (see docs/losses.md).

* :func:`build_reconstruction_loss` turns ``autoencoder.training.loss`` into a :class:`ReconstructionLoss`, a callable
  ``loss(recon, target) -> (loss, logs)``: l1, mse, foreground-weighted l1/mse, soft Dice (MONAI ``DiceLoss``), or
  Dice + weighted. ``logs`` holds the scalars the training log shows for it.
* :func:`corrupt` applies ``autoencoder.training.denoising`` / ``diffusion.training.input_noise``: Gaussian noise,
  voxel dropout, or both, drawn from the torch random state (or a given generator), so that a resumed run draws
  the same corruption as an uninterrupted one.

Public API: :func:`build_reconstruction_loss`, :class:`ReconstructionLoss`, :func:`weighted_reconstruction_loss`,
:func:`corrupt`, :data:`LOSS_TYPES`, :data:`NOISE_TYPES`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from .settings import CorruptionSettings, ReconstructionLossSettings

__all__ = [
    "LOSS_TYPES",
    "NOISE_TYPES",
    "ReconstructionLoss",
    "build_reconstruction_loss",
    "corrupt",
    "weighted_reconstruction_loss",
]

LOSS_TYPES = ("l1", "mse", "weighted", "dice", "combined")
NOISE_TYPES = ("gaussian", "dropout", "mixed")
ERROR_TYPES = ("l1", "mse")


# ---------------------------------------------------------------------------------------------------- losses
def _check_pair(recon: torch.Tensor, target: torch.Tensor) -> None:
    if recon.shape != target.shape:
        raise ValueError(f"recon and target must have the same shape, got {tuple(recon.shape)} and "
                         f"{tuple(target.shape)}")


def _voxel_error(recon: torch.Tensor, target: torch.Tensor, error: str) -> torch.Tensor:
    if error == "l1":
        return (recon - target).abs()
    if error == "mse":
        return (recon - target).pow(2)
    raise ValueError(f"error must be one of {ERROR_TYPES}, got {error!r}")


def weighted_reconstruction_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    error: str = "l1",
    foreground_weight: float = 20.0,
    background_weight: float = 1.0,
    threshold: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Foreground-weighted reconstruction loss: ``mean(w * e)`` over all voxels, with ``e = |recon - target|``
    (l1) or ``(recon - target)^2`` (mse) and ``w = foreground_weight`` where ``target > threshold``,
    ``background_weight`` elsewhere.

    Args:
        recon: the reconstruction, any shape.
        target: the clean volume, the shape of ``recon``; it alone decides which voxels are foreground.
        error: ``"l1"`` or ``"mse"``.
        foreground_weight: weight of foreground voxels (> 0).
        background_weight: weight of background voxels (>= 0).
        threshold: target intensity above which a voxel is foreground.

    Returns:
        The loss (a scalar with gradients) and detached diagnostics: ``fg_<error>`` and ``bg_<error>`` (the
        unweighted mean error over foreground and background voxels, 0 where there are none) and ``fg_fraction``.
    """
    _check_pair(recon, target)
    if not foreground_weight > 0:
        raise ValueError(f"foreground_weight must be > 0, got {foreground_weight}")
    if background_weight < 0:
        raise ValueError(f"background_weight must be >= 0, got {background_weight}")
    err = _voxel_error(recon, target, error)
    foreground = target > threshold
    weights = torch.where(foreground, foreground_weight, background_weight).to(err.dtype)
    loss = (err * weights).mean()
    with torch.no_grad():
        fg = foreground.to(err.dtype)
        n_fg, n_all = fg.sum(), float(err.numel())
        err_fg = (err * fg).sum()
        logs = {
            f"fg_{error}": err_fg / n_fg.clamp(min=1),
            f"bg_{error}": (err.sum() - err_fg) / (n_all - n_fg).clamp(min=1),
            "fg_fraction": n_fg / n_all,
        }
    return loss, logs


class ReconstructionLoss:
    """Stage 1's reconstruction loss: ``loss(recon, target) -> (loss, logs)``.

    Args:
        loss_type: ``"l1"``, ``"mse"``, ``"weighted"``, ``"dice"`` or ``"combined"``.
        error: per-voxel error of the weighted term (``"l1"`` or ``"mse"``; weighted and combined).
        foreground_weight: weight of foreground voxels (weighted and combined).
        background_weight: weight of background voxels (weighted and combined).
        threshold: target intensity above which a voxel is foreground (weighted and combined).
        dice_smooth: smoothing term added to numerator and denominator of the Dice ratio (dice and combined).
        dice_sigmoid: apply a sigmoid to ``recon`` before the Dice ratio (dice only).
        dice_weight: weight of the Dice term (combined).
        recon_weight: weight of the weighted reconstruction term (combined).

    The logged scalars (floats) are: l1 -> ``l1``; mse -> ``mse``; dice -> ``dice``; weighted -> ``recon``,
    ``fg_<error>``, ``bg_<error>``, ``fg_fraction``; combined -> ``recon`` (the total), ``dice``, ``weighted`` and
    the weighted term's diagnostics.
    """

    def __init__(
        self,
        loss_type: str = "l1",
        *,
        error: str = "l1",
        foreground_weight: float = 20.0,
        background_weight: float = 1.0,
        threshold: float = 0.1,
        dice_smooth: float = 1e-5,
        dice_sigmoid: bool = False,
        dice_weight: float = 1.0,
        recon_weight: float = 1.0,
    ) -> None:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if error not in ERROR_TYPES:
            raise ValueError(f"error must be one of {ERROR_TYPES}, got {error!r}")
        if not dice_smooth > 0:
            raise ValueError(f"dice_smooth must be > 0, got {dice_smooth}")
        if dice_weight < 0 or recon_weight < 0:
            raise ValueError(f"dice_weight and recon_weight must be >= 0, got {dice_weight} and {recon_weight}")
        self.loss_type = loss_type
        self.error = error
        self.foreground_weight = foreground_weight
        self.background_weight = background_weight
        self.threshold = threshold
        self.dice_weight = dice_weight
        self.recon_weight = recon_weight
        # per volume and channel: 1 - (2 sum(x y) + smooth) / (sum(x) + sum(y) + smooth), then the mean
        self.dice = DiceLoss(sigmoid=dice_sigmoid, smooth_nr=dice_smooth, smooth_dr=dice_smooth, reduction="mean")

    def _weighted(self, recon: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return weighted_reconstruction_loss(recon, target, self.error, self.foreground_weight, self.background_weight,
                                            self.threshold)

    def _dice(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if recon.ndim < 3:
            raise ValueError(f"the Dice loss needs (batch, channel, *spatial) tensors, got shape {tuple(recon.shape)}")
        return self.dice(recon, target)

    def __call__(self, recon: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of ``recon`` against ``target`` (same shape; (batch, channel, *spatial) for Dice) and its
        logged scalars."""
        _check_pair(recon, target)
        kind = self.loss_type
        if kind == "l1":
            loss = F.l1_loss(recon, target)
            return loss, {"l1": loss.item()}
        if kind == "mse":
            loss = F.mse_loss(recon, target)
            return loss, {"mse": loss.item()}
        if kind == "dice":
            loss = self._dice(recon, target)
            return loss, {"dice": loss.item()}
        weighted, logs = self._weighted(recon, target)
        if kind == "weighted":
            return weighted, {"recon": weighted.item(), **{k: v.item() for k, v in logs.items()}}
        dice = self._dice(recon, target)
        loss = self.dice_weight * dice + self.recon_weight * weighted
        return loss, {"recon": loss.item(), "dice": dice.item(), "weighted": weighted.item(),
                      **{k: v.item() for k, v in logs.items()}}

    def __repr__(self) -> str:
        return f"ReconstructionLoss({self.loss_type!r})"


def build_reconstruction_loss(loss_settings: ReconstructionLossSettings) -> ReconstructionLoss:
    """Stage 1's reconstruction loss from the ``autoencoder.training.loss`` settings
    (:class:`~monai_diffusion.settings.ReconstructionLossSettings`).

    Args:
        loss_settings: ``settings.autoencoder.training.loss``.
    """
    kind = loss_settings.reconstruction_loss_type
    if kind == "weighted":
        w = loss_settings.weighted
        return ReconstructionLoss("weighted", error=w.recon_loss_type or w.loss_type, foreground_weight=w.foreground_weight,
                                  background_weight=w.background_weight, threshold=w.threshold)
    if kind == "dice":
        d = loss_settings.dice
        return ReconstructionLoss("dice", dice_smooth=d.smooth, dice_sigmoid=d.sigmoid)
    if kind == "combined":
        c = loss_settings.combined
        return ReconstructionLoss("combined", error=c.recon_loss_type, foreground_weight=c.foreground_weight,
                                  background_weight=c.background_weight, threshold=c.threshold,
                                  dice_smooth=c.dice_smooth, dice_weight=c.dice_weight, recon_weight=c.recon_weight)
    return ReconstructionLoss(kind)


# ------------------------------------------------------------------------------------------------ corruption
def corrupt(images: torch.Tensor, settings: CorruptionSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """A corrupted copy of ``images`` (``images`` itself when corruption is off).

    ``gaussian`` adds N(0, noise_std) to every voxel; ``dropout`` sets each voxel to 0 with probability
    ``dropout_prob``; ``mixed`` adds the noise, then drops voxels (dropped voxels are exactly 0). Nothing is
    clipped. Each voxel (and channel) is drawn independently.

    Args:
        images: a float tensor, e.g. (batch, channel, *spatial).
        settings: a :class:`~monai_diffusion.settings.CorruptionSettings` (``enabled``, ``noise_type``,
            ``noise_std``, ``dropout_prob``): ``autoencoder.training.denoising`` or ``diffusion.training.input_noise``.
        generator: draws the noise and the dropout mask; None = the global torch random state of ``images``'
            device (saved in checkpoints, so resumed runs draw the same corruption).
    """
    if not settings.enabled:
        return images
    kind = settings.noise_type
    if kind not in NOISE_TYPES:
        raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {kind!r}")
    if settings.noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {settings.noise_std}")
    if not 0 <= settings.dropout_prob < 1:
        raise ValueError(f"dropout_prob must be in [0, 1), got {settings.dropout_prob}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor, got {images.dtype}")
    out = images
    # torch.randn / torch.rand with a shape (not *_like): the draw does not depend on the tensor's memory layout
    if kind in ("gaussian", "mixed") and settings.noise_std > 0:
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        out = out + settings.noise_std * noise
    if kind in ("dropout", "mixed") and settings.dropout_prob > 0:
        keep = torch.rand(images.shape, generator=generator, device=images.device) >= settings.dropout_prob
        out = out * keep.to(out.dtype)
    return out
