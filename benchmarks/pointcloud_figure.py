"""The picture of monai_diffusion/docs/pointclouds.md: a built-in microtubules volume, the point cloud exported from
its NIfTI file, and those points voxelised again, each seen from the top (x-y) and the side (x-z), in um.

    PYTHONPATH=$PWD:$PWD/GenerativeModels python benchmarks/pointcloud_figure.py --out monai_diffusion/docs/images

Needs matplotlib (not a dependency of the project). Prints the round trip's figures: the symmetric Chamfer
distance between the exported points and the points re-exported from their voxelisation, and the correlation of
the two densities.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from monai_diffusion.pointcloud import sample_points, voxel_to_world, voxelize
from monai_diffusion.synthetic import make_synthetic_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="monai_diffusion/docs/images", help="folder of the PNG")
    parser.add_argument("--shape", nargs=3, type=int, default=[128, 128, 32], help="voxels of the volume")
    parser.add_argument("--num-points", type=int, default=30000, help="points exported")
    parser.add_argument("--threshold", type=float, default=0.1, help="export threshold")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as tmp:
        train, _ = make_synthetic_dataset(tmp, 1, 0, args.shape, seed=0, kind="microtubules")
        img = nib.load(train[0])
        volume = np.asarray(img.dataobj, dtype=np.float32)
        affine = np.asarray(img.affine)
    spacing = np.abs(np.diag(affine)[:3])
    points = sample_points(volume, affine, args.num_points, args.threshold, "probabilistic", seed=0)
    corner = voxel_to_world(np.array([[-0.5, -0.5, -0.5]]), affine)[0]  # lower corner of voxel 0 (mm)
    again, again_affine, dropped = voxelize(points, spacing, corner, volume.shape, mode="density")
    back = sample_points(again, again_affine, args.num_points, 0.0, "probabilistic", seed=1)

    from scipy.spatial import cKDTree

    chamfer = [cKDTree(points).query(back)[0].mean() * 1e6, cKDTree(back).query(points)[0].mean() * 1e6]
    density, _, _ = voxelize(points, spacing, corner, volume.shape, mode="density")
    redensity, _, _ = voxelize(back, spacing, corner, volume.shape, mode="density")
    corr = np.corrcoef(density.ravel(), redensity.ravel())[0, 1]
    print(f"volume {list(volume.shape)} at {[round(float(s) * 1e6, 3) for s in spacing]} nm; {len(points)} points "
          f"(threshold {args.threshold}); voxelised again: {dropped} left out; round trip: Chamfer "
          f"{chamfer[0]:.2f} / {chamfer[1]:.2f} nm (voxel {spacing[0] * 1e6:.0f} nm), density correlation {corr:.3f}")

    um = 1e3  # mm -> um
    lo = voxel_to_world(np.array([[-0.5, -0.5, -0.5]]), affine)[0] * um
    hi = voxel_to_world(np.array([[n - 0.5 for n in volume.shape]]), affine)[0] * um
    top, side = [lo[0], hi[0], lo[1], hi[1]], [lo[0], hi[0], lo[2], hi[2]]
    width = hi[0] - lo[0]
    fig, axes = plt.subplots(2, 3, figsize=(10.5, 3.6 + 3.6 * 2.5 * (hi[2] - lo[2]) / (hi[1] - lo[1])),
                             gridspec_kw={"height_ratios": [hi[1] - lo[1], 2.5 * (hi[2] - lo[2])]})
    titles = ["volume (maximum projection)", f"exported: {len(points)} points",
              "points voxelised again (max. projection)"]
    for col, (title, vol) in enumerate(zip(titles, (volume, None, again))):
        for row, (axis, extent, label) in enumerate(((2, top, "y [um]"), (1, side, "z [um]"))):
            ax = axes[row, col]
            if vol is not None:
                ax.imshow(vol.max(axis=axis).T, origin="lower", extent=extent, cmap="gray", aspect="auto",
                          interpolation="nearest")
            else:
                ax.set_facecolor("black")
                ax.scatter(points[:, 0] * um, points[:, 2 if row else 1] * um, s=0.05, c="white", linewidths=0,
                           alpha=0.6)
                ax.set_xlim(extent[:2])
                ax.set_ylim(extent[2:])
            ax.set_xlabel("x [um]")
            ax.set_ylabel(label)
            if row == 0:
                ax.set_title(title, fontsize=10)
            ax.set_aspect(1.0 if row == 0 else 2.5)
    fig.suptitle(f"microtubules {args.shape[0]}x{args.shape[1]}x{args.shape[2]}, {width:.2f} um wide; side views "
                 "(x-z) stretched 2.5x in z", fontsize=10)
    fig.tight_layout()
    out = Path(args.out) / "pointcloud_microtubules.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
