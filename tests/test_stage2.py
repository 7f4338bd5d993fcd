"""Stage 2 and sampling: fast_dev_run, resume, UNet/latent checks, sample geometry, conditioning, latent cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.testing import data_path as NIB_DATA

from monai_diffusion.cli import generate_samples_main, train_diffusion_main
from monai_diffusion.settings import ConfigError
from monai_diffusion.checkpoints import load_checkpoint
from monai_diffusion.errors import RunError
from monai_diffusion.generate import generate_samples
from monai_diffusion.settings import load_settings
from monai_diffusion.stage1 import train_autoencoder
from monai_diffusion.stage2 import train_diffusion

from conftest import QUICKSTART, cli_args, tiny_overrides


def overrides(root: Path, data: list[str], *extra: str) -> list[str]:
    """The tiny run on ``data`` (overrides naming the data source): autoencoder [4, 8] with factor 4, 50 timesteps,
    two diffusion epochs that visibly train, a sample in the second, sampling of 3 samples in 5 steps from seed 0."""
    return tiny_overrides(
        root,
        *data,
        "autoencoder.training.discriminator={num_layers_d: 2, num_channels: 4}",
        "diffusion.scheduler.num_train_timesteps=50",
        "diffusion.training.n_epochs=2",
        "diffusion.training.generate_samples_interval=2",
        "diffusion.training.num_samples_to_generate=1",
        "diffusion.training.scale_factor_batches=2",
        # pinned, so that one or two epochs visibly train (the quickstart warms up, keeps an EMA, caches latents)
        "diffusion.training.lr_warmup_steps=0",
        "diffusion.training.lr_schedule=constant",
        "diffusion.training.ema_decay=null",
        "diffusion.training.cache_latents=false",
        "diffusion.training.val_interval=1",
        "sampling.num_inference_steps=5",
        "sampling.num_samples=3",
        "sampling.batch_size=2",
        "sampling.seed=0",
        *extra,
    )


SYNTHETIC = ["data.synthetic={enabled: true, num_train: 4, num_val: 2, seed: 0}"]


def real_data(datalist: Path) -> list[str]:
    return [f"data.datalist={datalist}", "data.synthetic={enabled: false}", "data.crop_mode=pad_crop"]


@pytest.fixture(scope="module")
def real_header_data(tmp_path_factory) -> tuple[Path, Path]:
    """A datalist of nibabel's anatomical.nii (33x41x25, LAS, 2 mm) with a class and a covariate per volume."""
    root = tmp_path_factory.mktemp("real")
    entries = []
    for i in range(6):
        path = root / f"vol{i}.nii"
        shutil.copy(Path(NIB_DATA) / "anatomical.nii", path)
        entries.append({"image": path.name, "group": i % 2, "age": 20.0 + 10 * i})
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({"training": entries[:4], "validation": entries[4:]}))
    return root, datalist


@pytest.fixture(scope="module")
def synthetic_ae(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    train_autoencoder(load_settings(QUICKSTART, overrides(root, SYNTHETIC)))
    return root


@pytest.fixture(scope="module")
def real_ae(real_header_data) -> Path:
    root, datalist = real_header_data
    data = real_data(datalist)
    train_autoencoder(load_settings(QUICKSTART, overrides(root, data)))
    return root


def _settings(root: Path, data: list[str], *extra: str):
    return load_settings(QUICKSTART, overrides(root, data, *extra))


def test_fast_dev_run_of_stage_two(synthetic_ae, tmp_path, capsys):
    root = synthetic_ae
    settings = _settings(root, SYNTHETIC, "diffusion.training.fast_dev_run=true", f"diffusion.checkpoints.output_dir={tmp_path / 'dm'}")
    train_diffusion(settings)
    out = capsys.readouterr().out
    assert "latent batch (2, 2, 4, 4, 4)" in out
    assert "scale factor" in out and "s/step" in out and "peak memory" in out
    assert not (tmp_path / "dm").exists() or not any((tmp_path / "dm").glob("*.pt"))


def test_resume_of_stage_two_matches_an_uninterrupted_run(synthetic_ae, tmp_path):
    root = synthetic_ae
    extra = ("diffusion.training.ema_decay=0.9", "diffusion.training.lr_warmup_steps=2", "diffusion.training.lr_schedule=cosine")
    train_diffusion(_settings(root, SYNTHETIC, *extra, f"diffusion.checkpoints.output_dir={tmp_path / 'full'}"))
    part = tmp_path / "part"
    train_diffusion(_settings(root, SYNTHETIC, *extra, f"diffusion.checkpoints.output_dir={part}", "diffusion.training.n_epochs=1"))
    train_diffusion(
        _settings(
            root,
            SYNTHETIC,
            *extra,
            f"diffusion.checkpoints.output_dir={part}",
            f"diffusion.checkpoints.resume_from={part / 'latest_checkpoint.pt'}",
        )
    )
    a = load_checkpoint(tmp_path / "full" / "latest_checkpoint.pt", "diffusion")
    b = load_checkpoint(part / "latest_checkpoint.pt", "diffusion")
    assert a["scale_factor"] == b["scale_factor"]
    for module in ("unet", "ema"):
        for key, value in a["state_dict"][module].items():
            assert torch.equal(value, b["state_dict"][module][key]), (module, key)
    assert a["lr_scheduler"] == b["lr_scheduler"]


def test_stage_two_checkpoint_describes_itself(synthetic_ae, tmp_path):
    root = synthetic_ae
    train_diffusion(_settings(root, SYNTHETIC, "diffusion.training.n_epochs=1", f"diffusion.checkpoints.output_dir={tmp_path}"))
    ckpt = load_checkpoint(tmp_path / "best_model.pt", "diffusion")
    assert ckpt["latent_shape"] == [2, 4, 4, 4]
    assert ckpt["autoencoder"]["model_args"]["downsample_factors"] == [[4, 4, 4]]
    assert 0 < ckpt["scale_factor"] < 100
    assert ckpt["model_args"]["in_channels"] == 2


def test_unet_that_does_not_fit_the_latent_is_rejected(synthetic_ae, tmp_path):
    root = synthetic_ae
    # the YAML claims latent_channels=3; the checkpoint's autoencoder has 2
    settings = _settings(
        root,
        SYNTHETIC,
        "autoencoder.latent_channels=3",
        "diffusion.in_channels=3",
        "diffusion.out_channels=3",
        f"diffusion.checkpoints.output_dir={tmp_path}",
    )
    with pytest.raises(ConfigError, match=r"diffusion.in_channels: must equal latent_channels of the autoencoder in "
                                          r".*best_model\.pt \(2\).*--set diffusion.in_channels=2"):
        train_diffusion(settings)
    # the YAML claims 2x (an 8^3 latent); the checkpoint's autoencoder downsamples 4x, so the 4^3 latent cannot be
    # halved three times
    settings = _settings(
        root,
        SYNTHETIC,
        "autoencoder.downsample_factors=[2]",
        "diffusion.num_channels=[8, 8, 8, 8]",
        "diffusion.attention_levels=[false, false, false, true]",
        f"diffusion.checkpoints.output_dir={tmp_path}",
    )
    with pytest.raises(ConfigError, match=r"divisible by 8, but latent axis 0 is 4 .*"
                                          r"--set diffusion.num_channels=\[8, 8, 8\]"):
        train_diffusion(settings)
    assert not any(tmp_path.glob("*.pt"))


def test_missing_or_foreign_autoencoder_checkpoint_is_named(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    args = cli_args(QUICKSTART, overrides(tmp_path, SYNTHETIC, f"diffusion.checkpoints.autoencoder_path={missing}"))
    assert train_diffusion_main(args) == 2
    assert str(missing) in capsys.readouterr().err


def test_samples_have_the_shape_spacing_and_orientation_of_the_training_data(real_ae, real_header_data, tmp_path):
    root, datalist = real_header_data
    data = real_data(datalist)
    train_diffusion(_settings(root, data, "diffusion.training.n_epochs=1", f"diffusion.checkpoints.output_dir={tmp_path / 'dm'}"))
    settings = _settings(root, data, f"diffusion.checkpoints.output_dir={tmp_path / 'dm'}", f"sampling.output_dir={tmp_path / 's'}")
    files = generate_samples(settings)
    niftis = sorted(p for p in files if p.name.endswith(".nii.gz"))
    assert [p.name for p in niftis] == ["sample_0000.nii.gz", "sample_0001.nii.gz", "sample_0002.nii.gz"]
    assert len([p for p in files if p.suffix == ".png"]) == 3
    image = nib.load(niftis[0])
    assert image.shape == (16, 16, 16)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")  # the LAS input was reoriented for training
    np.testing.assert_allclose(image.header.get_zooms(), (2.0, 2.0, 2.0))  # pad_crop keeps the 2 mm voxels
    # a second run adds samples after the existing ones and never replaces them
    before = niftis[0].read_bytes()
    again = generate_samples(settings)
    assert sorted(p.name for p in again if p.name.endswith(".nii.gz"))[0] == "sample_0003.nii.gz"
    assert niftis[0].read_bytes() == before


def test_conditioning_changes_samples(real_ae, real_header_data, tmp_path):
    root, datalist = real_header_data
    data = real_data(datalist)
    cond = [
        "diffusion.conditioning={class_key: group, num_classes: 2, covariate_keys: [age], dropout: 0.2}",
        "diffusion.training.n_epochs=1",
        f"diffusion.checkpoints.output_dir={tmp_path / 'dm'}",
    ]
    train_diffusion(_settings(root, data, *cond))
    ckpt = load_checkpoint(tmp_path / "dm" / "best_model.pt", "diffusion")
    assert ckpt["conditioning"]["class_key"] == "group"
    assert ckpt["conditioning"]["covariate_stats"]["age"][0] == pytest.approx(35.0)

    def sample(tag: str, *extra: str) -> np.ndarray:
        settings = _settings(root, data, *cond, "sampling.num_samples=1", f"sampling.output_dir={tmp_path / tag}",
                             "sampling.clip=false", *extra)  # an untrained model's samples would clip to 0 or 1
        files = generate_samples(settings)
        return nib.load(next(p for p in files if p.name.endswith(".nii.gz"))).get_fdata()

    base = sample("a", "sampling.class_label=0", "sampling.covariates=[30.0]")
    same = sample("b", "sampling.class_label=0", "sampling.covariates=[30.0]")
    other_class = sample("c", "sampling.class_label=1", "sampling.covariates=[30.0]")
    other_age = sample("d", "sampling.class_label=0", "sampling.covariates=[60.0]")
    guided = sample("e", "sampling.class_label=0", "sampling.covariates=[30.0]", "sampling.guidance_scale=3.0")
    np.testing.assert_array_equal(base, same)  # seeded: identical
    diffs = {name: float(np.abs(base - d).max()) for name, d in [("class", other_class), ("age", other_age), ("cfg", guided)]}
    # cross-attention output projections start at zero in MONAI's UNet, so after two optimizer steps the covariate
    # moves samples only slightly; any change beyond float noise (identical runs are bit-equal) shows it is wired in
    for name, diff in diffs.items():
        assert diff > 1e-6, (name, diffs)
    # a conditioned model asks for its covariates
    with pytest.raises(RunError, match="sampling.covariates"):
        generate_samples(_settings(root, data, *cond, f"sampling.output_dir={tmp_path / 'f'}"))


def test_cached_latents_train_like_on_the_fly_encoding(synthetic_ae, tmp_path, capsys):
    root = synthetic_ae
    # batch 1: the cache encodes volume by volume, so on-the-fly encoding sees the same shapes and runs the same
    # kernels (with 2 CPU threads a batch of 2 picks kernels whose rounding differs, which Adam then amplifies)
    common = ("diffusion.training.n_epochs=1", "diffusion.training.latent_sampling=sample",
              "diffusion.training.batch_size=1")
    train_diffusion(_settings(root, SYNTHETIC, *common, f"diffusion.checkpoints.output_dir={tmp_path / 'fly'}"))
    train_diffusion(
        _settings(root, SYNTHETIC, *common, "diffusion.training.cache_latents=true", f"diffusion.checkpoints.output_dir={tmp_path / 'cache'}")
    )
    assert "cached 4 training latents" in capsys.readouterr().out
    a = load_checkpoint(tmp_path / "fly" / "latest_checkpoint.pt", "diffusion")
    b = load_checkpoint(tmp_path / "cache" / "latest_checkpoint.pt", "diffusion")
    assert a["scale_factor"] == pytest.approx(b["scale_factor"], rel=1e-5)
    for key, value in a["state_dict"]["unet"].items():
        torch.testing.assert_close(value, b["state_dict"]["unet"][key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("prediction_type, scheduler", [("v_prediction", "ddpm"), ("sample", "ddim")])
def test_prediction_types_and_samplers(synthetic_ae, tmp_path, prediction_type, scheduler):
    root = synthetic_ae
    extra = (
        f"diffusion.scheduler.prediction_type={prediction_type}",
        "diffusion.training.n_epochs=1",
        "diffusion.training.num_samples_to_generate=0",
        f"diffusion.checkpoints.output_dir={tmp_path / 'dm'}",
        f"sampling.scheduler={scheduler}",
        "sampling.num_samples=1",
        "sampling.save_png=false",
        f"sampling.output_dir={tmp_path / 's'}",
    )
    train_diffusion(_settings(root, SYNTHETIC, *extra))
    files = generate_samples(_settings(root, SYNTHETIC, *extra))
    assert [p.name for p in files] == ["sample_0000.nii.gz"]
    assert np.isfinite(nib.load(files[0]).get_fdata()).all()


def test_tiled_decoding_when_sampling(synthetic_ae, tmp_path):
    root = synthetic_ae
    extra = ("diffusion.training.n_epochs=1", f"diffusion.checkpoints.output_dir={tmp_path / 'dm'}", "sampling.num_samples=1")
    train_diffusion(_settings(root, SYNTHETIC, *extra))
    def tiled_args(tile: str) -> list[str]:
        return cli_args(QUICKSTART, overrides(root, SYNTHETIC, *extra, f"sampling.tile_size={tile}",
                                              f"sampling.output_dir={tmp_path / 's'}"))

    assert generate_samples_main(tiled_args("[6, 8, 8]")) == 2  # 6 is not a multiple of the factor 4
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())
    assert generate_samples_main(tiled_args("[8, 8, 8]")) == 0
    assert nib.load(tmp_path / "s" / "sample_0000.nii.gz").shape == (16, 16, 16)
