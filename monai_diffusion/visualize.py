"""Images for TensorBoard and PNG previews: orthogonal mid-slices of volumes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

AXIS_NAMES = ("sagittal", "coronal", "axial")  # for RAS-oriented volumes: slicing axis 0, 1, 2


def _normalize(image: torch.Tensor) -> torch.Tensor:
    lo, hi = image.min(), image.max()
    return (image - lo) / (hi - lo) if hi > lo else torch.zeros_like(image)


def orthogonal_slices(volumes: Sequence[torch.Tensor], gap: int = 2) -> dict[str, torch.Tensor]:
    """Mid-slices of each volume along every spatial axis, placed side by side.

    Args:
        volumes: tensors of shape (B, C, *spatial) with the same spatial shape; the first channel of the first
            item is shown, each panel scaled to [0, 1] on its own.
        gap: blank pixels between panels.

    Returns:
        ``{axis name: 1 x H x W tensor in [0, 1]}``; a 2D input gives one entry, ``"image"``.
    """
    vols = [v.detach().float().cpu()[0, 0] for v in volumes]
    spatial = vols[0].ndim
    if spatial == 2:
        panels = {"image": [_normalize(v) for v in vols]}
    else:
        panels = {}
        for axis, name in enumerate(AXIS_NAMES[:spatial]):
            mid = vols[0].shape[axis] // 2
            # show with the first remaining axis horizontal and the second vertical, flipped so "up" is up
            panels[name] = [_normalize(v.select(axis, mid)).transpose(0, 1).flip(0) for v in vols]
    out = {}
    for name, images in panels.items():
        height = images[0].shape[0]
        blank = torch.zeros(height, gap)
        row = [t for img in images for t in (img, blank)][:-1]
        out[name] = torch.cat(row, dim=1).unsqueeze(0)
    return out
