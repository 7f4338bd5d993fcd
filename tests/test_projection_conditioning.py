"""Generation conditioned on a 2D projection (diffusion.condition_channels): the projection, settings, training with
the condition (pixel and latent space) and exact resume, sampling with --condition, its errors, projection
consistency in evaluate, and the seed's conditional config."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from monai_diffusion.cli import evaluate_main, generate_samples_main, train_diffusion_main
from monai_diffusion.checkpoints import load_checkpoint
from monai_diffusion.evaluation import projection_consistency
from monai_diffusion.generate import Sampler, generate_samples, load_condition
from monai_diffusion.models import unet_args
from monai_diffusion.conditioning import NULL_PROJECTION, Conditioner, projection
from monai_diffusion.sampling import write_sample
from monai_diffusion.settings import ConfigError, settings_from_dict
from monai_diffusion.stage2 import train_diffusion

from conftest import error_line

CONDITION = {"condition_channels": 1, "condition_embed_dim": 8, "projection_axis": 2,
             "condition_encoder_channels": [8, 8]}


def config(root: Path, **diffusion: object) -> dict:
    """A tiny projection-conditioned pixel-space run: 16^3 phantom volumes, UNet channels 8-16."""
    df = {
        "space": "pixel", "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "num_channels": [8, 16],
        "attention_levels": [False, False], "num_head_channels": 8, "norm_num_groups": 4, **CONDITION,
        "scheduler": {"num_train_timesteps": 50},
        "conditioning": {"dropout": 0.2},
        "training": {"n_epochs": 2, "batch_size": 2, "learning_rate": 1e-3, "generate_samples_interval": 2,
                     "num_samples_to_generate": 1, "val_interval": 1},
        "checkpoints": {"output_dir": str(root / "dm")},
    }
    for key, value in diffusion.items():
        df[key] = {**df.get(key, {}), **value} if isinstance(value, dict) else value
    return {
        "data": {"synthetic": {"enabled": True, "num_train": 4, "num_val": 2, "seed": 0}, "voxel_size": [16, 16, 16],
                 "num_workers": 0},
        "autoencoder": {"spatial_dims": 3, "in_channels": 1},
        "diffusion": df,
        "sampling": {"num_inference_steps": 4, "num_samples": 2, "batch_size": 2, "output_dir": str(root / "samples"),
                     "seed": 0},
        "device": {"use_cuda": False},
    }


def settings(root: Path, stage: str | None = "diffusion", **diffusion: object):
    return settings_from_dict(config(root, **diffusion), stage=stage)


def write_yaml(root: Path, cfg: dict) -> str:
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A conditioned pixel-space model trained one epoch."""
    root = tmp_path_factory.mktemp("cond")
    train_diffusion(settings(root, training={"n_epochs": 1}))
    return root


def condition_png(root: Path, name: str = "cond", size: tuple[int, int] = (16, 16)) -> Path:
    """The axis-2 projection of a smooth blob, written as an 8-bit PNG the way samples are."""
    x, y = torch.meshgrid(torch.linspace(-1, 1, size[0]), torch.linspace(-1, 1, size[1]), indexing="ij")
    image = torch.exp(-((x - 0.3) ** 2 + y**2) * 4).unsqueeze(0)
    return write_sample(image, root / name, None, "png")[0]


# ---------------------------------------------------------------------------------------------------- projection
def test_projection_sums_along_the_axis_and_scales_each_image_to_0_1():
    volume = torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4)  # (C, X, Y, Z)
    summed = volume.sum(dim=3)  # axis 2 = Z
    expected = (summed - summed.min()) / (summed.max() - summed.min())
    assert torch.allclose(projection(volume, 2), expected)
    assert projection(volume, 0).shape == (1, 3, 4) and projection(volume, 1).shape == (1, 2, 4)
    # per image in a batch: a second volume 10x brighter gives the same projection; a constant one gives zeros
    batch = torch.stack([volume, 10 * volume, torch.full_like(volume, 3.0)])
    out = projection(batch, 2)
    assert out.shape == (3, 1, 2, 3)
    assert torch.allclose(out[0], expected) and torch.allclose(out[1], expected)
    assert torch.equal(out[2], torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="axis must be 0, 1 or 2, got 3"):
        projection(volume, 3)
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 4\)"):
        projection(volume[0], 2)


def test_conditioner_computes_drops_and_nulls_the_projection():
    cond = Conditioner(projection_axis=1)
    images = torch.rand(4, 1, 5, 6, 7)
    out = cond.from_batch({"image": images}, torch.device("cpu"))
    assert torch.equal(out["projection"], projection(images, 1))
    assert torch.equal(cond.null_like(out)["projection"], torch.full((4, 1, 5, 7), NULL_PROJECTION))
    torch.manual_seed(0)
    dropped = cond.drop(out, 0.5)["projection"]
    null_rows = [bool((dropped[i] == NULL_PROJECTION).all()) for i in range(4)]
    kept_rows = [torch.equal(dropped[i], out["projection"][i]) for i in range(4)]
    assert all(a != b for a, b in zip(null_rows, kept_rows)) and any(null_rows) and any(kept_rows)
    assert Conditioner.from_state(cond.state()).projection_axis == 1


# ------------------------------------------------------------------------------------------------------ settings
def test_settings_accept_the_condition_and_refuse_what_does_not_fit(tmp_path):
    s = settings(tmp_path)
    args = unet_args(s.diffusion)
    assert args["with_conditioning"] is True and args["cross_attention_dim"] == 8

    bad = config(tmp_path, projection_axis=3, condition_channels=2, conditioning={"covariate_keys": ["age"]})
    bad["data"]["datalist"] = str(tmp_path / "list.json")
    del bad["data"]["synthetic"]
    with pytest.raises(ConfigError) as err:
        settings_from_dict(bad, check_paths=False)
    problems = dict(err.value.problems)
    assert "must be 0, 1 or 2" in problems["diffusion.projection_axis"]
    assert "got 3" in problems["diffusion.projection_axis"]
    assert "--set diffusion.condition_channels=1" in problems["diffusion.condition_channels"]
    assert "cross-attention" in problems["diffusion.conditioning.covariate_keys"]

    flat = config(tmp_path)
    flat["autoencoder"]["spatial_dims"] = flat["diffusion"]["spatial_dims"] = 2
    flat["data"]["voxel_size"] = [16, 16]
    with pytest.raises(ConfigError) as err:
        settings_from_dict(flat)
    assert "sums a 3D volume" in dict(err.value.problems)["diffusion.condition_channels"]


def test_the_seed_conditional_config_validates_and_runs_fast_dev_run(tmp_path, capsys):
    """The seed's conditional_diffusion_config.yaml with its data paths changed. Held back: its voxel_size [96, 96,
    48] (a 16 x 16 x 8 volume keeps the test short) and num_workers 4 (0 here); the data keys of the seed-parity
    work (voxel_resize, max_data_size_*, augmentation.use_patch_based / use_center_crop_for_val /
    invert_intensity) and the logging keys (visualize_interval, num_visualize_samples, num_inference_steps) are
    another branch's and tested there."""
    for split, count in (("train", 2), ("val", 1)):
        (tmp_path / split).mkdir()
        for i in range(count):
            array = np.random.default_rng(i).uniform(0, 255, (16, 16, 8)).astype(np.float32)
            nib.save(nib.Nifti1Image(array, np.eye(4)), str(tmp_path / split / f"v{i}.nii.gz"))
    seed = {
        "seed": 42,
        "device": {"use_cuda": True, "gpu_id": 0, "mixed_precision": True},
        "data": {"train_data_dir": str(tmp_path / "train"), "val_data_dir": str(tmp_path / "val"),
                 "voxel_size": [16, 16, 8], "cache_rate": 0.2, "num_workers": 0, "pin_memory": False,
                 "augmentation": {"enabled": True}},
        "diffusion": {
            "spatial_dims": 3, "in_channels": 1, "out_channels": 1,
            "condition_channels": 1, "condition_embed_dim": 8, "projection_axis": 2,
            "num_channels": [16, 32, 64], "attention_levels": [False, False, False],
            "num_head_channels": [0, 0, 16], "num_res_blocks": 2,
            "scheduler": {"num_train_timesteps": 1000, "schedule": "linear_beta", "beta_start": 0.0005,
                          "beta_end": 0.0195},
            "training": {"n_epochs": 400, "learning_rate": 1.0e-4, "batch_size": 1, "val_interval": 10,
                         "save_interval": 25, "fast_dev_run": False, "fast_dev_run_batches": 1},
            "checkpoints": {"output_dir": str(tmp_path / "out" / "checkpoints"), "resume_from": None},
            "logging": {"log_dir": str(tmp_path / "out" / "logs"), "log_interval": 10},
        },
    }
    s = settings_from_dict(seed, stage="diffusion")
    assert s.diffusion.space == "pixel" and s.diffusion.norm_num_groups == 8  # the seed's pipeline, mapped
    assert train_diffusion_main(["--config", write_yaml(tmp_path, seed), "--fast-dev-run"]) == 0
    out = capsys.readouterr().out
    assert "pixel-space batch (1, 1, 16, 16, 8)" in out and "1 x 16 x 16 -> 4 context tokens of 8" in out
    assert not (tmp_path / "out" / "checkpoints").exists() or not any((tmp_path / "out" / "checkpoints").glob("*.pt"))
    # an explicit space keeps the config as written: a latent UNet with 32 GroupNorm groups, which 16 channels refuse
    with pytest.raises(ConfigError, match=r"diffusion.norm_num_groups \(32\)"):
        settings_from_dict({**seed, "diffusion": {**seed["diffusion"], "space": "latent"}}, check_paths=False)


# ----------------------------------------------------------------------------------------------------- training
def test_training_resumes_exactly_and_the_checkpoint_holds_the_encoder(tmp_path):
    train_diffusion(settings(tmp_path / "full"))
    part = tmp_path / "part"
    train_diffusion(settings(part, training={"n_epochs": 1}))
    train_diffusion(settings(part, checkpoints={"resume_from": str(part / "dm" / "latest_checkpoint.pt")}))
    a = load_checkpoint(tmp_path / "full" / "dm" / "latest_checkpoint.pt", "diffusion")
    b = load_checkpoint(part / "dm" / "latest_checkpoint.pt", "diffusion")
    assert a["epoch"] == b["epoch"] == 1
    weights = a["state_dict"]["unet"]
    assert any(k.startswith("encoder.") for k in weights) and any(k.startswith("unet.") for k in weights)
    for key, value in weights.items():
        assert torch.equal(value, b["state_dict"]["unet"][key]), key
    assert a["condition_encoder"] == {"in_channels": 1, "embed_dim": 8, "image_size": [16, 16], "channels": [8, 8],
                                      "concat_axis": 2}
    assert a["conditioning"]["projection_axis"] == 2
    assert a["model_args"]["with_conditioning"] is True and a["model_args"]["cross_attention_dim"] == 8
    losses = [h["val_loss"] for h in a["history"] if "val_loss" in h]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] != losses[1]


def test_latent_space_fast_dev_run_with_cached_latents(tmp_path, capsys):
    from monai_diffusion.stage1 import train_autoencoder

    cfg = config(tmp_path, space="latent", in_channels=2, out_channels=2,
                 checkpoints={"autoencoder_path": str(tmp_path / "ae" / "best_model.pt")},
                 training={"cache_latents": True, "latent_sampling": "mean"})
    cfg["autoencoder"] = {"spatial_dims": 3, "in_channels": 1, "num_channels": [4, 4],
                          "attention_levels": [False, False], "norm_num_groups": 4, "latent_channels": 2,
                          "with_encoder_nonlocal_attn": False,
                          "with_decoder_nonlocal_attn": False,
                          "training": {"n_epochs": 1, "batch_size": 2, "adv_weight": 0.0},
                          "checkpoints": {"output_dir": str(tmp_path / "ae")}}
    cfg["diffusion"]["num_channels"] = [8, 8]
    train_autoencoder(settings_from_dict(cfg, stage="autoencoder"))
    capsys.readouterr()
    assert train_diffusion_main(["--config", write_yaml(tmp_path, cfg), "--fast-dev-run"]) == 0
    out = capsys.readouterr().out
    assert "latent batch (2, 2, 8, 8, 8)" in out and "1 x 16 x 16 -> 16 context tokens of 8" in out


# ----------------------------------------------------------------------------------------------------- sampling
def test_sampling_with_a_condition_file_writes_volumes(run, capsys):
    png = condition_png(run)
    cfg = config(run)
    cfg["sampling"]["guidance_scale"] = 2.0
    assert generate_samples_main(["--config", write_yaml(run, cfg), "--condition", str(png)]) == 0
    volumes = sorted((run / "samples").glob("sample_*.nii.gz"))
    assert len(volumes) == 2
    data = nib.load(str(volumes[0])).get_fdata()
    assert data.shape == (16, 16, 16) and np.isfinite(data).all() and data.std() > 0
    # the PNG reads back as the array it was written from (MONAI's PIL reader, width first), and a 2D NIfTI works too
    loaded = load_condition(png, (1, 16, 16))
    nifti = run / "cond.nii.gz"
    nib.save(nib.Nifti1Image(loaded[0].numpy(), np.eye(4)), str(nifti))
    assert torch.allclose(load_condition(nifti, (1, 16, 16)), loaded, atol=1e-6)
    written = generate_samples(settings(run, stage="sampling"), condition=nifti)
    assert sum(p.name.endswith(".nii.gz") for p in written) == 2


def test_sampler_draws_one_sample_per_condition(run):
    s = settings(run, stage="sampling")
    conditions = projection(torch.rand(3, 1, 16, 16, 16), 2)
    sampler = Sampler(s, run / "dm" / "best_model.pt", condition=conditions)
    samples = sampler.sample(3, seed=0, progress=False)
    assert samples.shape == (3, 1, 16, 16, 16)
    # a guidance scale of 0 is the unconditional model: the same for every condition
    s0 = settings_from_dict({**config(run), "sampling": {**config(run)["sampling"], "guidance_scale": 0.0}},
                            stage="sampling")
    uncond = Sampler(s0, run / "dm" / "best_model.pt", condition=conditions[:1]).sample(1, 0, False)
    other = Sampler(s0, run / "dm" / "best_model.pt", condition=conditions[1:2]).sample(1, 0, False)
    assert torch.allclose(uncond, other)
    # the condition reaches the UNet (after one epoch only slightly: MONAI zero-initialises the attention's output)
    cond = Sampler(s, run / "dm" / "best_model.pt", condition=conditions[:1]).sample(1, 0, False)
    assert not torch.equal(cond, uncond)


def test_condition_errors_are_one_line(run, tmp_path, capsys):
    c = config(run)
    c["sampling"]["output_dir"] = str(tmp_path / "samples")
    cfg = write_yaml(tmp_path, c)
    line = error_line(capsys, generate_samples_main(["--config", cfg, "--condition", str(tmp_path / "nope.png")]))
    assert "condition file not found" in line and "nope.png" in line
    wrong = condition_png(tmp_path, "wrong", (20, 16))
    line = error_line(capsys, generate_samples_main(["--config", cfg, "--condition", str(wrong)]))
    assert "wrong.png" in line and "(1, 20, 16)" in line and "(1, 16, 16)" in line
    line = error_line(capsys, generate_samples_main(["--config", cfg]))
    assert "pass --condition FILE" in line
    assert not (tmp_path / "samples").exists()  # nothing is written before the errors


# ----------------------------------------------------------------------------------------------------- evaluate
def test_projection_consistency_on_known_cases():
    volumes = torch.rand(3, 1, 6, 5, 4)
    proj = projection(volumes, 1)
    same = projection_consistency(volumes, proj, 1)
    assert same["count"] == 3 and same["mean"] == pytest.approx(1.0) and same["per_sample"] == pytest.approx([1.0] * 3)
    flipped = projection_consistency(volumes, 1 - proj, 1)
    assert flipped["mean"] == pytest.approx(-1.0)
    assert same["mismatched_mean"] < 0.9  # independent random volumes
    with pytest.raises(ValueError, match=r"have shape \(3, 1, 6, 5\), but the samples' projections along axis 1"):
        projection_consistency(volumes, projection(volumes, 2), 1)


def test_evaluate_reports_projection_consistency(run, tmp_path):
    out = tmp_path / "report.json"
    cfg = write_yaml(tmp_path, config(run))
    assert evaluate_main(["--config", cfg, "--num-samples", "4", "--c2st-epochs", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    pc = report["projection_consistency"]
    assert pc["axis"] == 2 and pc["count"] == 4 and len(pc["per_sample"]) == 4 and -1 <= pc["mean"] <= 1
    assert "validation" in pc["conditions"]
    assert "projection consistency" in out.with_suffix(".md").read_text()


def test_concat_spreads_the_projection_along_its_axis_onto_the_input_grid():
    """diffusion.condition_concat: the UNet's extra input channels hold, at every voxel, the projection value of its
    own column (area-averaged down to a latent grid); without it (or in older checkpoints) tokens only."""
    from monai_diffusion.models import build_diffusion_network

    args = {**unet_args(settings_from_dict({"diffusion": {**CONDITION, "space": "pixel", "in_channels": 1,
                                                          "out_channels": 1, "num_channels": [8, 16],
                                                          "attention_levels": [False, False],
                                                          "num_head_channels": 8, "norm_num_groups": 4}},
                                           check_paths=False, require_data=False).diffusion)}
    encoder = {"in_channels": 1, "embed_dim": 8, "image_size": [8, 4], "channels": [8, 8]}
    net = build_diffusion_network(args, {**encoder, "concat_axis": 1})
    assert net.concat_axis == 1 and net.unet.conv_in.conv.in_channels == 2
    proj = torch.arange(32.0).reshape(1, 1, 8, 4)
    spread = net.spread(proj, (8, 6, 4))  # pixel space: the projection's own grid, repeated along axis 1
    assert spread.shape == (1, 1, 8, 6, 4) and all(torch.equal(spread[:, :, :, j], proj) for j in range(6))
    small = net.spread(proj, (4, 3, 2))  # a latent grid: 2 x 2 area averages
    assert small.shape == (1, 1, 4, 3, 2)
    assert small[0, 0, 1, 2, 1] == proj[0, 0, 2:4, 2:4].mean()
    # the output depends on where the projection is bright, not only on whether one is given
    x, t = torch.randn(1, 1, 8, 6, 4), torch.tensor([10])
    flipped = proj.flip(-1)
    with torch.no_grad():
        net.unet.out[2].conv.weight.normal_()  # MONAI starts the output convolution at zero
        assert not torch.allclose(net(x, t, projection=proj), net(x, t, projection=flipped))
    old = build_diffusion_network(args, encoder)  # a checkpoint from before condition_concat: tokens only
    assert old.concat_axis is None and old.unet.conv_in.conv.in_channels == 1
    settings = settings_from_dict({"diffusion": {**CONDITION, "space": "latent", "condition_concat": False}}, check_paths=False,
                                  require_data=False)
    assert not settings.diffusion.condition_concat
