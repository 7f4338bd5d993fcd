"""Tests for monai_diffusion.synthetic: the built-in phantom, microtubules and brain datasets."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest

from monai_diffusion.data import DataError
from monai_diffusion.synthetic import (
    KINDS,
    PARAMS,
    MicrotubuleParams,
    default_spacing,
    generate_volume,
    make_params,
    make_synthetic_dataset,
)
from monai_diffusion import synthetic

MT = "microtubules"
MT_SHAPE = [32, 32, 16]


def _load(path):
    return np.asarray(nib.load(path).dataobj, dtype=np.float32)


# ---------------------------------------------------------------------------------------- registry and errors


def test_registry_params_documented_and_frozen():
    assert set(KINDS) == set(PARAMS) == {"phantom", "microtubules", "brain"}
    for kind, cls in PARAMS.items():
        p = make_params(kind)
        assert isinstance(p, cls) and make_params(kind, None) == p and make_params(kind, p) is p
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{kind}.{f.name} has no doc"
        if dataclasses.fields(cls):
            name = dataclasses.fields(cls)[0].name
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(p, name, 1)
    assert make_params(MT, {"max_filaments": 3, "min_filaments": 2}).max_filaments == 3
    # Names unique across kinds and apart from the section's own keys: they can live flat under data.synthetic.
    names = [f.name for cls in PARAMS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names)) and not set(names) & {"enabled", "kind", "num_train", "num_val", "seed"}


def test_unknown_kind_param_and_bad_values(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"'cells'.*\['phantom', 'microtubules', 'brain'\]"):
        make_synthetic_dataset(out, 1, 0, MT_SHAPE, seed=0, kind="cells")
    with pytest.raises(DataError, match=r"\['stiffness'\].*'microtubules'.*persistence_length_um"):
        make_synthetic_dataset(out, 1, 0, MT_SHAPE, seed=0, kind=MT, params={"stiffness": 3.0})
    with pytest.raises(DataError, match=r"\['sigma'\].*'phantom'.*none"):
        make_synthetic_dataset(out, 1, 0, MT_SHAPE, seed=0, params={"sigma": 1})
    with pytest.raises(DataError, match=r"psf_sigma_nm.*> 0.*-1"):
        make_params(MT, {"psf_sigma_nm": -1.0})
    with pytest.raises(DataError, match=r"min_filaments.*integer.*2\.5"):
        make_params(MT, {"min_filaments": 2.5})
    with pytest.raises(DataError, match=r"max_filaments \(2\).*min_filaments \(5\)"):
        make_params(MT, {"min_filaments": 5, "max_filaments": 2})
    with pytest.raises(DataError, match=r"gamma.*<= 0\.9"):
        make_params("brain", {"gamma": 1.5})
    with pytest.raises(DataError, match="voxel_size"):
        make_synthetic_dataset(out, 1, 0, [8], seed=0, kind=MT)
    with pytest.raises(DataError, match=r"spacing.*3 positive"):
        make_synthetic_dataset(out, 1, 0, MT_SHAPE, seed=0, kind=MT, spacing=[1.0, 0.0, 1.0])
    # A spacing in the wrong unit (1 mm voxels of a microscopy field; 20 nm voxels of a brain) is caught early.
    with pytest.raises(DataError, match=r"microtubules: spacing \[1\.0, 1\.0, 1\.0\] mm.*localisations"):
        make_synthetic_dataset(out, 1, 0, MT_SHAPE, seed=0, kind=MT, spacing=[1.0, 1.0, 1.0])
    with pytest.raises(DataError, match=r"brain: spacing \[2e-05, 2e-05\] mm.*0\.5 mm"):
        generate_volume("brain", [16, 16], spacing=[2e-5, 2e-5])
    assert not out.exists()  # every error is raised before anything is written


def test_docs_list_every_kind_and_parameter():
    doc = open(os.path.join(os.path.dirname(synthetic.__file__), "docs", "datasets.md"), encoding="utf-8").read()
    for kind, cls in PARAMS.items():
        assert f"## `{kind}`" in doc
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` | {f.default} |" in doc, f"{kind}.{f.name} (default {f.default}) not in datasets.md"


def test_default_spacing():
    assert default_spacing("phantom", 3) == (1.0, 1.0, 1.0) and default_spacing("phantom", 2) == (1.0, 1.0)
    lat, _, ax = default_spacing(MT, 3)
    assert 1e-5 <= lat <= 2e-5 + 1e-12 and ax > lat and default_spacing(MT, 2) == (lat, lat)
    for shape in [(96, 112, 96), (32, 32, 32), (64, 80)]:
        sp = default_spacing("brain", len(shape), shape)
        assert len(set(sp)) == 1 and len(sp) == len(shape)
        assert all(n * s >= e for n, s, e in zip(shape, sp, synthetic._MNI_BRAIN_EXTENT_MM))
    with pytest.raises(DataError, match="spatial_dims"):
        default_spacing(MT, 4)


# ---------------------------------------------------------------------------------------- phantom


def test_phantom_kind_is_the_default(tmp_path):
    a, _ = make_synthetic_dataset(tmp_path / "a", 1, 0, [12, 12, 12], seed=4)
    b, _ = make_synthetic_dataset(tmp_path / "b", 1, 0, [12, 12, 12], seed=4, kind="phantom", spacing=None)
    assert np.array_equal(_load(a[0]), _load(b[0]))
    manifest = json.loads((tmp_path / "b" / "synthetic_manifest.json").read_text())
    record = manifest["files"]["train_000.nii.gz"]["params"]
    assert manifest["kind"] == record["kind"] == "phantom" and record["generator_params"] == {}


# ---------------------------------------------------------------------------------------- microtubules


def test_microtubules_deterministic_distinct_range_and_header(tmp_path):
    train, val = make_synthetic_dataset(tmp_path / "a", 2, 1, MT_SHAPE, seed=3, kind=MT)
    again, _ = make_synthetic_dataset(tmp_path / "b", 2, 0, MT_SHAPE, seed=3, kind=MT)
    vols = [_load(p) for p in train + val]
    assert np.array_equal(vols[0], _load(again[0])) and np.array_equal(vols[1], _load(again[1]))
    assert not np.array_equal(vols[0], vols[1]) and not np.array_equal(vols[0], vols[2])
    other = generate_volume(MT, MT_SHAPE, seed=4)
    assert not np.array_equal(vols[0], other)
    assert np.array_equal(generate_volume(MT, MT_SHAPE, seed=3, index=1), vols[1])
    for v in vols:
        assert v.shape == tuple(MT_SHAPE) and v.min() >= 0.0 and v.max() <= 1.0
        assert v.max() > 0.5 and 0.005 < (v > 0.2).mean() < 0.5  # sparse bright filaments on a dark field
    img = nib.load(train[0])
    assert img.header.get_zooms() == pytest.approx(default_spacing(MT, 3), rel=1e-5)
    assert img.header.get_xyzt_units()[0] == "mm"
    sp = (4e-5, 4e-5, 6e-5)
    custom, _ = make_synthetic_dataset(tmp_path / "c", 1, 0, MT_SHAPE, seed=3, kind=MT, spacing=sp)
    assert nib.load(custom[0]).header.get_zooms() == pytest.approx(sp, rel=1e-5)


def test_microtubules_parameters_act():
    base = {"background_density": 0.0}
    # Anisotropy: a longer axial PSF smooths along z, not along x (same filaments: same seed).
    def z_over_x(ratio):
        v = generate_volume(MT, MT_SHAPE, seed=1, params={**base, "axial_ratio": ratio})
        return np.abs(np.diff(v, axis=2)).mean() / np.abs(np.diff(v, axis=0)).mean()

    assert z_over_x(4.0) < 0.7 * z_over_x(1.0)
    # Count: more filaments, more signal.
    few = generate_volume(MT, MT_SHAPE, seed=1, params={**base, "min_filaments": 1, "max_filaments": 1})
    many = generate_volume(MT, MT_SHAPE, seed=1, params={**base, "min_filaments": 12, "max_filaments": 12})
    assert many.sum() > 3 * few.sum()
    # One isolated filament peaks near the nominal 0.75 (Poisson counts and voxel phase spread it).
    peak = generate_volume(MT, [48, 48], seed=2, params={**base, "min_filaments": 1, "max_filaments": 1}).max()
    assert 0.55 < peak < 0.98
    # Noise: off by default (SMLM renders have none), additive Gaussian (clipped at 0 and 1) when asked.
    quiet = generate_volume(MT, MT_SHAPE, seed=1, params=base)
    noisy = generate_volume(MT, MT_SHAPE, seed=1, params={**base, "gaussian_noise": 0.05})
    assert 0.02 < float((noisy - quiet).std()) < 0.05 and noisy.min() >= 0.0 and noisy.max() <= 1.0


def test_worm_like_chain_stiffness():
    def end_to_end_cosine(lp_um):
        p = MicrotubuleParams(persistence_length_um=lp_um, min_filaments=20, max_filaments=20)
        rng = np.random.default_rng(0)
        _, tangents = synthetic._worm_like_chains(rng, np.array([5000.0, 5000.0, 1500.0]), 20, p, 10.0)
        return float(np.mean(np.sum(tangents[:, 0] * tangents[:, -1], axis=1)))

    stiff, floppy = end_to_end_cosine(200.0), end_to_end_cosine(2.0)
    assert stiff > 0.9 and floppy < 0.5

    # Filaments stay within max_tilt_deg of the lateral plane, however floppy.
    p = MicrotubuleParams(persistence_length_um=1.0, max_tilt_deg=5.0)
    _, tangents = synthetic._worm_like_chains(np.random.default_rng(1), np.array([3000.0, 3000.0, 800.0]), 8, p, 10.0)
    elevation = np.degrees(np.arctan2(np.abs(tangents[..., 2]), np.linalg.norm(tangents[..., :2], axis=-1)))
    assert elevation.max() <= 5.0 + 1e-6 and elevation.max() > 4.0


def test_microtubules_2d(tmp_path):
    train, _ = make_synthetic_dataset(tmp_path, 2, 0, [40, 36], seed=0, kind=MT)
    img = nib.load(train[0])
    assert img.shape == (40, 36) and img.header.get_zooms() == pytest.approx(default_spacing(MT, 2), rel=1e-5)
    a, b = _load(train[0]), _load(train[1])
    assert not np.array_equal(a, b) and a.min() >= 0 and a.max() <= 1 and a.max() > 0.5


def test_manifest_reuse_and_refusal(tmp_path):
    params = {"max_filaments": 5}
    train, val = make_synthetic_dataset(tmp_path, 2, 1, MT_SHAPE, seed=0, kind=MT, params=params)
    manifest = json.loads((tmp_path / "synthetic_manifest.json").read_text())
    rec = manifest["files"]["val_000.nii.gz"]
    assert manifest["kind"] == MT and manifest["params"]["max_filaments"] == 5
    assert rec["params"]["generator_params"] == dataclasses.asdict(make_params(MT, params)) and len(rec["sha256"]) == 64
    mtimes = [os.stat(p).st_mtime_ns for p in train + val]
    more, _ = make_synthetic_dataset(tmp_path, 3, 1, MT_SHAPE, seed=0, kind=MT, params=params)
    assert more[:2] == train and [os.stat(p).st_mtime_ns for p in train + val] == mtimes
    with pytest.raises(DataError, match=r"train_000\.nii\.gz.*refusing to overwrite"):
        make_synthetic_dataset(tmp_path, 1, 0, MT_SHAPE, seed=0, kind=MT, params={"max_filaments": 6})
    with pytest.raises(DataError, match=r"train_000\.nii\.gz.*'phantom'"):
        make_synthetic_dataset(tmp_path, 1, 0, MT_SHAPE, seed=0, kind="phantom")
    assert [os.stat(p).st_mtime_ns for p in train + val] == mtimes
    # A lost manifest: identical files are recognised by their content and kept.
    (tmp_path / "synthetic_manifest.json").unlink()
    make_synthetic_dataset(tmp_path, 2, 1, MT_SHAPE, seed=0, kind=MT, params=params)
    assert [os.stat(p).st_mtime_ns for p in train + val] == mtimes
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary files left behind


# ---------------------------------------------------------------------------------------- brain


def test_brain_without_nilearn_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nilearn", None)
    monkeypatch.setitem(sys.modules, "nilearn.datasets", None)
    with pytest.raises(DataError, match=r'nilearn.*pip install -e "\.\[brain\]"'):
        make_synthetic_dataset(tmp_path / "b", 1, 0, [16, 16, 16], seed=0, kind="brain")
    assert not (tmp_path / "b").exists()
    with pytest.raises(DataError, match="nilearn"):
        generate_volume("brain", [16, 16])


def test_brain_subjects(tmp_path):
    pytest.importorskip("nilearn")
    data, _ = synthetic._mni_template()
    assert data.shape == synthetic._MNI_BRAIN_EXTENT_MM  # the constant behind default_spacing is the template's
    shape = [24, 28, 24]
    train, val = make_synthetic_dataset(tmp_path / "a", 2, 1, shape, seed=0, kind="brain")
    again, _ = make_synthetic_dataset(tmp_path / "b", 1, 0, shape, seed=0, kind="brain")
    vols = [_load(p) for p in train + val]
    assert np.array_equal(vols[0], _load(again[0]))
    img = nib.load(train[0])
    assert img.shape == tuple(shape)
    assert img.header.get_zooms() == pytest.approx(default_spacing("brain", 3, shape), rel=1e-5)
    for v in vols:
        assert v.min() >= 0.0 and v.max() <= 1.0 and 0.2 < (v > 0.1).mean() < 0.8
        border = np.concatenate([v[[0, -1]].ravel(), v[:, [0, -1]].ravel(), v[:, :, -1].ravel()])
        assert border.mean() < 0.1 and v[8:-8, 8:-8, 8:-8].mean() > 0.3  # the brain fits, centred (brainstem aside)
    # Same anatomy, different subjects: strongly correlated, never identical.
    c = [np.corrcoef(vols[0].ravel(), v.ravel())[0, 1] for v in vols[1:]]
    assert all(0.5 < x < 0.995 for x in c)
    still = {k: 0.0 for k in ("elastic_mm", "rotate_deg", "scale", "translate_mm", "bias", "gamma", "rician_noise")}
    plain = generate_volume("brain", shape, seed=0, params=still)
    twin = generate_volume("brain", shape, seed=5, index=1, params=still)
    assert plain.max() > 0.9 and not np.allclose(plain, vols[0], atol=0.05)
    assert np.allclose(plain, twin, atol=1e-5)  # every random change switched off: the template itself


def test_brain_2d(tmp_path):
    pytest.importorskip("nilearn")
    train, _ = make_synthetic_dataset(tmp_path, 2, 0, [28, 32], seed=0, kind="brain")
    img = nib.load(train[0])
    assert img.shape == (28, 32) and img.header.get_zooms() == pytest.approx(default_spacing("brain", 2, (28, 32)))
    a, b = _load(train[0]), _load(train[1])
    assert not np.array_equal(a, b) and a.min() >= 0 and a.max() <= 1 and 0.2 < (a > 0.1).mean() < 0.85
