"""The seed system's data options: cube sizes, voxel_resize, max_data_size_for_*, use_patch_based,
use_center_crop_for_val, invert_intensity, random_rotate_prob and a fixed intensity range."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from monai_diffusion.data import (
    build_datasets,
    build_transforms,
    make_synthetic_dataset,
    uses_random_patches,
    validates_whole_volumes,
)
from monai_diffusion.settings import ConfigError, build_data_settings, load_settings, settings_from_dict

ANATOMICAL = os.path.join(data_path, "anatomical.nii")  # 33x41x25, LAS, 2 mm voxels


def _write(path, data, affine=None) -> str:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.eye(4) if affine is None else affine), str(path))
    return str(path)


def _cfg(**kw):
    base = {"voxel_size": [8, 8, 8], "cache_rate": 0.0}
    base.update(kw)
    dims = len(base["voxel_size"]) if isinstance(base["voxel_size"], list) else 3
    return build_data_settings(base, spatial_dims=dims)


def _run(cfg, path, train: bool, seed: int | None = None, divisible_by=None) -> np.ndarray:
    tf = build_transforms(cfg, spatial_dims=len(cfg.voxel_size), train=train, divisible_by=divisible_by)
    if seed is not None:
        tf.set_random_state(seed)
    return tf({"image": path})["image"].numpy()


def _ramp(shape, scale: float = 100.0) -> np.ndarray:
    """Distinct values everywhere (no symmetry), in [0, scale)."""
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / np.prod(shape) * scale


def _error(d: dict, stage=None) -> str:
    with pytest.raises(ConfigError) as e:
        settings_from_dict(d, check_paths=False, stage=stage)
    return str(e.value)


# ------------------------------------------------------------------------------------------ settings


def test_int_sizes_mean_a_cube_and_are_stored_as_tuples(tmp_path):
    s = settings_from_dict({"data": {"voxel_size": 16, "voxel_resize": 32}}, check_paths=False)
    assert s.data.voxel_size == (16, 16, 16) and s.data.voxel_resize == (32, 32, 32)
    assert s.to_dict()["data"]["voxel_size"] == [16, 16, 16] and s.to_dict()["data"]["voxel_resize"] == [32, 32, 32]
    assert settings_from_dict(s.to_dict(), check_paths=False) == s
    # one int per spatial axis: 2 for 2D
    s2 = settings_from_dict({"data": {"voxel_size": 16, "voxel_resize": 20},
                             "autoencoder": {"spatial_dims": 2}, "diffusion": {"spatial_dims": 2}}, check_paths=False)
    assert s2.data.voxel_size == (16, 16) and s2.data.voxel_resize == (20, 20)
    assert build_data_settings({"voxel_size": 12}, spatial_dims=2).voxel_size == (12, 12)
    # through --set too
    s3 = load_settings(None, ["data.voxel_size=16", "data.voxel_resize=24"], check_paths=False)
    assert s3.data.voxel_size == (16, 16, 16) and s3.data.voxel_resize == (24, 24, 24)
    # an int cube is still checked against the autoencoder's factors
    assert "data.voxel_size" in _error({"data": {"voxel_size": 18}})
    assert settings_from_dict({}, check_paths=False).data.voxel_resize is None


@pytest.mark.parametrize(
    "data, key, fragment",
    [
        ({"voxel_resize": [32, 32]}, "data.voxel_resize", "3 entries"),
        ({"voxel_size": [16, 16, 16], "voxel_resize": [32, 8, 32]}, "data.voxel_resize", "data.voxel_size"),
        ({"voxel_resize": [32, 0, 32]}, "data.voxel_resize[1]", ">= 1"),
        ({"max_data_size_for_train": 0}, "data.max_data_size_for_train", ">= 1"),
        ({"max_data_size_for_val": 2.5}, "data.max_data_size_for_val", "integer"),
        ({"intensity": {"range": [255, 0]}}, "data.intensity.range", "min must be below max"),
        ({"intensity": {"range": [0, 128, 255]}}, "data.intensity.range", "[min, max]"),
        ({"augmentation": {"random_rotate_prob": 1.5}}, "data.augmentation.random_rotate_prob", "<= 1"),
        ({"augmentation": {"use_center_crop_for_val": "yes"}}, "data.augmentation.use_center_crop_for_val", "true"),
        ({"augmentation": {"use_patch_based": 1}}, "data.augmentation.use_patch_based", "true or false"),
        ({"augmentation": {"invert_intensity": None}}, "data.augmentation.invert_intensity", "null"),
        ({"voxel_size": [16, 32, 16], "augmentation": {"enabled": True, "random_rotate_prob": 0.5}},
         "data.augmentation.random_rotate_prob", "data.voxel_size"),
    ],
)
def test_bad_values_name_the_key(data, key, fragment):
    msg = _error({"data": data})
    assert f"{key}:" in msg and fragment in msg


def test_rotation_needs_square_first_axes_only_when_it_is_applied():
    # not enabled: no rotation, so a non-square plane is fine
    s = settings_from_dict({"data": {"voxel_size": [16, 32, 16], "augmentation": {"random_rotate_prob": 0.5}}},
                           check_paths=False)
    assert s.data.augmentation.random_rotate_prob == 0.5
    s = settings_from_dict({"data": {"voxel_size": [32, 32, 16], "augmentation": {"enabled": True,
                                                                                  "random_rotate_prob": 1}}},
                           check_paths=False)
    assert s.data.augmentation.random_rotate_prob == 1.0


def test_both_spellings_of_random_patches_are_refused_by_stage_2():
    for data, key in (({"crop_mode": "random_patch"}, "data.crop_mode"),
                      ({"augmentation": {"use_patch_based": True}}, "data.augmentation.use_patch_based")):
        msg = _error({"data": data}, stage="diffusion")
        assert f"{key}:" in msg and "stage 1 only" in msg
        settings_from_dict({"data": data}, check_paths=False, stage="autoencoder")


# ------------------------------------------------------------------------------------- voxel_resize


def test_voxel_resize_then_centre_crop(tmp_path):
    f = _write(tmp_path / "v.nii.gz", _ramp((20, 24, 12)))
    rng = [0.0, 100.0]  # linear scaling commutes with the (linear) resize, so the two chains below compare exactly
    resized = _run(_cfg(voxel_size=[16, 16, 8], crop_mode="resize", intensity={"range": rng}), f, train=False)
    assert resized.shape == (1, 16, 16, 8)
    for mode in ("resize", "pad_crop"):  # with voxel_resize, resize means a centre crop, as in the seed
        cfg = _cfg(voxel_size=[12, 12, 8], voxel_resize=[16, 16, 8], crop_mode=mode, intensity={"range": rng})
        for train in (True, False):
            out = _run(cfg, f, train=train)
            assert out.shape == (1, 12, 12, 8)
            np.testing.assert_allclose(out, resized[:, 2:14, 2:14, :], atol=1e-5)
    # random patches come from the resized volume; validation keeps the whole resized volume
    cfg = _cfg(voxel_size=[12, 12, 8], voxel_resize=[16, 16, 8], crop_mode="random_patch", intensity={"range": rng})
    patch = _run(cfg, f, train=True, seed=3)
    assert patch.shape == (1, 12, 12, 8)
    assert any(np.allclose(patch, resized[:, i:i + 12, j:j + 12, :], atol=1e-5) for i in range(5) for j in range(5))
    np.testing.assert_allclose(_run(cfg, f, train=False), resized, atol=1e-5)


def test_voxel_resize_in_2d(tmp_path):
    f = _write(tmp_path / "i.nii.gz", _ramp((30, 18)))
    out = _run(_cfg(voxel_size=[8, 8], voxel_resize=12, orientation="RA"), f, train=False)
    assert out.shape == (1, 8, 8)


# ---------------------------------------------------------------------------------- max_data_size


def _folder(path: Path, n: int, shape=(6, 6, 6)) -> list[str]:
    """``n`` sorted volumes, each with its own values."""
    path.mkdir()
    return [_write(path / f"v{i:02d}.nii.gz", _ramp(shape) + i) for i in range(n)]


def test_max_data_size_folders_keeps_the_first_sorted_files(tmp_path, caplog):
    train = _folder(tmp_path / "train", 5)
    val = _folder(tmp_path / "val", 3)
    (tmp_path / "train" / "zz_broken.nii.gz").write_bytes(b"not a volume")  # after the first N: never read
    cfg = _cfg(train_data_dir=str(tmp_path / "train"), val_data_dir=str(tmp_path / "val"),
               max_data_size_for_train=2, max_data_size_for_val=1)
    with caplog.at_level(logging.INFO, logger="monai_diffusion.data"):
        train_ds, val_ds, info = build_datasets(cfg, spatial_dims=3, in_channels=1)
    assert (len(train_ds), len(val_ds), info["n_train"], info["n_val"]) == (2, 1, 2, 1)
    assert info["train_files"] == train[:2] and info["val_files"] == val[:1]
    assert "first 2 of 6 training files" in info["subset"] and "first 1 of 3 validation files" in info["subset"]
    assert "first 2 of 6 training files" in caplog.text
    # limits as large as the lists change nothing
    (tmp_path / "train" / "zz_broken.nii.gz").unlink()
    cfg = _cfg(train_data_dir=str(tmp_path / "train"), val_data_dir=str(tmp_path / "val"),
               max_data_size_for_train=5, max_data_size_for_val=3)
    _, _, info = build_datasets(cfg, spatial_dims=3, in_channels=1)
    assert (info["n_train"], info["n_val"], info["subset"]) == (5, 3, None)


def test_max_data_size_after_the_held_out_split(tmp_path):
    train = _folder(tmp_path / "train", 10)
    cfg = _cfg(train_data_dir=str(tmp_path / "train"), max_data_size_for_train=3)
    _, _, info = build_datasets(cfg, spatial_dims=3, in_channels=1)
    assert info["train_files"] == train[:3] and info["val_files"] == train[9:]


def test_max_data_size_datalist_and_synthetic(tmp_path):
    files = _folder(tmp_path / "imgs", 4)
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"training": files[::-1][:3], "validation": files[:2]}))
    _, _, info = build_datasets(_cfg(datalist=str(dl), max_data_size_for_train=2, max_data_size_for_val=1),
                                spatial_dims=3, in_channels=1)
    assert info["train_files"] == files[::-1][:2] and info["val_files"] == files[:1]  # datalist order

    syn = {"enabled": True, "num_train": 4, "num_val": 3, "seed": 0}
    cfg = _cfg(synthetic=syn, max_data_size_for_train=2, max_data_size_for_val=1)
    train_ds, val_ds, info = build_datasets(cfg, spatial_dims=3, in_channels=1, work_dir=tmp_path)
    assert (len(train_ds), len(val_ds)) == (2, 1)
    assert [os.path.basename(p) for p in info["train_files"]] == ["train_000.nii.gz", "train_001.nii.gz"]
    assert [os.path.basename(p) for p in info["val_files"]] == ["val_000.nii.gz"]


# ------------------------------------------------------------------------ patches and validation crops


def test_use_patch_based_gives_varied_patches_like_random_patch(tmp_path):
    f = _write(tmp_path / "v.nii.gz", _ramp((20, 16, 12)))
    full = _run(_cfg(voxel_size=[20, 16, 12], crop_mode="pad_crop", intensity={"range": [0, 100]}), f, False)
    cfg = _cfg(voxel_size=[8, 8, 8], augmentation={"use_patch_based": True}, intensity={"range": [0, 100]})
    assert cfg.crop_mode == "resize" and uses_random_patches(cfg) and validates_whole_volumes(cfg)
    tf = build_transforms(cfg, spatial_dims=3, train=True)
    tf.set_random_state(0)
    patches = [tf({"image": f})["image"].numpy() for _ in range(6)]
    corners = set()
    for p in patches:
        assert p.shape == (1, 8, 8, 8)
        hits = [(i, j, k) for i in range(13) for j in range(9) for k in range(5)
                if np.array_equal(p, full[:, i:i + 8, j:j + 8, k:k + 8])]
        assert len(hits) == 1
        corners.add(hits[0])
    assert len(corners) > 1  # random positions, not one crop
    # the same draws as crop_mode: random_patch
    same = _cfg(voxel_size=[8, 8, 8], crop_mode="random_patch", intensity={"range": [0, 100]})
    for seed in (1, 2):
        np.testing.assert_array_equal(_run(cfg, f, True, seed=seed), _run(same, f, True, seed=seed))
    # validation: the whole volume (padded to the divisor), as with random_patch
    np.testing.assert_array_equal(_run(cfg, f, False, divisible_by=8), _run(same, f, False, divisible_by=8))
    assert _run(cfg, f, False, divisible_by=8).shape == (1, 24, 16, 16)
    # a volume smaller than the patch is padded first
    small = _write(tmp_path / "s.nii.gz", _ramp((6, 10, 4)) + 1)
    p = _run(cfg, small, True, seed=0)
    assert p.shape == (1, 8, 8, 8) and (p == 0).any() and p.max() > 0


def test_use_center_crop_for_val(tmp_path):
    f = _write(tmp_path / "v.nii.gz", _ramp((20, 16, 6)))
    rng = {"range": [0, 100]}
    full = _run(_cfg(voxel_size=[20, 16, 6], crop_mode="pad_crop", intensity=rng), f, False)
    centre = _cfg(voxel_size=[8, 8, 8], augmentation={"use_patch_based": True, "use_center_crop_for_val": True},
                  intensity=rng)
    assert uses_random_patches(centre) and not validates_whole_volumes(centre)
    out = _run(centre, f, train=False, divisible_by=8)
    assert out.shape == (1, 8, 8, 8)
    np.testing.assert_array_equal(out[:, :, :, 1:7], full[:, 6:14, 4:12, :])  # centre crop on the first axes
    assert (out[:, :, :, 0] == 0).all() and (out[:, :, :, 7] == 0).all()  # padded on the short axis
    # false: resized to voxel_size, as crop_mode resize does
    resized = _cfg(voxel_size=[8, 8, 8], crop_mode="random_patch", augmentation={"use_center_crop_for_val": False},
                   intensity=rng)
    np.testing.assert_allclose(_run(resized, f, False), _run(_cfg(voxel_size=[8, 8, 8], intensity=rng), f, False))
    # training is unchanged by the validation option
    np.testing.assert_array_equal(_run(centre, f, True, seed=4),
                                  _run(_cfg(voxel_size=[8, 8, 8], crop_mode="random_patch", intensity=rng), f, True,
                                       seed=4))
    # true with crop_mode resize: validation is cropped while training is resized
    crop_val = _cfg(voxel_size=[8, 8, 8], augmentation={"use_center_crop_for_val": True}, intensity=rng)
    np.testing.assert_array_equal(_run(crop_val, f, False), out)
    assert not np.allclose(_run(crop_val, f, True), out, atol=1e-2)


def test_datasets_report_whole_volume_validation(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("a.nii", "b.nii"):
        shutil.copy(ANATOMICAL, tmp_path / "d" / name)
    base = {"train_data_dir": str(tmp_path / "d"), "voxel_size": [16, 16, 16]}
    _, val_ds, info = build_datasets(_cfg(**base, augmentation={"use_patch_based": True}), 3, 1, divisible_by=4)
    assert info["val_whole_volumes"] and tuple(val_ds[0]["image"].shape) == (1, 36, 44, 28)
    assert info["shape"] == [16, 16, 16] and nib.aff2axcodes(info["affine"]) == ("R", "A", "S")
    _, val_ds, info = build_datasets(
        _cfg(**base, augmentation={"use_patch_based": True, "use_center_crop_for_val": True}), 3, 1, divisible_by=4)
    assert not info["val_whole_volumes"] and tuple(val_ds[0]["image"].shape) == (1, 16, 16, 16)
    assert info["shape"] == [16, 16, 16]


def test_stage1_validates_use_patch_based_runs_with_sliding_windows(tmp_path, monkeypatch):
    """The stage-1 driver keys its whole-volume validation on the helper, not on crop_mode alone."""
    import monai_diffusion.stage1 as stage1

    (tmp_path / "d").mkdir()
    for name in ("a.nii", "b.nii", "c.nii"):
        shutil.copy(ANATOMICAL, tmp_path / "d" / name)
    seen = {}

    def fake_loop(stage, train_loader, val_loader, loop_cfg, runtime):
        seen.update(val_tile=stage.val_window, val_batch=val_loader.batch_size, val_shape=tuple(
            next(iter(val_loader))["image"].shape))
        raise RuntimeError("stop here")

    monkeypatch.setattr(stage1, "run_loop", fake_loop)
    common = [f"data.train_data_dir={tmp_path / 'd'}", "data.synthetic={enabled: false}", "data.voxel_size=16",
              "data.cache_rate=0", "autoencoder.num_channels=[4, 8, 8]", "autoencoder.norm_num_groups=4",
              "autoencoder.attention_levels=[false, false, false]", "autoencoder.training.batch_size=2",
              "autoencoder.training.use_perceptual_loss=false", "device.use_cuda=false",
              "diffusion.num_channels=[8, 8]", "diffusion.attention_levels=[false, true]",
              "diffusion.num_head_channels=8", "diffusion.norm_num_groups=4"]
    for extra, tile in ((["data.augmentation.use_patch_based=true"], (16, 16, 16)),
                        (["data.augmentation.use_patch_based=true", "data.augmentation.use_center_crop_for_val=true"],
                         None)):
        run = [*common, *extra, f"autoencoder.checkpoints.output_dir={tmp_path / str(len(extra)) / 'ae'}"]
        with pytest.raises(RuntimeError, match="stop here"):
            stage1.train_autoencoder(load_settings(None, run))
        assert seen["val_tile"] == tile
        assert seen["val_batch"] == (1 if tile else 2)
        assert seen["val_shape"] == ((1, 1, 36, 44, 28) if tile else (1, 1, 16, 16, 16))


# ------------------------------------------------------------------------------- intensity options


def test_fixed_intensity_range_maps_exact_values(tmp_path):
    values = np.array([-10.0, 0.0, 51.0, 127.5, 255.0, 300.0], np.float32)
    f = _write(tmp_path / "v.nii.gz", np.tile(values, (6, 1, 1)).reshape(6, 6, 1).repeat(2, axis=2))
    # pad_crop to the volume's own size: only the intensity transform changes the values
    clipped = _run(_cfg(voxel_size=[6, 6, 2], crop_mode="pad_crop", intensity={"range": [0, 255]}), f, False)
    np.testing.assert_allclose(clipped[0, 0, :, 0], [0, 0, 0.2, 0.5, 1, 1], atol=1e-6)
    raw = _run(_cfg(voxel_size=[6, 6, 2], crop_mode="pad_crop", intensity={"range": [0, 255], "clip": False}), f,
               False)
    np.testing.assert_allclose(raw[0, 0, :, 0], values / 255, atol=1e-6)
    # the percentile scaling (the default) gives other values on the same volume
    assert not np.allclose(_run(_cfg(voxel_size=[6, 6, 2], crop_mode="pad_crop"), f, False), clipped)


def test_synthetic_data_is_not_rescaled_by_a_range(tmp_path):
    train, _ = make_synthetic_dataset(tmp_path / "s", 1, 0, [8, 8, 8], seed=0)
    syn = {"enabled": True}
    plain = _run(_cfg(synthetic=syn), train[0], False)
    ranged = _run(_cfg(synthetic=syn, intensity={"range": [0, 255]}), train[0], False)
    np.testing.assert_array_equal(plain, ranged)
    assert plain.max() > 0.5  # not divided by 255


def test_invert_intensity_training_and_validation(tmp_path):
    f = _write(tmp_path / "v.nii.gz", 10 + _ramp((8, 8, 8), scale=80))  # values in [10, 90)
    rng = {"range": [0, 100]}
    for train in (True, False):
        plain = _run(_cfg(crop_mode="pad_crop", intensity=rng), f, train)
        inverted = _run(_cfg(crop_mode="pad_crop", intensity=rng, augmentation={"invert_intensity": True}), f, train)
        np.testing.assert_allclose(inverted, plain.max() + plain.min() - plain, atol=1e-6)
        assert inverted[0, 0, 0, 0] == pytest.approx(plain.max()) and inverted.max() == pytest.approx(plain.max())
    # after percentile scaling too (clipped to [0, 1], so the volume becomes 1 - value)
    plain = _run(_cfg(crop_mode="pad_crop"), f, False)
    inverted = _run(_cfg(crop_mode="pad_crop", augmentation={"invert_intensity": True}), f, False)
    np.testing.assert_allclose(inverted, 1.0 - plain, atol=1e-6)
    # and on the built-in synthetic volumes
    syn, _ = make_synthetic_dataset(tmp_path / "s", 1, 0, [8, 8, 8], seed=0)
    splain = _run(_cfg(synthetic={"enabled": True}), syn[0], False)
    sinv = _run(_cfg(synthetic={"enabled": True}, augmentation={"invert_intensity": True}), syn[0], False)
    np.testing.assert_allclose(sinv, splain.max() + splain.min() - splain, atol=1e-6)


def test_disk_cache_follows_the_new_options(tmp_path):
    """A PersistentDataset never serves a volume cached under other options."""
    (tmp_path / "d").mkdir()
    for i in range(3):
        _write(tmp_path / "d" / f"v{i}.nii.gz", _ramp((8, 8, 8), scale=4))
    base = {"train_data_dir": str(tmp_path / "d"), "cache_dir": str(tmp_path / "cache"), "crop_mode": "pad_crop",
            "intensity": {"range": [0, 4]}}

    def first(**kw):
        return build_datasets(_cfg(**{**base, **kw}), 3, 1)[0][0]["image"].numpy()

    plain = first()
    np.testing.assert_allclose(plain[0], _ramp((8, 8, 8), scale=1), atol=1e-6)
    np.testing.assert_allclose(first(augmentation={"invert_intensity": True}), plain.max() + plain.min() - plain,
                               atol=1e-6)
    np.testing.assert_allclose(first(intensity={"range": [0, 8]}), plain / 2, atol=1e-6)
    resized = first(voxel_resize=[12, 12, 12])
    assert resized.shape == (1, 8, 8, 8) and not np.allclose(resized, plain, atol=1e-3)
    np.testing.assert_allclose(first(), plain)  # and the first entry is still served as it was


# --------------------------------------------------------------------------------------- rotation


def test_random_rotate_prob(tmp_path):
    f = _write(tmp_path / "v.nii.gz", _ramp((10, 10, 4)))
    rng = {"range": [0, 100]}
    full = _run(_cfg(voxel_size=[10, 10, 4], crop_mode="pad_crop", intensity=rng), f, False)
    rotated = _cfg(voxel_size=[10, 10, 4], crop_mode="pad_crop", intensity=rng,
                   augmentation={"enabled": True, "random_flip_prob": 0, "random_rotate_prob": 1})
    tf = build_transforms(rotated, 3, train=True)
    tf.set_random_state(0)
    turns = set()
    for _ in range(8):
        out = tf({"image": f})["image"].numpy()
        k = [k for k in (1, 2, 3) if np.array_equal(out[0], np.rot90(full[0], k, axes=(0, 1)))]
        assert len(k) == 1  # always rotated, in the plane of the first two axes
        turns.add(k[0])
    assert len(turns) > 1
    # validation is never rotated, nor training without augmentation.enabled
    np.testing.assert_array_equal(_run(rotated, f, False), full)
    off = _cfg(voxel_size=[10, 10, 4], crop_mode="pad_crop", intensity=rng,
               augmentation={"enabled": False, "random_rotate_prob": 1})
    np.testing.assert_array_equal(_run(off, f, True, seed=0), full)


def test_docs_describe_every_data_option():
    doc = (Path(__file__).resolve().parents[1] / "monai_diffusion" / "docs" / "data_options.md").read_text()
    for key in ("voxel_size", "voxel_resize", "max_data_size_for_train", "max_data_size_for_val",
                "augmentation.use_patch_based", "augmentation.use_center_crop_for_val",
                "augmentation.invert_intensity", "augmentation.random_rotate_prob", "intensity.range"):
        assert f"### `data.{key}`" in doc or f"`data.{key}`" in doc, key
