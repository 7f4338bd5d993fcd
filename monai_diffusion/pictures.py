"""Pictures of volumes and images: mid-slices, panels, grids and PNG files.

Every picture the app makes (stage 1's and stage 2's TensorBoard images, stage 2's comparison PNGs, the preview PNG
and the 2D PNG of each sample, sample grids and interpolation strips, and the evaluation report's grid) shows a
volume through one orientation rule, :func:`planes`:

- a 2D image ``(X, Y)`` is shown as its PNG file shows it: ``X`` runs along the columns, ``Y`` down the rows. The
  project reads PNGs width first (MONAI's PIL reader), and :func:`as_shown` is the transposition that gives the file
  back, so a picture of a 2D image looks like the image file;
- a 3D volume ``(X, Y, Z)`` is shown as its three mid-slices (sagittal, coronal, axial for RAS-oriented volumes,
  :data:`AXIS_NAMES`): in each, the first remaining axis runs left to right and the second bottom to top
  (:func:`mid_slice`), so "up" is up.

Pixels are square: voxel spacing is not taken into account.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import refuse_existing

AXIS_NAMES = ("sagittal", "coronal", "axial")  # for RAS-oriented volumes: slicing axis 0, 1, 2
GRID_PLANE_LABELS = ("axis 0 (sag.)", "axis 1 (cor.)", "axis 2 (ax.)")  # column headers of picture_grid

_NEVER_OVERWRITTEN = "samples are never overwritten."


def as_shown(image: Any) -> Any:
    """A 2D image ``(X, Y, ...)`` (a tensor or an array; trailing axes such as channels-last are kept) as its PNG
    shows it: rows along ``Y``, columns along ``X``."""
    return image.swapaxes(0, 1)


def mid_slice(volume: torch.Tensor, axis: int) -> torch.Tensor:
    """The middle slice of a 3D ``(X, Y, Z)`` tensor across ``axis``, with the first remaining axis horizontal and
    the second vertical, flipped so that its index grows upwards."""
    return volume.select(axis, volume.shape[axis] // 2).transpose(0, 1).flip(0)


def planes(volume: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a picture shows of one single-channel ``(*spatial)`` tensor: ``{"image": ...}`` for 2D (:func:`as_shown`),
    ``{"sagittal": ..., "coronal": ..., "axial": ...}`` for 3D (:func:`mid_slice` across axes 0, 1 and 2)."""
    if volume.ndim == 2:
        return {"image": as_shown(volume)}
    if volume.ndim == 3:
        return {name: mid_slice(volume, axis) for axis, name in enumerate(AXIS_NAMES)}
    raise ValueError(f"expected a 2D (H, W) or 3D (H, W, D) image, got shape {tuple(volume.shape)}")


def _normalize(image: torch.Tensor) -> torch.Tensor:
    lo, hi = image.min(), image.max()
    return (image - lo) / (hi - lo) if hi > lo else torch.zeros_like(image)


def orthogonal_slices(volumes: Sequence[torch.Tensor], gap: int = 2) -> dict[str, torch.Tensor]:
    """The :func:`planes` of each volume, placed side by side (TensorBoard images, sample previews).

    Args:
        volumes: tensors of shape (B, C, *spatial) with the same spatial shape; the first channel of the first
            item is shown, each panel scaled to [0, 1] on its own.
        gap: blank pixels between panels.

    Returns:
        ``{plane name: 1 x H x W tensor in [0, 1]}``; a 2D input gives one entry, ``"image"``.
    """
    per_volume = [planes(v.detach().float().cpu()[0, 0]) for v in volumes]
    out = {}
    for name in per_volume[0]:
        images = [_normalize(p[name]) for p in per_volume]
        blank = torch.zeros(images[0].shape[0], gap)
        row = [t for img in images for t in (img, blank)][:-1]
        out[name] = torch.cat(row, dim=1).unsqueeze(0)
    return out


def save_png(panels: dict[str, torch.Tensor], path: Path) -> None:
    """Stack the panels of :func:`orthogonal_slices` vertically into one grey-scale PNG."""
    from PIL import Image

    width = max(p.shape[-1] for p in panels.values())
    rows = [torch.nn.functional.pad(p[0], (0, width - p.shape[-1])) for p in panels.values()]
    image = torch.cat(rows, dim=0).clamp(0, 1).mul(255).round().byte().numpy()
    Image.fromarray(image, mode="L").save(path)


def write_preview(volume: torch.Tensor, path: Path) -> Path:
    """The preview PNG of one ``(C, *spatial)`` sample: its :func:`orthogonal_slices` stacked, each scaled to
    [0, 1] on its own. Refuses to replace a file."""
    refuse_existing([path], hint=_NEVER_OVERWRITTEN)
    save_png(orthogonal_slices([volume.unsqueeze(0)]), path)
    return path


def image_panel(volume: torch.Tensor) -> torch.Tensor:
    """One (C, *spatial) sample as a 2D picture on the data's [0, 1] scale (clipped, not rescaled, so panels of a
    grid compare): a 2D image as its PNG shows it, a 3D volume as its axial mid-slice (the middle of the last axis),
    both by :func:`planes`. The first channel is shown."""
    v = volume.detach().float().cpu()[0]
    if v.ndim not in (2, 3):
        raise ValueError(f"expected a (C, H, W) or (C, H, W, D) sample, got shape {tuple(volume.shape)}")
    shown = planes(v)
    panel = shown["image"] if v.ndim == 2 else shown["axial"]
    return panel.clamp(0.0, 1.0)


def tile_panels(panels: Sequence[torch.Tensor], columns: int, gap: int = 2, fill: float = 1.0) -> torch.Tensor:
    """Panels of one size tiled row by row, ``columns`` per row, ``gap`` pixels of ``fill`` between them."""
    if not panels:
        raise ValueError("tile_panels needs at least one panel")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    height, width = panels[0].shape
    rows = -(-len(panels) // columns)
    cols = min(columns, len(panels))
    canvas = torch.full((rows * height + (rows - 1) * gap, cols * width + (cols - 1) * gap), fill)
    for i, panel in enumerate(panels):
        if tuple(panel.shape) != (height, width):
            raise ValueError(f"panel {i} has shape {tuple(panel.shape)}, expected {(height, width)} like panel 0")
        r, c = divmod(i, columns)
        canvas[r * (height + gap): r * (height + gap) + height, c * (width + gap): c * (width + gap) + width] = panel
    return canvas


def write_picture(images: torch.Tensor, path: Path, columns: int | None = None) -> Path:
    """A grid (``columns`` per row; default: about square) or, with ``columns = len(images)``, a strip of
    :func:`image_panel` pictures of ``(N, C, *spatial)`` samples, as an 8-bit grey PNG. Refuses to replace a file."""
    from PIL import Image

    n = images.shape[0]
    columns = columns or math.ceil(math.sqrt(n))
    canvas = tile_panels([image_panel(images[i]) for i in range(n)], columns)
    refuse_existing([path], hint=_NEVER_OVERWRITTEN)
    Image.fromarray(canvas.mul(255).round().byte().numpy(), mode="L").save(path)
    return path


def picture_grid(rows: Sequence[tuple[str, torch.Tensor]], window: tuple[float, float], max_columns: int = 4):
    """A labelled PIL image: one row per set, up to ``max_columns`` volumes each, the :func:`planes` of each.

    All panels share one intensity window (the real data's range), so brightness differences and values outside
    the range (clipped) show. Small panels are enlarged by an integer factor with nearest-neighbour sampling.

    Args:
        rows: ``(title, (N, C, *spatial) volumes)`` per row; the first channel is shown.
        window: the intensity mapped to black and to white.
        max_columns: most volumes shown per row.
    """
    from PIL import Image, ImageDraw

    lo, hi = window
    per_volume = [[list(planes(v[0].detach().float().cpu()).values()) for v in x[:max_columns]] for _, x in rows]
    panel_h = max(p.shape[0] for vols in per_volume for ps in vols for p in ps)
    zoom = max(1, math.ceil(96 / panel_h))
    gap, label_w = 4, 120
    tiles = []
    for vols in per_volume:
        row = []
        for ps in vols:
            for p in ps:
                img = np.clip((p.numpy() - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
                img = np.kron(img, np.ones((zoom, zoom)))
                row.append(img)
            row.append(None)  # wider gap between volumes
        tiles.append(row[:-1])
    height = panel_h * zoom
    header = 16
    widths = [sum(t.shape[1] + gap if t is not None else 3 * gap for t in row) for row in tiles]
    canvas = Image.new("L", (label_w + max(widths), header + len(tiles) * (height + gap) + gap), color=32)
    draw = ImageDraw.Draw(canvas)
    names = ["image"] if rows[0][1].ndim == 4 else list(GRID_PLANE_LABELS)
    left = label_w
    for name, t in zip(names, tiles[0]):
        draw.text((left + 2, 2), name, fill=200)
        left += t.shape[1] + gap
    for r, ((title, x), row) in enumerate(zip(rows, tiles)):
        top = header + gap + r * (height + gap)
        draw.text((6, top + height // 2 - 6), f"{title} ({x.shape[0]})", fill=255)
        left = label_w
        for t in row:
            if t is None:
                left += 3 * gap
                continue
            tile = Image.fromarray((t * 255).round().astype(np.uint8), mode="L")
            canvas.paste(tile, (left, top + (height - t.shape[0]) // 2))
            left += t.shape[1] + gap
    return canvas


def png_bytes(image) -> bytes:
    """A PIL image encoded as PNG, for an atomic write."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
