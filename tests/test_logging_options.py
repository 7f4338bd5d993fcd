"""The ``logging`` options of both stages: stage 1's sliding-window validation of whole volumes, stage 2's
pictures of generated next to real volumes (epochs, sampling steps, PNG files) and their settings checks."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from nibabel.testing import data_path as NIB_DATA
from PIL import Image

from monai_diffusion.data import build_datasets
from monai_diffusion import stage2
from monai_diffusion.runtime import Runtime
from monai_diffusion.settings import ConfigError, load_settings, settings_from_dict
from monai_diffusion.stage1 import AutoencoderStage, train_autoencoder, validation_window
from monai_diffusion.stage2 import DiffusionStage, comparison_picture, train_diffusion

from conftest import QUICKSTART, tiny_factor4 as tiny  # tiny: 16^3, factor 4 (conftest's autoencoder_run: its stage 1)

WHOLE = (33, 41, 25)  # nibabel's anatomical.nii: 33 x 41 x 25 voxels (LAS, so RAS only flips axis 0)


@pytest.fixture(scope="module")
def anatomical(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("anatomical")
    for name in ("a.nii", "b.nii", "c.nii"):
        shutil.copy(Path(NIB_DATA) / "anatomical.nii", folder / name)
    return folder


# ---------------------------------------------------------------------------------------------- stage 1
def _kl() -> nn.Module:
    """A tiny KL autoencoder (factor 4 = [2, 2], GroupNorm, non-local attention): tiles must reproduce it exactly."""
    from generative.networks.nets import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, num_channels=(4, 8, 8), latent_channels=2,
                         attention_levels=(False, False, False), num_res_blocks=1, norm_num_groups=4).eval()


class PointwiseAutoencoder(nn.Module):
    """reconstruct(x) = 0.5 x + 0.1, a network-free stand-in (factor 1): metrics see exactly this reconstruction."""

    total_downsample_factor = (1, 1, 1)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + 0.1


def _stage(window: tuple[int, ...] | None, window_batch: int = 1, ae: nn.Module | None = None) -> AutoencoderStage:
    ae, disc = ae if ae is not None else _kl(), nn.Conv3d(1, 1, 1)
    opt = torch.optim.SGD(disc.parameters(), lr=0.1)
    training = settings_from_dict({}, check_paths=False, require_data=False).autoencoder.training
    return AutoencoderStage(ae, disc, opt, opt, training, Runtime(torch.device("cpu"), None), val_window=window,
                            val_window_batch_size=window_batch)


def test_whole_volume_validation_in_exact_tiles_equals_the_whole_volume_reconstruction():
    volume = torch.rand(1, 1, 28, 20, 12, generator=torch.Generator().manual_seed(0))
    stage = _stage((16, 8, 8), window_batch=3)
    assert stage.inferer is None  # the KL autoencoder: exact tiles, not blended windows
    with torch.no_grad():
        metrics = stage.validation_step({"image": volume})
        direct = _kl().reconstruct(volume).clamp(0, 1)
    assert metrics["l1"] == pytest.approx(F.l1_loss(direct, volume).item(), rel=1e-4)
    with torch.no_grad():
        assert metrics == pytest.approx(_stage(None).validation_step({"image": volume}), rel=1e-4)
    # the pictures come from the whole volume too: sagittal mid-slice is 20 x 12, three panels with 2-pixel gaps
    with torch.no_grad():
        images = _stage((16, 8, 8)).visualize({"image": volume})
    assert images["reconstruction/0/sagittal"].shape == (1, 12, 3 * 20 + 2 * 2)


def test_use_sliding_window_validates_whole_volumes_not_crops(anatomical, tmp_path, monkeypatch):
    settings = load_settings(QUICKSTART, tiny(
        tmp_path, "data.synthetic={enabled: false}", f"data.train_data_dir={anatomical}", "data.crop_mode=pad_crop",
        "autoencoder.logging.use_sliding_window=true", "autoencoder.logging.sliding_window_batch_size=2",
    ))
    assert validation_window(settings) == (16, 16, 16)  # roi null = data.voxel_size
    seen: list[tuple[int, ...]] = []
    original = AutoencoderStage._reconstruct

    def record(self, images):
        seen.append(tuple(images.shape))
        assert self.inferer is None and self.val_window == (16, 16, 16)  # KL: exact tiles of the window size
        return original(self, images)

    monkeypatch.setattr(AutoencoderStage, "_reconstruct", record)
    state = train_autoencoder(settings)
    # 1 validation volume (held out of 3) reconstructed for the metrics, then again for the picture
    assert seen == [(1, 1, *WHOLE)] * 2
    assert 0 < state.history[-1]["val_l1"] < 1
    train_ds, val_ds, info = build_datasets(settings.data, 3, 1, whole_val_volumes=True)
    assert tuple(train_ds[0]["image"].shape) == (1, 16, 16, 16) and info["val_whole_volumes"]
    assert tuple(val_ds[0]["image"].shape) == (1, *WHOLE)


def test_without_sliding_window_validation_volumes_are_voxel_size(anatomical, tmp_path):
    settings = load_settings(QUICKSTART, tiny(
        tmp_path, "data.synthetic={enabled: false}", f"data.train_data_dir={anatomical}", "data.crop_mode=pad_crop"))
    assert validation_window(settings) is None
    _, val_ds, info = build_datasets(settings.data, 3, 1)
    assert tuple(val_ds[0]["image"].shape) == (1, 16, 16, 16) and not info["val_whole_volumes"]
    patch = load_settings(QUICKSTART, tiny(tmp_path, "data.crop_mode=random_patch",
                                           "autoencoder.logging.sliding_window_roi_size=[8, 16, 12]"))
    assert validation_window(patch) == (8, 16, 12)  # random patches always validate by windows, of this size


@pytest.mark.parametrize("roi, message", [
    ("[16, 16]", "expected autoencoder.spatial_dims = 3 entries"),
    ("[16, 18, 16]", "axis 1: 18 is not divisible by 4 .*nearest valid sizes are 16 and 20"),
    ("[16, 16, 0]", ">= 1"),
])
def test_bad_window_size_is_refused_naming_the_key(tmp_path, roi, message):
    with pytest.raises(ConfigError, match=rf"autoencoder\.logging\.sliding_window_roi_size.*{message}"):
        load_settings(QUICKSTART, tiny(tmp_path, f"autoencoder.logging.sliding_window_roi_size={roi}"))


def test_sampling_steps_of_the_pictures_must_fit_the_schedule(tmp_path):
    with pytest.raises(ConfigError, match=r"diffusion\.logging\.num_inference_steps.*<= diffusion\.scheduler"
                                          r"\.num_train_timesteps \(50\), got 51"):
        load_settings(QUICKSTART, tiny(tmp_path, "diffusion.logging.num_inference_steps=51"))
    with pytest.raises(ConfigError, match=r"diffusion\.logging\.visualize_interval.*>= 1"):
        load_settings(QUICKSTART, tiny(tmp_path, "diffusion.logging.visualize_interval=0"))


# ---------------------------------------------------------------------------------------------- stage 2
def test_pictures_come_at_their_epochs_with_one_generation_each(autoencoder_run, tmp_path, monkeypatch):
    root = autoencoder_run
    settings = load_settings(QUICKSTART, tiny(
        root, f"diffusion.checkpoints.output_dir={tmp_path / 'dm'}",
        "diffusion.training.n_epochs=4",
        "diffusion.training.val_interval=4",  # pictures do not wait for validation epochs
        "diffusion.training.generate_samples_interval=3",
        "diffusion.training.num_samples_to_generate=1",
        "diffusion.logging.visualize_interval=2",
        "diffusion.logging.num_visualize_samples=2",
        "diffusion.logging.num_inference_steps=3",
        "sampling.num_inference_steps=7",
    ))
    calls: list[tuple[int, int]] = []
    steps_used: list[int] = []
    original, original_steps = DiffusionStage.generate, stage2.set_sampling_steps

    def record(self, n, batch=None, seed=0, steps=None):
        calls.append((self.epoch, n))
        out = original(self, n, batch, seed, steps)
        assert out.shape == (n, 1, 16, 16, 16)
        return out

    def record_steps(scheduler, steps, *args):
        steps_used.append(steps)
        return original_steps(scheduler, steps, *args)

    monkeypatch.setattr(DiffusionStage, "generate", record)
    monkeypatch.setattr(stage2, "set_sampling_steps", record_steps)
    train_diffusion(settings)
    # epoch 2: comparison (2 samples); 3: samples (1); 4: comparison; never twice in one epoch
    assert calls == [(2, 2), (3, 1), (4, 2)]
    assert steps_used == [3, 3, 3]  # diffusion.logging.num_inference_steps, not sampling's 7
    logs = tmp_path / "dm" / "logs"
    assert sorted(p.name for p in logs.glob("*.png")) == ["compare_epoch_2.png", "compare_epoch_4.png"]
    with Image.open(logs / "compare_epoch_4.png") as png:
        expected = comparison_picture(torch.zeros(2, 1, 16, 16, 16), torch.zeros(2, 1, 16, 16, 16))
        assert png.size == expected.size and png.mode == "L"
        pixels = torch.tensor(list(png.getdata()), dtype=torch.float32)
    assert pixels.std() > 10  # slices drawn, not a blank canvas


def test_fast_dev_run_makes_the_comparison_but_writes_no_picture(autoencoder_run, tmp_path, capsys):
    settings = load_settings(QUICKSTART, tiny(
        autoencoder_run, f"diffusion.checkpoints.output_dir={tmp_path / 'dm'}", "diffusion.training.fast_dev_run=true",
        "diffusion.training.num_samples_to_generate=0", "diffusion.logging.num_visualize_samples=3",
    ))
    train_diffusion(settings)
    assert "visualisation made 4 image(s)" in capsys.readouterr().out  # 3 sample slices + 1 comparison
    assert not list(tmp_path.rglob("*.png"))


def test_the_seed_configs_logging_sections_are_accepted(tmp_path):
    """The logging sections of the seed's ldm_config_patched.yaml (values as published), at its patch size."""
    s = load_settings(QUICKSTART, tiny(
        tmp_path, "data.voxel_size=[96, 96, 48]",
        "autoencoder.logging={log_dir: null, log_interval: 20, visualize_interval: 10, num_visualize_samples: 4, "
        "use_sliding_window: true, sliding_window_roi_size: [96, 96, 48], sliding_window_batch_size: 4}",
        "diffusion.logging={log_dir: null, log_interval: 20, visualize_interval: 10, num_visualize_samples: 4}",
    ))
    assert validation_window(s) == (96, 96, 48)
    assert s.diffusion.logging.num_inference_steps is None  # the pictures sample with sampling.num_inference_steps


def test_validation_metrics_are_fp32_under_bf16_autocast():
    """Sparse volumes (filaments on black) under bf16 autocast: SSIM's local variances must not cancel in bf16."""
    volume = torch.zeros(1, 1, 24, 24, 12)
    volume[0, 0, :, 5, 3] = 1.0
    volume[0, 0, 7, :, 8] = 0.8
    volume[0, 0, :, 17, 6] = 0.6
    reference = _stage(None, ae=PointwiseAutoencoder()).validation_step({"image": volume})
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = _stage(None, ae=PointwiseAutoencoder()).validation_step({"image": volume})
    assert all(math.isfinite(v) for v in mixed.values()), mixed
    assert mixed == pytest.approx(reference, rel=1e-6)
