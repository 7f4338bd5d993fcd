"""Point clouds in both directions: export of samples (methods, units, affine, seed, empty volumes, PLY, 2D), the
``monai-diffusion-voxelize`` command (column detection, modes, extents, errors as one line), a points -> volume ->
points round trip, the settings keys, and a tiny sampling run writing ``both``."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from monai_diffusion.cli import generate_samples_main, train_autoencoder_main, train_diffusion_main, voxelize_main
from monai_diffusion.pointcloud import (
    export_sample,
    read_points,
    sample_points,
    voxel_to_world,
    voxelize,
    write_points_csv,
    write_points_ply,
)
from monai_diffusion.settings import ConfigError, PointCloudSettings, settings_from_dict

from conftest import error_line, tiny_run_args as run_args  # run_args: test_runs' tiny train -> sample run

ANATOMICAL = Path(data_path) / "anatomical.nii"  # 33 x 41 x 25, LAS, 2 mm voxels


def read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    lines = path.read_text().splitlines()
    rows = np.array([[float(v) for v in line.split(",")] for line in lines[1:]]).reshape(-1, len(lines[0].split(",")))
    return lines[0].split(","), rows


def physical_box(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The bounding box (mm) of a volume's voxels, edges included: indices -0.5 .. n-0.5 mapped by the affine."""
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape], indexing="ij")).reshape(len(shape), -1).T
    world = voxel_to_world(corners, affine)
    return world.min(axis=0), world.max(axis=0)


def run_voxelize(argv: list[str]) -> int:
    """``voxelize_main``'s exit code, also for argument errors (which exit through ``SystemExit``)."""
    try:
        return voxelize_main(argv)
    except SystemExit as exc:
        return int(exc.code)


# ----------------------------------------------------------------------------------------------------------- export
def test_methods_draw_with_the_documented_probabilities():
    volume = np.zeros((4, 5, 6), dtype=np.float32)
    volume[1, 2, 3], volume[2, 0, 5], volume[3, 4, 0] = 0.2, 0.6, 0.1  # the last one is not above the threshold
    expected = {  # fraction of points drawn from (1, 2, 3); the rest come from (2, 0, 5)
        "probabilistic": 0.1 / (0.1 + 0.5), "center": 0.2 / 0.8, "weighted": 0.2 / 0.8, "random": 0.5,
    }
    for method, fraction in expected.items():
        pts = sample_points(volume, None, 20000, threshold=0.1, method=method, seed=3)
        nearest = np.rint(pts)
        assert pts.shape == (20000, 3)
        assert set(map(tuple, nearest.astype(int))) == {(1, 2, 3), (2, 0, 5)}, method
        assert abs(np.mean(np.all(nearest == (1, 2, 3), axis=1)) - fraction) < 0.015, method
        offset = pts - nearest
        if method == "center":
            assert np.all(offset == 0)
        else:  # uniform in [-0.5, 0.5): the whole voxel, mean 0, variance 1/12
            assert offset.min() >= -0.5 and offset.max() < 0.5
            assert np.allclose(offset.mean(axis=0), 0, atol=0.01) and np.allclose(offset.var(axis=0), 1 / 12, atol=0.004)


def test_csv_rows_header_units_and_seeded_draw(tmp_path):
    volume = np.random.default_rng(0).random((8, 7, 6)).astype(np.float32)
    affine = np.diag([2e-5, 2e-5, 2.5e-5, 1.0])  # 20 x 20 x 25 nm
    affine[:3, 3] = [1e-3, 2e-3, 0.0]
    written = {}
    for unit, scale in (("mm", 1.0), ("um", 1e3), ("nm", 1e6)):
        cfg = PointCloudSettings(num_points=321, threshold=0.3, method="probabilistic", unit=unit)
        stem = tmp_path / f"s_{unit}"
        assert export_sample(volume, affine, stem, cfg, seed=7) == [tmp_path / f"s_{unit}.csv"]
        header, rows = read_csv(tmp_path / f"s_{unit}.csv")
        assert header == [f"x [{unit}]", f"y [{unit}]", f"z [{unit}]"]
        assert rows.shape == (321, 3)
        written[unit] = rows / scale
    assert np.allclose(written["um"], written["mm"], rtol=1e-8) and np.allclose(written["nm"], written["mm"], rtol=1e-8)
    # coordinates: through the affine, inside the candidates' voxels
    index = (written["mm"] - affine[:3, 3]) / np.diag(affine)[:3]
    assert np.all(volume[tuple(np.rint(index).astype(int).T)] > 0.3)
    # the same seed draws the same points, another seed others
    assert np.array_equal(sample_points(volume, affine, 50, 0.3, seed=11), sample_points(volume, affine, 50, 0.3, seed=11))
    assert not np.array_equal(sample_points(volume, affine, 50, 0.3, seed=11), sample_points(volume, affine, 50, 0.3, seed=12))
    with pytest.raises(FileExistsError, match="s_mm.csv already exists"):
        export_sample(volume, affine, tmp_path / "s_mm", PointCloudSettings(), seed=7)


def test_real_header_affine_las_2mm():
    img = nib.load(ANATOMICAL)
    data = np.asarray(img.dataobj, dtype=np.float32)
    assert data.shape == (33, 41, 25) and nib.aff2axcodes(img.affine) == ("L", "A", "S")
    data = data / data.max()
    pts = sample_points(data, img.affine, 5000, threshold=0.2, method="center", seed=0)
    # voxel centres: mapping back by the inverse affine gives integer indices of voxels above the threshold
    index = nib.affines.apply_affine(np.linalg.inv(img.affine), pts)
    assert np.allclose(index, np.rint(index), atol=1e-6)
    assert np.all(data[tuple(np.rint(index).astype(int).T)] > 0.2)
    assert np.allclose(pts, nib.affines.apply_affine(img.affine, np.rint(index)))
    # with jitter the points stay in the volume's physical box; x runs right-to-left (L), so x decreases with i
    pts = sample_points(data, img.affine, 5000, threshold=0.2, method="probabilistic", seed=0)
    lo, hi = physical_box(img.affine, data.shape)
    assert np.all(pts >= lo - 1e-9) and np.all(pts <= hi + 1e-9)
    index = nib.affines.apply_affine(np.linalg.inv(img.affine), pts)
    assert np.corrcoef(index[:, 0], pts[:, 0])[0, 1] < -0.99 and np.abs(index - np.rint(index)).max() <= 0.5


def test_no_voxel_above_threshold_writes_an_empty_table_and_warns(tmp_path):
    cfg = PointCloudSettings(threshold=0.5, ply=True)
    with pytest.warns(UserWarning, match=r"sample_0007: no voxel above sampling.pointcloud.threshold=0.5 \(maximum 0.4"):
        written = export_sample(np.full((4, 4, 4), 0.4, np.float32), None, tmp_path / "sample_0007", cfg, seed=0)
    assert [p.name for p in written] == ["sample_0007.csv", "sample_0007.ply"]
    assert (tmp_path / "sample_0007.csv").read_text() == "x [mm],y [mm],z [mm]\n"
    assert b"element vertex 0\n" in (tmp_path / "sample_0007.ply").read_bytes()


def test_ply_holds_the_same_points(tmp_path):
    pts = np.random.default_rng(1).normal(size=(17, 3))
    write_points_ply(tmp_path / "p.ply", pts, unit="nm")
    raw = (tmp_path / "p.ply").read_bytes()
    head, body = raw.split(b"end_header\n")
    assert b"format binary_little_endian 1.0" in head and b"comment unit nm" in head and b"element vertex 17" in head
    assert np.array_equal(np.frombuffer(body, dtype="<f8").reshape(17, 3), pts * 1e6)


def test_2d_samples_export_x_and_y(tmp_path):
    image = np.zeros((6, 5), dtype=np.float32)
    image[4, 1] = 1.0
    affine = np.diag([0.5, 0.25, 1.0, 1.0])  # 2D data keeps MONAI's 4x4 affine
    affine[:3, 3] = [10.0, 20.0, 30.0]
    pts = sample_points(image, affine, 10, threshold=0.1, method="center")
    assert np.allclose(pts, [[12.0, 20.25]] * 10)
    write_points_csv(tmp_path / "a.csv", pts, unit="um")
    header, rows = read_csv(tmp_path / "a.csv")
    assert header == ["x [um]", "y [um]"] and np.allclose(rows, [[12000.0, 20250.0]] * 10)


def test_write_sample_formats(tmp_path):
    import torch

    from monai_diffusion.sampling import write_sample

    image = torch.zeros(1, 6, 5)
    image[0, 4, 1] = 1.0
    affine = np.diag([0.5, 0.25, 1.0, 1.0])
    cfg = PointCloudSettings(num_points=3, threshold=0.5, method="center", unit="mm")
    written = write_sample(image, tmp_path / "s2d", affine, "pointcloud", png=False, pointcloud=cfg, seed=0)
    assert written == [tmp_path / "s2d.csv"]
    assert (tmp_path / "s2d.csv").read_text().splitlines() == ["x [mm],y [mm]"] + ["2,0.25"] * 3
    written = write_sample(image, tmp_path / "s2d_both", affine, "both", png=True, pointcloud=cfg, seed=0)
    assert [p.name for p in written] == ["s2d_both.nii.gz", "s2d_both.csv", "s2d_both.png"]
    with pytest.raises(FileExistsError, match="s2d.csv already exists"):  # nothing is written then
        write_sample(image, tmp_path / "s2d", affine, "both", png=False, pointcloud=cfg, seed=0)
    assert not (tmp_path / "s2d.nii.gz").exists()
    with pytest.raises(ValueError, match="single-channel samples, got 2 channels"):
        write_sample(torch.zeros(2, 4, 4, 4), tmp_path / "two", None, "both", pointcloud=cfg)


def test_export_refuses_bad_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        sample_points(np.ones((2, 2, 2)), None, 5, method="surface")
    with pytest.raises(ValueError, match="num_points must be an integer >= 1, got 0"):
        sample_points(np.ones((2, 2, 2)), None, 0)
    with pytest.raises(ValueError, match=r"volume must be 2D or 3D \(one channel\), got shape \(1, 2, 2, 2\)"):
        sample_points(np.ones((1, 2, 2, 2)), None, 5)


# ----------------------------------------------------------------------------------------------------------- import
def test_voxelize_modes_units_and_dropped_points(tmp_path, monkeypatch):
    pts_nm = np.array([[10, 10, 10], [15, 12, 19], [30, 10, 10], [59, 39, 19], [60, 0, 0], [-1, 5, 5]], float)
    vol, affine, dropped = voxelize(pts_nm * 1e-6, 20e-6, [0, 0, 0], (3, 2, 1), mode="density")
    assert dropped == 2  # x = 60 is past the last voxel [40, 60), x = -1 before the first
    expected = np.zeros((3, 2, 1), np.float32)
    expected[0, 0, 0], expected[1, 0, 0], expected[2, 1, 0] = 2, 1, 1
    assert np.array_equal(vol, expected)
    assert np.allclose(affine, [[2e-5, 0, 0, 1e-5], [0, 2e-5, 0, 1e-5], [0, 0, 2e-5, 1e-5], [0, 0, 0, 1]])
    occ, _, _ = voxelize(pts_nm * 1e-6, 20e-6, [0, 0, 0], (3, 2, 1), mode="occupancy")
    assert occ.dtype == np.uint8 and np.array_equal(occ, (expected > 0).astype(np.uint8))
    # gaussian: the counts smoothed (mass kept away from the border, peak lowered), and normalised to a maximum of 1
    one = np.array([[50.0, 50.0, 50.0]])
    g, _, _ = voxelize(one, 10.0, [0, 0, 0], (11, 11, 11), mode="gaussian", sigma=1.0)
    assert abs(g.sum() - 1.0) < 1e-3 and g[5, 5, 5] < 0.1 and g[5, 5, 5] == g.max()
    assert np.isclose(g[4, 5, 5], g[6, 5, 5]) and np.isclose(g[5, 4, 5], g[5, 5, 6])
    gn, _, _ = voxelize(one, 10.0, [0, 0, 0], (11, 11, 11), mode="gaussian", sigma=1.0, normalize=True)
    assert np.isclose(gn.max(), 1.0) and np.allclose(gn, g / g.max())
    # the kernel: exp(-d^2 / 2 sigma^2), normalised per axis; without scipy, MONAI's filter gives the same
    kernel = np.exp(-np.arange(-4, 5) ** 2 / 2.0)
    kernel /= kernel.sum()
    assert np.allclose(g[1:10, 5, 5], kernel[0:9] * kernel[4] ** 2, atol=1e-7)
    monkeypatch.setitem(sys.modules, "scipy.ndimage", None)
    g_monai, _, _ = voxelize(one, 10.0, [0, 0, 0], (11, 11, 11), mode="gaussian", sigma=1.0)
    assert np.allclose(g_monai, g, atol=1e-6)


def test_voxelize_command_reads_smlm_tables(tmp_path, capsys):
    storm = tmp_path / "storm.csv"  # ThunderSTORM: quoted headers with units, extra columns, x/y/z not first
    storm.write_text('"id","frame","x [nm]","y [nm]","z [nm]","intensity [photon]"\n'
                     "1,1,25.0,5.0,5.0,900\n2,1,25.0,5.0,5.0,800\n3,2,5.0,35.0,15.0,700\n4,3,500.0,5.0,5.0,1\n")
    micro = tmp_path / "micro.tsv"  # tab-separated, unit in the name, micrometres
    micro.write_text("x_um\ty_um\tz_um\n0.025\t0.005\t0.005\n")
    bare = tmp_path / "bare.txt"  # no header: columns by index, unit from --unit
    bare.write_text("9,25.0,5.0,5.0\n")
    out = tmp_path / "vol"
    argv = [str(storm), str(micro), str(bare), "--out", str(out), "--voxel-size", "10", "--unit", "nm",
            "--extent", "0", "40", "0", "40", "0", "20", "--mode", "density"]
    assert voxelize_main(argv) == 2 and "--columns" in capsys.readouterr().err  # bare.txt needs --columns
    assert not out.exists()  # refused before anything was written
    assert voxelize_main([*argv[:2], *argv[3:]]) == 0
    assert voxelize_main([str(bare), *argv[3:], "--columns", "1,2,3"]) == 0
    log = capsys.readouterr().out
    assert "4 points" in log and "1 point(s) outside the extent left out" in log
    for name, counts in (("storm", {(2, 0, 0): 2, (0, 3, 1): 1}), ("micro", {(2, 0, 0): 1}), ("bare", {(2, 0, 0): 1})):
        img = nib.load(out / f"{name}.nii.gz")
        assert img.shape == (4, 4, 2)
        assert np.allclose(img.affine, np.diag([1e-5, 1e-5, 1e-5, 1]) + np.c_[np.zeros((4, 3)), [5e-6] * 3 + [0]])
        data = np.asarray(img.dataobj)
        assert data.sum() == sum(counts.values()) and all(data[k] == v for k, v in counts.items())
    # outputs are never replaced unless asked
    line = error_line(capsys, voxelize_main([*argv[:2], *argv[3:]]))
    assert "storm.nii.gz already exists" in line and "--overwrite" in line
    assert voxelize_main([*argv[:2], *argv[3:], "--overwrite", "--mode", "occupancy"]) == 0
    assert np.asarray(nib.load(out / "storm.nii.gz").dataobj).max() == 1
    # named columns, the file's own bounding box as the grid
    assert voxelize_main([str(storm), "--out", str(tmp_path / "box"), "--voxel-size", "5", "--unit", "nm",
                          "--columns", "x [nm],y [nm],z [nm]"]) == 0
    img = nib.load(tmp_path / "box" / "storm.nii.gz")
    assert img.shape == (100, 7, 3) and np.allclose(img.affine[:3, 3], np.array([5.0, 5.0, 5.0]) * 1e-6 + 2.5e-6)


def test_voxelize_errors_are_one_line(tmp_path, capsys, monkeypatch):
    good = tmp_path / "good.csv"
    good.write_text("x,y,z\n1,2,3\n")
    base = ["--out", str(tmp_path / "o"), "--unit", "nm"]
    cases = [
        ([str(tmp_path / "missing.csv"), *base, "--voxel-size", "10"], ["missing.csv", "does not exist"]),
        ([str(good), *base, "--voxel-size", "0"], ["invalid --voxel-size", "positive", "[0.0]"]),
        ([str(good), *base, "--voxel-size", "10", "-1", "10"], ["--voxel-size", "positive"]),
        ([str(good), *base, "--voxel-size", "10", "--extent", "0", "10", "5", "5", "0", "1"], ["invalid --extent", "empty", "[0.0, 10.0, 5.0, 5.0, 0.0, 1.0]"]),
        ([str(good), *base, "--voxel-size", "10", "--mode", "gaussian", "--sigma", "0"], ["invalid --sigma", "0.0"]),
        ([str(good), *base, "--voxel-size", "10", "--extent", "0", "1", "0", "1", "0", "1", "--origin", "0", "0", "0"],
         ["invalid --origin", "goes with --shape"]),
        ([str(good), *base, "--voxel-size", "10", "--mode", "splat"], ["--mode", "splat"]),
        ([str(good), "--out", "o", "--voxel-size", "10"], ["--unit"]),
        ([str(good), *base, "--voxel-size", "0.01", "--extent", "0", "20000", "0", "20000", "0", "2500"],
         ["[2000000, 2000000, 250000] voxels", "check --unit"]),
    ]
    no_xyz = tmp_path / "no_xyz.csv"
    no_xyz.write_text("frame,intensity,x [nm]\n1,2,3\n")
    cases.append(([str(no_xyz), *base, "--voxel-size", "10"], ["no_xyz.csv", "no y, z column", "x [nm]"]))
    bad_row = tmp_path / "bad_row.csv"
    bad_row.write_text("x,y,z\n1,2,3\n4,five,6\n")
    cases.append(([str(bad_row), *base, "--voxel-size", "10"], ["bad_row.csv", "non-numeric"]))
    for argv, words in cases:
        line = error_line(capsys, run_voxelize(argv))
        assert all(w in line for w in words), (words, line)
    # HDF5 without h5py: one line saying how to get it, before anything is read or written
    h5 = tmp_path / "locs.hdf5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n")
    monkeypatch.setitem(sys.modules, "h5py", None)
    line = error_line(capsys, voxelize_main([str(good), str(h5), "--out", str(tmp_path / "o_h5"), "--unit", "nm",
                                             "--voxel-size", "10"]))
    assert "locs.hdf5" in line and "pip install h5py" in line and not (tmp_path / "o_h5").exists()


def test_hdf5_point_tables(tmp_path):
    h5py = pytest.importorskip("h5py")
    locs = np.zeros(3, dtype=[("frame", "<u4"), ("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("photons", "<f4")])
    locs["x"], locs["y"], locs["z"] = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]
    with h5py.File(tmp_path / "picasso.hdf5", "w") as f:
        f.create_dataset("meta", data=np.zeros((2, 2)))
        f.create_dataset("locs", data=locs)
        f.create_dataset("other", data=np.arange(12.0).reshape(4, 3))
    pts = read_points(tmp_path / "picasso.hdf5", "um")
    assert np.allclose(pts, np.stack([locs["x"], locs["y"], locs["z"]], axis=1) * 1e-3)
    assert np.allclose(read_points(tmp_path / "picasso.hdf5", "mm", dataset="other"), np.arange(12.0).reshape(4, 3))
    with pytest.raises(ValueError, match="dataset 'meta' has shape"):
        read_points(tmp_path / "picasso.hdf5", "mm", dataset="meta")
    assert voxelize_main([str(tmp_path / "picasso.hdf5"), "--out", str(tmp_path / "v"), "--unit", "um",
                          "--voxel-size", "1", "--extent", "0", "4", "0", "8", "0", "10", "--mode", "occupancy"]) == 0
    occupied = np.argwhere(np.asarray(nib.load(tmp_path / "v" / "picasso.nii.gz").dataobj))
    assert occupied.tolist() == [[1, 4, 7], [2, 5, 8], [3, 6, 9]]


# ------------------------------------------------------------------------------------------------------ round trip
def _segments(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` points (nm) spread along three line segments inside a 600 x 600 x 400 nm box."""
    ends = np.array([[[60, 80, 100], [540, 500, 300]], [[100, 520, 80], [500, 120, 320]], [[300, 60, 200],
                                                                                            [320, 560, 220]]], float)
    which = rng.integers(0, 3, n)
    t = rng.random((n, 1))
    return ends[which, 0] + t * (ends[which, 1] - ends[which, 0])


@pytest.mark.parametrize("mode, threshold", [("density", 0.0), ("gaussian", 0.05)])
def test_points_to_volume_to_points_keeps_the_density(tmp_path, capsys, mode, threshold):
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(0)
    points = _segments(rng, 20000)
    np.savetxt(tmp_path / "lines.csv", points, delimiter=",", header="x [nm],y [nm],z [nm]", comments="")
    voxel = 20.0
    assert voxelize_main([str(tmp_path / "lines.csv"), "--out", str(tmp_path / "vol"), "--voxel-size", str(voxel),
                          "--unit", "nm", "--extent", "0", "600", "0", "600", "0", "400", "--mode", mode,
                          "--sigma", "0.5", "--normalize"]) == 0
    img = nib.load(tmp_path / "vol" / "lines.nii.gz")
    assert img.shape == (30, 30, 20)
    cfg = PointCloudSettings(num_points=20000, threshold=threshold, method="probabilistic", unit="nm")
    export_sample(np.asarray(img.dataobj), img.affine, tmp_path / "lines_back", cfg, seed=1)
    header, back = read_csv(tmp_path / "lines_back.csv")
    assert header == ["x [nm]", "y [nm]", "z [nm]"] and back.shape == (20000, 3)
    lo, hi = physical_box(img.affine, img.shape)
    assert np.all(back >= lo * 1e6 - 1e-6) and np.all(back <= hi * 1e6 + 1e-6)
    # symmetric Chamfer distance: mean nearest-neighbour distance, each way, below one voxel
    to_original = cKDTree(points).query(back)[0].mean()
    to_export = cKDTree(back).query(points)[0].mean()
    assert to_original < voxel and to_export < voxel, (to_original, to_export)
    # the density itself: the exported points binned again match the original counts voxel by voxel
    original, _, _ = voxelize(points * 1e-6, voxel * 1e-6, [0, 0, 0], img.shape, mode="density")
    again, _, _ = voxelize(back * 1e-6, voxel * 1e-6, [0, 0, 0], img.shape, mode="density")
    # (measured: 0.997 from the density volume, 0.925 from the Gaussian one, sigma 0.5 voxel)
    assert np.corrcoef(original.ravel(), again.ravel())[0, 1] > (0.98 if mode == "density" else 0.85)


# -------------------------------------------------------------------------------------------------------- settings
def test_pointcloud_settings():
    seed_style = {"sampling": {"save_format": "both",
                               "pointcloud": {"num_points": 100000, "threshold": 0.1, "method": "Probabilistic"}}}
    s = settings_from_dict(seed_style, check_paths=False)
    assert s.sampling.save_format == "both" and s.sampling.pointcloud.method == "probabilistic"
    assert s.sampling.pointcloud == PointCloudSettings() and (s.sampling.pointcloud.unit, s.sampling.pointcloud.ply) == ("mm", False)
    s = settings_from_dict({"sampling": {"save_format": "pointcloud", "pointcloud": {"unit": "nm", "ply": True}}},
                           check_paths=False)
    assert (s.sampling.pointcloud.unit, s.sampling.pointcloud.ply) == ("nm", True)
    for bad, key, words in [
        ({"pointcloud": {"num_points": 0}}, "sampling.pointcloud.num_points", ">= 1"),
        ({"pointcloud": {"threshold": -0.1}}, "sampling.pointcloud.threshold", ">= 0"),
        ({"pointcloud": {"method": "surface"}}, "sampling.pointcloud.method", "'probabilistic'"),
        ({"pointcloud": {"unit": "pm"}}, "sampling.pointcloud.unit", "'nm'"),
    ]:
        with pytest.raises(ConfigError) as err:
            settings_from_dict({"sampling": bad}, check_paths=False)
        assert err.value.key == key and words in str(err.value), str(err.value)
    with pytest.raises(ConfigError) as err:
        settings_from_dict({"sampling": {"save_format": "both"}, "autoencoder": {"in_channels": 2, "out_channels": 2}},
                           check_paths=False)
    assert "sampling.save_format" in str(err.value) and "out_channels is 2" in str(err.value)


# ---------------------------------------------------------------------------------------------------------- wiring
def test_sampling_run_writes_nifti_and_point_clouds(tmp_path, capsys):
    a = run_args(tmp_path, "sampling.save_format=both", "sampling.save_png=false", "sampling.seed=5",
                 "sampling.pointcloud={num_points: 500, threshold: 0.0, method: probabilistic, unit: um, ply: true}")
    assert train_autoencoder_main(a) == 0
    assert train_diffusion_main(a) == 0
    assert generate_samples_main(a) == 0
    names = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert names == [f"sample_000{i}.{ext}" for i in (0, 1) for ext in ("csv", "nii.gz", "ply")]
    for i in (0, 1):
        img = nib.load(tmp_path / "samples" / f"sample_000{i}.nii.gz")
        header, rows = read_csv(tmp_path / "samples" / f"sample_000{i}.csv")
        assert header == ["x [um]", "y [um]", "z [um]"] and rows.shape == (500, 3)
        lo, hi = physical_box(img.affine, img.shape)
        assert np.all(rows >= lo * 1e3 - 1e-6) and np.all(rows <= hi * 1e3 + 1e-6)
        # the draw used the NIfTI's affine and the seed sampling.seed + sample index
        again = sample_points(np.asarray(img.dataobj), img.affine, 500, 0.0, "probabilistic", seed=5 + i)
        assert np.allclose(rows, again * 1e3, rtol=1e-8, atol=1e-9)
    # a second run numbers on and never replaces what is there
    assert generate_samples_main(a) == 0
    assert len(list((tmp_path / "samples").iterdir())) == 12
    # pointcloud alone: CSV only (no volume file)
    b = run_args(tmp_path, "sampling.save_format=pointcloud", "sampling.save_png=false", "sampling.num_samples=1",
                 f"sampling.output_dir={tmp_path / 'pc_only'}", "sampling.pointcloud={num_points: 7, threshold: 0.0}")
    assert generate_samples_main(b) == 0
    assert sorted(p.name for p in (tmp_path / "pc_only").iterdir()) == ["sample_0000.csv"]
    assert read_csv(tmp_path / "pc_only" / "sample_0000.csv")[1].shape == (7, 3)
