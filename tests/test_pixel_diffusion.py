"""Pixel-space diffusion (diffusion.space: pixel): settings, training + resume, sampling (3D volumes, 2D grid),
interpolation between two seeds (pixel and latent models), and evaluate on a pixel-space run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from monai_diffusion.cli import evaluate_main, generate_samples_main, train_diffusion_main
from monai_diffusion.checkpoints import load_checkpoint
from monai_diffusion.generate import Sampler, generate_samples, interpolate
from monai_diffusion.sampling import slerp
from monai_diffusion.settings import ConfigError, settings_from_dict
from monai_diffusion.stage1 import train_autoencoder
from monai_diffusion.stage2 import train_diffusion


def config(root: Path, dims: int = 3, **diffusion: object) -> dict:
    """A tiny pixel-space run: 16^3 volumes (3D) or 32^2 images (2D) of the built-in phantom, UNet channels 8-16."""
    size = [16, 16, 16] if dims == 3 else [32, 32]
    df = {
        "space": "pixel", "spatial_dims": dims, "in_channels": 1, "out_channels": 1, "num_channels": [8, 16],
        "attention_levels": [False, False], "num_head_channels": 8, "norm_num_groups": 4,
        "scheduler": {"num_train_timesteps": 50},
        "training": {"n_epochs": 2, "batch_size": 2, "learning_rate": 1e-3, "generate_samples_interval": 2,
                     "num_samples_to_generate": 1, "val_interval": 1},
        "checkpoints": {"output_dir": str(root / "dm")},
    }
    for key, value in diffusion.items():
        if isinstance(value, dict):
            df[key] = {**df.get(key, {}), **value}
        else:
            df[key] = value
    return {
        "data": {"synthetic": {"enabled": True, "num_train": 4, "num_val": 2, "seed": 0}, "voxel_size": size,
                 "num_workers": 0},
        "autoencoder": {"spatial_dims": dims, "in_channels": 1},
        "diffusion": df,
        "sampling": {"num_inference_steps": 5, "num_samples": 3, "batch_size": 1, "output_dir": str(root / "samples"),
                     "seed": 0},
        "device": {"use_cuda": False},
    }


def settings(root: Path, dims: int = 3, stage: str | None = "diffusion", **diffusion: object):
    return settings_from_dict(config(root, dims, **diffusion), stage=stage)


@pytest.fixture(scope="module")
def run_2d(tmp_path_factory) -> Path:
    """A 2D pixel-space DDPM trained one epoch."""
    root = tmp_path_factory.mktemp("pixel2d")
    train_diffusion(settings(root, 2, training={"n_epochs": 1}))
    return root


# ------------------------------------------------------------------------------------------------------ settings
def test_settings_accept_pixel_space_and_refuse_what_does_not_fit(tmp_path):
    s = settings(tmp_path)
    assert s.diffusion.space == "pixel" and s.diffusion.checkpoints.autoencoder_path is None
    # the autoencoder's downsampling does not constrain the images in pixel space: 20 is not a multiple of 4
    assert settings_from_dict({**config(tmp_path), "data": {**config(tmp_path)["data"], "voxel_size": [20, 16, 16]}},
                              stage="diffusion").data.voxel_size == (20, 16, 16)

    bad = config(tmp_path, num_channels=[8, 16, 16], attention_levels=[False, False, False], in_channels=2,
                 training={"cache_latents": True}, checkpoints={"autoencoder_path": "ae.pt"})
    bad["data"]["voxel_size"] = [18, 16, 16]
    bad["sampling"]["tile_size"] = [8, 8, 8]
    with pytest.raises(ConfigError) as err:
        settings_from_dict(bad, stage="diffusion")
    problems = dict(err.value.problems)
    assert "autoencoder.in_channels (1)" in problems["diffusion.in_channels"]
    assert "--set diffusion.in_channels=1" in problems["diffusion.in_channels"]
    assert "divisible by 4" in problems["diffusion.num_channels"] and "axis 0 is 18" in problems["diffusion.num_channels"]
    assert "--set data.voxel_size=[16, 16, 16]" in problems["diffusion.num_channels"]
    assert "cache_latents=false" in problems["diffusion.training.cache_latents"]
    assert "autoencoder_path=null" in problems["diffusion.checkpoints.autoencoder_path"]
    assert "tile_size=null" in problems["sampling.tile_size"]

    # no stage 1 and no plan for a pixel-space config
    with pytest.raises(ConfigError, match="no autoencoder is trained"):
        settings(tmp_path, stage="autoencoder")
    from monai_diffusion.errors import RunError
    from monai_diffusion.plan import make_plan

    with pytest.raises(RunError, match="fast-dev-run"):
        make_plan(s, measure=False, device="cpu")

    # a latent config without an autoencoder, whose UNet takes the image channels, is told about pixel space
    latent = config(tmp_path, space="latent")
    latent["autoencoder"]["latent_channels"] = 1
    with pytest.raises(ConfigError, match="--set diffusion.space=pixel"):
        settings_from_dict(latent, stage="diffusion")


# ----------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("dims", [3, 2])
def test_fast_dev_run_in_pixel_space(tmp_path, capsys, dims):
    cfg = config(tmp_path, dims)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert train_diffusion_main(["--config", str(path), "--fast-dev-run"]) == 0
    out = capsys.readouterr().out
    shape = (2, 1, 16, 16, 16) if dims == 3 else (2, 1, 32, 32)
    assert f"pixel-space batch {shape}" in out and "no autoencoder" in out
    assert not any((tmp_path / "dm").glob("*.pt")) if (tmp_path / "dm").exists() else True


def test_training_resumes_exactly_and_checkpoint_describes_itself(tmp_path):
    extra = {"training": {"ema_decay": 0.9}}
    train_diffusion(settings(tmp_path / "full", **extra))
    part = tmp_path / "part"
    train_diffusion(settings(part, training={"ema_decay": 0.9, "n_epochs": 1}))
    resumed = settings(part, training={"ema_decay": 0.9},
                       checkpoints={"resume_from": str(part / "dm" / "latest_checkpoint.pt")})
    train_diffusion(resumed)
    # a pixel-space run does not resume a latent checkpoint (or the other way round), even with the same UNet
    from monai_diffusion.conditioning import Conditioner
    from monai_diffusion.errors import RunError
    from monai_diffusion.runtime import setup_runtime
    from monai_diffusion.stage2 import build_diffusion_stage

    stage = build_diffusion_stage(settings(part), setup_runtime(False, 0, False), None, Conditioner(), 1)
    with pytest.raises(RunError, match="trained with diffusion.space=latent"):
        stage.load_extra({"space": "latent", "scale_factor": 0.5, "lr_scheduler": {}}, "latent.pt")
    a = load_checkpoint(tmp_path / "full" / "dm" / "latest_checkpoint.pt", "diffusion")
    b = load_checkpoint(part / "dm" / "latest_checkpoint.pt", "diffusion")
    assert a["epoch"] == b["epoch"] == 1
    for module in ("unet", "ema"):
        for key, value in a["state_dict"][module].items():
            assert torch.equal(value, b["state_dict"][module][key]), (module, key)
    assert a["space"] == "pixel" and a["autoencoder"] is None and a["scale_factor"] == 1.0
    assert a["latent_shape"] == [1, 16, 16, 16] and a["pixel_range"] == [-1.0, 1.0]
    assert a["scheduler_args"]["clip_sample"] is True
    # training did something: validation loss of the two epochs differs and is finite
    losses = [h["val_loss"] for h in a["history"] if "val_loss" in h]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] != losses[1]


# ----------------------------------------------------------------------------------------------------- sampling
def test_sampling_pixel_3d_writes_volumes_with_rflow(tmp_path):
    import nibabel as nib

    train_diffusion(settings(tmp_path, scheduler={"type": "rflow"}, training={"n_epochs": 1}))
    written = generate_samples(settings(tmp_path, stage="sampling", scheduler={"type": "rflow"}))
    names = sorted(p.name for p in written)
    assert names == [f"sample_{i:04d}{ext}" for i in range(3) for ext in (".nii.gz", ".png")]
    volume = nib.load(str(tmp_path / "samples" / "sample_0000.nii.gz")).get_fdata()
    assert volume.shape == (16, 16, 16) and volume.min() >= 0.0 and volume.max() <= 1.0 and volume.std() > 0
    assert not (tmp_path / "samples" / "grids").exists()  # the grid is for 2D samples


def test_sampling_pixel_2d_writes_pngs_and_a_grid(run_2d):
    written = generate_samples(settings(run_2d, 2, stage="sampling"))
    folder = run_2d / "samples"
    assert sorted(p.name for p in folder.glob("*.png")) == ["sample_0000.png", "sample_0001.png", "sample_0002.png"]
    grid = folder / "grids" / "grid_0000-0002.png"
    assert grid in written
    picture = np.asarray(Image.open(grid))
    assert picture.shape == (2 * 32 + 2, 2 * 32 + 2)  # 3 samples: 2 columns, 2 rows, 2-pixel gaps
    first = np.asarray(Image.open(folder / "sample_0000.png"))
    assert np.array_equal(picture[:32, :32], first)  # the grid shows the samples as their PNGs do


def test_interpolation_ends_are_the_samples_of_the_two_seeds_pixel(run_2d, tmp_path):
    s = settings_from_dict({**config(run_2d, 2), "sampling": {**config(run_2d, 2)["sampling"],
                                                              "output_dir": str(tmp_path / "out")}},
                           stage="sampling")
    samples, written = interpolate(s, 3, 7, steps=4, progress=False)
    sampler = Sampler(s, run_2d / "dm" / "best_model.pt")
    a, b = sampler.sample(1, 3, progress=False), sampler.sample(1, 7, progress=False)
    assert torch.allclose(samples[0], a[0], atol=1e-5) and torch.allclose(samples[-1], b[0], atol=1e-5)
    assert not torch.allclose(samples[1], samples[0], atol=1e-3)  # the middle is neither end
    folder = tmp_path / "out" / "interpolation_3_7"
    assert sorted(p.name for p in folder.glob("frame_*.png")) == [f"frame_{i:04d}.png" for i in range(4)]
    strip = np.asarray(Image.open(folder / "strip.png"))
    assert strip.shape == (32, 4 * 32 + 3 * 2)  # N images in one row
    # sampling.scheduler=ddpm (stochastic) is replaced by DDIM: the same ends
    ddpm = settings_from_dict({**s.to_dict(), "sampling": {**s.to_dict()["sampling"], "scheduler": "ddpm",
                                                           "output_dir": str(tmp_path / "ddpm")}}, stage="sampling")
    ends, _ = interpolate(ddpm, 3, 7, steps=2, progress=False)
    assert torch.allclose(ends[0], samples[0], atol=1e-5) and torch.allclose(ends[1], samples[-1], atol=1e-5)
    # refuses to overwrite; --steps without --interpolate and too few steps are one-line errors
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(s.to_dict()))
    assert generate_samples_main(["--config", str(cfg), "--interpolate", "3", "7", "--steps", "4"]) == 2
    assert generate_samples_main(["--config", str(cfg), "--interpolate", "3", "8", "--steps", "1"]) == 2
    with pytest.raises(SystemExit):
        generate_samples_main(["--config", str(cfg), "--steps", "4"])


def test_slerp_keeps_the_norm_of_gaussian_noise():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4096, generator=g), torch.randn(4096, generator=g)
    mixed = slerp(a, b, [0.0, 0.5, 1.0])
    assert torch.equal(mixed[0], a) and torch.equal(mixed[2], b)
    assert abs(float(mixed[1].norm() / a.norm()) - 1) < 0.05  # a straight line would shrink it to ~0.71
    with pytest.raises(ValueError, match="one shape"):
        slerp(a, b[:10], [0.5])


def test_interpolation_of_a_latent_model(tmp_path):
    """The initial latent noise is interpolated for a latent model; its ends are its plain samples."""
    cfg = config(tmp_path, 3, space="latent", in_channels=2, out_channels=2,
                 checkpoints={"autoencoder_path": str(tmp_path / "ae" / "best_model.pt")},
                 training={"n_epochs": 1, "scale_factor_batches": 1})
    cfg["autoencoder"] = {"spatial_dims": 3, "in_channels": 1, "num_channels": [4, 8], "downsample_factors": [4],
                          "attention_levels": [False, False], "norm_num_groups": 4, "latent_channels": 2,
                          "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
                          "training": {"n_epochs": 1, "batch_size": 2, "adv_weight": 0.0,
                                       "discriminator": {"num_layers_d": 2, "num_channels": 4}},
                          "checkpoints": {"output_dir": str(tmp_path / "ae")}}
    cfg["diffusion"].update(num_channels=[8, 8])
    train_autoencoder(settings_from_dict(cfg, stage="autoencoder"))
    train_diffusion(settings_from_dict(cfg, stage="diffusion"))
    s = settings_from_dict(cfg, stage="sampling")
    samples, _ = interpolate(s, 0, 1, steps=3, progress=False)
    sampler = Sampler(s, tmp_path / "dm" / "best_model.pt")
    assert sampler.latent_shape == (2, 4, 4, 4) and not sampler.pixel_space
    assert torch.allclose(samples[0], sampler.sample(1, 0, progress=False)[0], atol=1e-5)
    assert torch.allclose(samples[-1], sampler.sample(1, 1, progress=False)[0], atol=1e-5)
    strip = np.asarray(Image.open(tmp_path / "samples" / "interpolation_0_1" / "strip.png"))
    assert strip.shape == (16, 3 * 16 + 2 * 2)  # axial mid-slices of 3 volumes


# ----------------------------------------------------------------------------------------------------- evaluate
def test_evaluate_a_pixel_space_run(run_2d, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config(run_2d, 2)))
    out = tmp_path / "report.json"
    assert evaluate_main(["--config", str(cfg), "--num-samples", "4", "--c2st-epochs", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["pipeline"]["space"] == "pixel" and report["pipeline"]["autoencoder"] is None
    assert "stage1_validation" not in report and "recon" not in report
    assert report["samples"]["count"] == 4 and report["samples"]["shape"] == [1, 32, 32]
    assert np.isfinite(report["samples_vs_real"]["mmd"])
    assert out.with_suffix(".png").is_file()
    assert "stage 1 on" not in capsys.readouterr().out
