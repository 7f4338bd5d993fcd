"""Pictures and timings of the built-in synthetic datasets (monai_diffusion/docs/datasets.md).

Writes, per kind, a PNG of mid-slices in three planes (axial, coronal, sagittal; plus a maximum-intensity
projection along z for microtubules) of a few volumes, and prints the time to generate one volume.

    PYTHONPATH=$PWD:$PWD/GenerativeModels python benchmarks/synthetic_datasets.py --out monai_diffusion/docs/images

Pictures are drawn with the physical aspect ratio of the voxels (taken from the spacing).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _common import cpu_info
from monai_diffusion.synthetic import default_spacing, generate_volume

# (kind, voxel_size, number of volumes shown, what to time)
CASES = [
    ("phantom", (64, 64, 64), 3),
    ("microtubules", (256, 256, 64), 3),
    ("brain", (96, 112, 96), 3),
    ("microtubules", (256, 256), 3),
    ("brain", (96, 112), 3),
]
TIMINGS = [
    ("phantom", (32, 32, 32)),
    ("phantom", (64, 64, 64)),
    ("microtubules", (32, 32, 32)),
    ("microtubules", (128, 128, 32)),
    ("microtubules", (256, 256, 64)),
    ("microtubules", (256, 256)),
    ("brain", (32, 32, 32)),
    ("brain", (96, 112, 96)),
    ("brain", (96, 112)),
]


def _to_image(plane: np.ndarray, pixel: tuple[float, float], ppu: float) -> Image.Image:
    """A 2D array indexed [horizontal, vertical] -> grey image, vertical axis up, ``ppu`` pixels per mm."""
    a = np.clip(plane.T[::-1], 0.0, 1.0)  # rows = vertical axis (top = high), columns = horizontal axis
    img = Image.fromarray((a * 255.0 + 0.5).astype(np.uint8))
    rows, cols = a.shape
    size = (max(1, int(round(cols * pixel[0] * ppu))), max(1, int(round(rows * pixel[1] * ppu))))
    return img.resize(size, Image.BILINEAR)


def _panels(vol: np.ndarray, spacing, height: int, mip: bool) -> list[Image.Image]:
    """Mid-slices (and optionally a z projection), all at the same physical scale: the largest extent = height."""
    ppu = height / max(n * s for n, s in zip(vol.shape, spacing))
    if vol.ndim == 2:
        return [_to_image(vol, (spacing[0], spacing[1]), ppu)]
    cx, cy, cz = (s // 2 for s in vol.shape)
    sx, sy, sz = spacing
    out = [
        _to_image(vol[:, :, cz], (sx, sy), ppu),  # axial: x horizontal, y vertical
        _to_image(vol[:, cy, :], (sx, sz), ppu),  # coronal: x horizontal, z vertical
        _to_image(vol[cx, :, :], (sy, sz), ppu),  # sagittal: y horizontal, z vertical
    ]
    if mip:
        out.append(_to_image(vol.max(axis=2), (sx, sy), ppu))
    return out


def _grid(rows: list[list[Image.Image]], gap: int = 4) -> Image.Image:
    width = max(sum(p.width for p in r) + gap * (len(r) - 1) for r in rows)
    height = sum(max(p.height for p in r) for r in rows) + gap * (len(rows) - 1)
    canvas = Image.new("L", (width, height), 255)
    y = 0
    for r in rows:
        x = 0
        for p in r:
            canvas.paste(p, (x, y))
            x += p.width + gap
        y += max(p.height for p in r) + gap
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="monai_diffusion/docs/images", help="folder for the PNGs")
    parser.add_argument("--height", type=int, default=192, help="largest extent of one panel in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed volumes per case (after one warm-up)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    for kind, shape, count in CASES:
        spacing = default_spacing(kind, len(shape), shape)
        rows = [
            _panels(generate_volume(kind, shape, seed=0, index=i), spacing, args.height, kind == "microtubules")
            for i in range(count)
        ]
        name = f"synthetic_{kind}_{'x'.join(map(str, shape))}.png"
        _grid(rows).save(out / name, optimize=True)
        print(f"wrote {out / name}")

    machine = cpu_info()["model"]
    print(f"\nseconds per volume ({machine}, torch threads={torch.get_num_threads()})")
    print("| kind | voxel_size | spacing (mm) | s / volume |")
    print("|---|---|---|---|")
    for kind, shape in TIMINGS:
        generate_volume(kind, shape, seed=1, index=0)  # warm-up: imports, template loading and caches
        t = time.perf_counter()
        for i in range(args.repeats):
            generate_volume(kind, shape, seed=1, index=i + 1)
        dt = (time.perf_counter() - t) / args.repeats
        spacing = default_spacing(kind, len(shape), shape)
        print(f"| {kind} | {'x'.join(map(str, shape))} | {', '.join(f'{s:g}' for s in spacing)} | {dt:.2f} |")


if __name__ == "__main__":
    main()
