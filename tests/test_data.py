"""Tests for monai_diffusion.data: discovery, datalists, synthetic data, header checks, transforms, loaders."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.testing import data_path

from monai_diffusion.data import (
    DataError,
    build_datasets,
    build_loaders,
    build_transforms,
    check_files,
    discover_images,
    load_datalist,
    make_synthetic_dataset,
)
from monai_diffusion.settings import ConfigError, build_data_settings, settings_from_dict

ANATOMICAL = os.path.join(data_path, "anatomical.nii")  # 33x41x25, LAS, 2 mm voxels


def _write(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return str(path)


def _cfg(**kw):
    base = {"voxel_size": [16, 16, 16], "cache_rate": 0.0}
    base.update(kw)
    return build_data_settings(base, spatial_dims=len(base["voxel_size"]))


# ------------------------------------------------------------------------------------------- config


def test_data_section_is_checked_by_the_one_schema():
    # the data functions take the validated settings section; its checks live in settings only
    with pytest.raises(ConfigError, match="data.crop_mode"):
        _cfg(crop_mode="zoom")
    with pytest.raises(ConfigError, match=r"data\.intensity\.lower.*unknown"):
        _cfg(intensity={"lower": 1})
    with pytest.raises(ConfigError, match="data.orientation"):
        _cfg(orientation="RAR")
    with pytest.raises(ConfigError, match="data.spacing"):
        _cfg(spacing=[1.0, 1.0])
    # orientation has one letter per spatial axis: 2D takes two (this is what used to block 2D training)
    assert _cfg(voxel_size=[16, 16], orientation="RA").orientation == "RA"
    assert _cfg(voxel_size=[16, 16]).orientation == "RAS"  # the default: its first two letters are used
    with pytest.raises(ConfigError, match="data.orientation"):
        _cfg(voxel_size=[16, 16], orientation="RRS")
    with pytest.raises(ConfigError, match="data.orientation"):
        _cfg(voxel_size=[16, 16, 16], orientation="RA")


# ---------------------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_reused_and_transformed(tmp_path):
    train, val = make_synthetic_dataset(tmp_path / "a", 3, 2, [16, 16, 16], seed=7)
    assert [os.path.basename(p) for p in train] == ["train_000.nii.gz", "train_001.nii.gz", "train_002.nii.gz"]
    assert len(val) == 2 and all(os.path.isfile(p) for p in train + val)
    assert (tmp_path / "a" / "synthetic_manifest.json").is_file()

    # Deterministic from the seed, different across volumes and seeds.
    train_b, _ = make_synthetic_dataset(tmp_path / "b", 3, 2, [16, 16, 16], seed=7)
    arrays = [np.asarray(nib.load(p).dataobj) for p in train]
    assert np.array_equal(arrays[0], np.asarray(nib.load(train_b[0]).dataobj))
    assert not np.array_equal(arrays[0], arrays[1])
    other, _ = make_synthetic_dataset(tmp_path / "c", 1, 0, [16, 16, 16], seed=8)
    assert not np.array_equal(arrays[0], np.asarray(nib.load(other[0]).dataobj))

    # Reuse without rewriting (more volumes later keeps the existing ones).
    mtimes = [os.stat(p).st_mtime_ns for p in train]
    train2, _ = make_synthetic_dataset(tmp_path / "a", 4, 2, [16, 16, 16], seed=7)
    assert train2[:3] == train and [os.stat(p).st_mtime_ns for p in train] == mtimes

    # A different existing file is never overwritten.
    with pytest.raises(DataError, match="train_000.nii.gz"):
        make_synthetic_dataset(tmp_path / "a", 1, 0, [16, 16, 16], seed=8)
    assert [os.stat(p).st_mtime_ns for p in train] == mtimes

    # Shape and intensity range after transforms.
    cfg = _cfg(voxel_size=[12, 12, 12])
    out = build_transforms(cfg, spatial_dims=3, train=True)({"image": train[0]})["image"]
    assert tuple(out.shape) == (1, 12, 12, 12) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(out.max()) > 0.5 and float(out.min()) == pytest.approx(0.0, abs=1e-3)


def test_build_datasets_synthetic_and_loaders(tmp_path):
    cfg = _cfg(synthetic={"enabled": True, "num_train": 4, "num_val": 2, "seed": 1}, cache_rate=1.0)
    train_ds, val_ds, info = build_datasets(cfg, spatial_dims=3, in_channels=1, work_dir=tmp_path)
    assert (info["n_train"], info["n_val"], info["source"]) == (4, 2, "synthetic")
    assert str(tmp_path / "synthetic_data") in info["source_description"]
    assert info["val_split"] is None
    assert info["orientation"] == "RAS" and info["shape"] == [16, 16, 16]
    assert info["spacing"] == pytest.approx([1.0, 1.0, 1.0]) and info["affine"].shape == (4, 4)

    train_loader, val_loader = build_loaders(train_ds, val_ds, batch_size=2, num_workers=0, pin_memory=False)
    batch = next(iter(train_loader))["image"]
    assert tuple(batch.shape) == (2, 1, 16, 16, 16)
    assert tuple(next(iter(val_loader))["image"].shape) == (2, 1, 16, 16, 16)
    assert hasattr(batch, "affine")  # MetaTensor keeps the header geometry

    train_loader, val_loader = build_loaders(
        train_ds, val_ds, batch_size=1, num_workers=0, pin_memory=False, distributed=True, num_replicas=2, rank=1
    )
    assert isinstance(train_loader.sampler, torch.utils.data.DistributedSampler)
    assert isinstance(val_loader.sampler, torch.utils.data.DistributedSampler)
    assert train_loader.sampler.shuffle and not val_loader.sampler.shuffle
    assert len(train_loader) == 2 and len(val_loader) == 1
    assert tuple(next(iter(train_loader))["image"].shape) == (1, 1, 16, 16, 16)


def test_persistent_cache_and_split(tmp_path):
    train, _ = make_synthetic_dataset(tmp_path / "imgs", 5, 0, [12, 12, 12], seed=0)
    cfg = _cfg(train_data_dir=str(tmp_path / "imgs"), cache_dir=str(tmp_path / "cache"), voxel_size=[8, 8, 8])
    train_ds, val_ds, info = build_datasets(cfg, spatial_dims=3, in_channels=1)
    assert (info["n_train"], info["n_val"]) == (4, 1)
    assert info["val_files"] == [train[-1]] and "held out" in info["val_split"]
    a = train_ds[0]["image"]
    b = train_ds[0]["image"]  # second read from the disk cache
    assert tuple(a.shape) == (1, 8, 8, 8) and torch.equal(a, b)
    assert any((tmp_path / "cache").rglob("*.pt"))


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: what a cache file handed over by someone else could hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_cache_file_with_code_is_not_run(tmp_path):
    import pickle
    import warnings

    make_synthetic_dataset(tmp_path / "imgs", 3, 0, [8, 8, 8], seed=0)
    cfg = _cfg(train_data_dir=str(tmp_path / "imgs"), cache_dir=str(tmp_path / "cache"), voxel_size=[8, 8, 8])
    train_ds, _, _ = build_datasets(cfg, spatial_dims=3, in_channels=1)
    first = train_ds[0]["image"]
    files = sorted((tmp_path / "cache").rglob("*.pt"))
    assert files
    marker = tmp_path / "payload_ran"
    for f in files:  # every cache file replaced by a pickled payload
        torch.save({"image": _Payload(marker)}, f, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns that it recomputes the file it cannot read
        again = train_ds[0]["image"]
    assert not marker.exists()
    assert torch.equal(first, again)  # recomputed from the volume


# ------------------------------------------------------------------------------------- real header


def test_real_header_reoriented_to_ras(tmp_path):
    src = shutil.copy(ANATOMICAL, tmp_path / "anatomical.nii")
    raw = np.asarray(nib.load(src).dataobj, dtype=np.float32)
    assert raw.shape == (33, 41, 25) and nib.aff2axcodes(nib.load(src).affine) == ("L", "A", "S")

    cfg = _cfg(voxel_size=[33, 41, 25], crop_mode="pad_crop", orientation="RAS")
    out = build_transforms(cfg, spatial_dims=3, train=False)({"image": src})["image"]
    affine = np.asarray(out.affine)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert np.sqrt((affine[:3, :3] ** 2).sum(0)) == pytest.approx([2.0, 2.0, 2.0])
    # LAS -> RAS flips the first axis; compare with the raw array scaled the same way.
    lo, hi = np.percentile(raw, [0.5, 99.5])
    expected = np.clip((raw - lo) / (hi - lo), 0, 1)[::-1]
    assert tuple(out.shape) == (1, 33, 41, 25)
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-4)
    assert not np.allclose(out[0].numpy(), np.clip((raw - lo) / (hi - lo), 0, 1), atol=1e-2)

    # Target spacing of 4 mm halves the grid (whole volume kept in random_patch validation mode).
    cfg4 = _cfg(voxel_size=[16, 16, 16], crop_mode="random_patch", spacing=[4.0, 4.0, 4.0])
    out4 = build_transforms(cfg4, spatial_dims=3, train=False)({"image": src})["image"]
    assert nib.aff2axcodes(np.asarray(out4.affine)) == ("R", "A", "S")
    assert np.sqrt((np.asarray(out4.affine)[:3, :3] ** 2).sum(0)) == pytest.approx([4.0, 4.0, 4.0])
    assert tuple(out4.shape) == (1, 17, 21, 13)
    out4d = build_transforms(cfg4, spatial_dims=3, train=False, divisible_by=8)({"image": src})["image"]
    assert tuple(out4d.shape) == (1, 24, 24, 16)
    patch = build_transforms(cfg4, spatial_dims=3, train=True)({"image": src})["image"]
    assert tuple(patch.shape) == (1, 16, 16, 16)

    # orientation=None keeps the file's LAS orientation and array order.
    keep = build_transforms(_cfg(voxel_size=[33, 41, 25], crop_mode="pad_crop", orientation=None), 3, False)
    kept = keep({"image": src})["image"]
    assert nib.aff2axcodes(np.asarray(kept.affine)) == ("L", "A", "S")
    np.testing.assert_allclose(kept[0].numpy(), expected[::-1], atol=1e-4)

    # build_datasets reports the geometry needed to write samples with the right header.
    (tmp_path / "d").mkdir()
    shutil.copy(src, tmp_path / "d" / "a.nii")
    shutil.copy(src, tmp_path / "d" / "b.nii")
    cfgr = _cfg(train_data_dir=str(tmp_path / "d"), voxel_size=[16, 16, 16], crop_mode="resize")
    _, _, info = build_datasets(cfgr, spatial_dims=3, in_channels=1)
    assert info["input_spacing"] == pytest.approx([2.0, 2.0, 2.0])
    assert info["spacing"] == pytest.approx([2.0 * 33 / 16, 2.0 * 41 / 16, 2.0 * 25 / 16])
    assert nib.aff2axcodes(info["affine"]) == ("R", "A", "S") and info["shape"] == [16, 16, 16]
    assert info["orientation"] == "RAS"
    assert info["n_train"] == 1 and info["n_val"] == 1


# ---------------------------------------------------------------------------------------- bad files


def test_corrupt_file_fail_and_skip(tmp_path):
    good = _write(tmp_path / "good.nii.gz", np.zeros((8, 8, 8), np.float32))
    bad = tmp_path / "x.nii.gz"
    bad.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(DataError, match=r"x\.nii\.gz"):
        check_files([good, str(bad)], in_channels=1, spatial_dims=3, on_read_error="fail")
    with pytest.warns(UserWarning, match=r"x\.nii\.gz"):
        kept = check_files([good, str(bad)], in_channels=1, spatial_dims=3, on_read_error="skip")
    assert kept == [{"image": good}]
    with pytest.warns(UserWarning), pytest.raises(DataError, match="none of"):
        check_files([str(bad)], in_channels=1, spatial_dims=3, on_read_error="skip")


def test_truncated_file_detected(tmp_path):
    full = _write(tmp_path / "full.nii", np.ones((8, 8, 8), np.float32))
    data = open(full, "rb").read()
    (tmp_path / "cut.nii").write_bytes(data[: len(data) - 100])
    gz = _write(tmp_path / "full.nii.gz", np.random.default_rng(0).random((8, 8, 8)).astype(np.float32))
    gdata = open(gz, "rb").read()
    (tmp_path / "cut.nii.gz").write_bytes(gdata[: len(gdata) // 2])
    with pytest.raises(DataError) as e:
        check_files([tmp_path / "cut.nii", tmp_path / "cut.nii.gz", full, gz], 1, 3, "fail")
    assert "cut.nii'" in str(e.value) and "cut.nii.gz" in str(e.value) and "2 of 4" in str(e.value)


def test_channel_mismatch_names_path_and_shape(tmp_path):
    f = _write(tmp_path / "two.nii.gz", np.zeros((8, 8, 8, 2), np.float32))
    with pytest.raises(DataError, match=r"two\.nii\.gz.*\(8, 8, 8, 2\).*in_channels=1"):
        check_files([f], in_channels=1, spatial_dims=3, on_read_error="fail")
    assert check_files([f], in_channels=2, spatial_dims=3) == [{"image": f}]
    flat = _write(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.float32))
    with pytest.raises(DataError, match=r"flat\.nii\.gz.*spatial_dims=3"):
        check_files([flat], in_channels=1, spatial_dims=3)


def test_two_channel_volume_through_transforms(tmp_path):
    rng = np.random.default_rng(0)
    f = _write(tmp_path / "two.nii.gz", rng.random((10, 12, 9, 2)).astype(np.float32))
    out = build_transforms(_cfg(voxel_size=[8, 8, 8]), 3, train=False)({"image": f})["image"]
    assert tuple(out.shape) == (2, 8, 8, 8)


def test_empty_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"empty.*\.nii\.gz|\.nii\.gz.*empty"):
        discover_images(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        discover_images(tmp_path / "nope")
    (tmp_path / "nested" / "sub").mkdir(parents=True)
    _write(tmp_path / "nested" / "sub" / "a.nii.gz", np.zeros((4, 4, 4), np.float32))
    with pytest.raises(DataError, match="not recursive"):
        discover_images(tmp_path / "nested")
    cfg = _cfg(train_data_dir=str(tmp_path / "empty"))
    with pytest.raises(DataError, match="empty"):
        build_datasets(cfg, spatial_dims=3, in_channels=1)


def test_discover_sorted_ignores_hidden(tmp_path):
    for name in ["b.nii.gz", "a.nii", "._a.nii.gz", "c.txt"]:
        if name.endswith("txt"):
            (tmp_path / name).write_text("x")
        else:
            _write(tmp_path / name, np.zeros((4, 4, 4), np.float32))
    assert [os.path.basename(p) for p in discover_images(tmp_path)] == ["a.nii", "b.nii.gz"]


# ---------------------------------------------------------------------------------------- datalists


def test_datalist_relative_paths_and_extra_keys(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        _write(tmp_path / "imgs" / f"s{i}.nii.gz", np.random.default_rng(i).random((10, 10, 10)).astype(np.float32))
    dl = {
        "training": [{"image": "imgs/s0.nii.gz", "age": 40}, {"image": "imgs/s1.nii.gz", "age": 50}],
        "validation": ["imgs/s2.nii.gz"],
    }
    (tmp_path / "lists").mkdir()
    shutil.move(str(tmp_path / "imgs"), str(tmp_path / "lists" / "imgs"))
    path = tmp_path / "lists" / "dl.json"
    path.write_text(json.dumps(dl))
    train = load_datalist(path, "training")
    assert train[0] == {"image": str(tmp_path / "lists" / "imgs" / "s0.nii.gz"), "age": 40}
    assert load_datalist(path, "validation")[0]["image"].endswith("s2.nii.gz")
    with pytest.raises(DataError, match=r"dl\.json.*'test'"):
        load_datalist(path, "test")

    cfg = _cfg(datalist=str(path), voxel_size=[8, 8, 8])
    train_ds, val_ds, info = build_datasets(cfg, spatial_dims=3, in_channels=1)
    assert (info["n_train"], info["n_val"], info["source"]) == (2, 1, "datalist")
    item = train_ds[1]
    assert item["age"] == 50 and tuple(item["image"].shape) == (1, 8, 8, 8)


def test_datalist_missing_file_names_entry(tmp_path):
    _write(tmp_path / "a.nii.gz", np.zeros((4, 4, 4), np.float32))
    path = tmp_path / "dl.json"
    path.write_text(json.dumps({"training": [{"image": "a.nii.gz"}, {"image": "gone.nii.gz"}]}))
    with pytest.raises(DataError, match=r"(?s)dl\.json.*training\[1\].*gone\.nii\.gz"):
        load_datalist(path, "training")
    path.write_text(json.dumps({"training": [{"img": "a.nii.gz"}]}))
    with pytest.raises(DataError, match=r"training\[0\].*'image'"):
        load_datalist(path, "training")


# --------------------------------------------------------------------------------------------- misc


def test_source_errors_are_settings_errors(tmp_path):
    with pytest.raises(ConfigError, match="no data source"):
        settings_from_dict({"data": {"voxel_size": [16, 16, 16]}})
    with pytest.raises(ConfigError, match="exactly one data source"):
        settings_from_dict({"data": {"train_data_dir": str(tmp_path), "synthetic": {"enabled": True}}})


def test_2d_images(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "d").mkdir()
    _write(tmp_path / "d" / "a.nii.gz", rng.random((20, 18)).astype(np.float32))
    _write(tmp_path / "d" / "b.nii.gz", rng.random((20, 18, 1)).astype(np.float32))
    _write(tmp_path / "d" / "c.nii.gz", rng.random((20, 18, 1)).astype(np.float32))
    with pytest.raises(DataError, match="3D volume"):
        check_files([_write(tmp_path / "v.nii.gz", np.zeros((8, 8, 8), np.float32))], 1, spatial_dims=2)
    cfg = _cfg(train_data_dir=str(tmp_path / "d"), voxel_size=[16, 16])
    train_ds, val_ds, info = build_datasets(cfg, spatial_dims=2, in_channels=1)
    assert tuple(train_ds[0]["image"].shape) == (1, 16, 16) and tuple(train_ds[1]["image"].shape) == (1, 16, 16)
    assert info["affine"].shape == (4, 4) and info["orientation"] == "RA" and info["spacing"] == pytest.approx([20 / 16, 18 / 16])
    syn_train, _ = make_synthetic_dataset(tmp_path / "s2", 1, 0, [16, 16], seed=0)
    assert nib.load(syn_train[0]).shape == (16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = build_transforms(cfg, 2, train=False)({"image": syn_train[0]})["image"]
    assert tuple(out.shape) == (1, 16, 16)


def test_2d_png_jpeg_tiff_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    (tmp_path / "png").mkdir()
    for i, ext in enumerate(["png", "jpg", "tif"]):
        Image.fromarray((rng.random((24, 20)) * 255).astype(np.uint8)).save(tmp_path / "png" / f"im{i}.{ext}")
    Image.fromarray(np.zeros((24, 20, 3), np.uint8)).save(tmp_path / "rgb.png")
    files = discover_images(tmp_path / "png", spatial_dims=2)
    assert [os.path.basename(f) for f in files] == ["im0.png", "im1.jpg", "im2.tif"]
    with pytest.raises(DataError, match="spatial_dims=2"):
        discover_images(tmp_path / "png", spatial_dims=3)  # images need 2D settings, and the message says so
    with pytest.raises(DataError, match=r"rgb\.png.*RGB image with 3 channel"):
        check_files([str(tmp_path / "rgb.png")], 1, spatial_dims=2)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"bad\.png.*cannot be read as an image"):
        check_files([str(tmp_path / "bad.png")], 1, spatial_dims=2)
    cfg = _cfg(train_data_dir=str(tmp_path / "png"), voxel_size=[16, 16], orientation="RA")
    train_ds, val_ds, info = build_datasets(cfg, spatial_dims=2, in_channels=1)
    assert info["n_train"] == 2 and info["n_val"] == 1
    image = train_ds[0]["image"]
    assert tuple(image.shape) == (1, 16, 16) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
