"""Configs laid out like the seed system's (coarse2fine-pcgen ``monai_diffusion/config/*.yaml``) run here.

The YAML below uses every key of the seed's KL latent-diffusion configs with tiny sizes, so that the whole layout is
accepted and stage 1 runs; the variants reproduce the seed configs' own choices (patch-based training with an initial
downsample and sliding-window validation; a latent / UNet channel mismatch; UNet channels that the default GroupNorm
cannot split). The full-size configs were run by hand (see docs/migrating_from_coarse2fine.md).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from monai_diffusion.cli import train_autoencoder_main
from monai_diffusion.settings import load_settings

from conftest import cli_args, error_line

SEED_LAYOUT = """
data:
  train_data_dir: TRAIN
  val_data_dir: VAL
  voxel_size: [16, 16, 8]
  voxel_resize: [24, 24, 12]
  cache_rate: 0.2
  num_workers: 0
  pin_memory: false
  max_data_size_for_train: 3
  max_data_size_for_val: 1
  augmentation:
    enabled: true
    use_patch_based: false
    use_center_crop_for_val: true
    invert_intensity: false
    random_flip_prob: 0.5
    random_rotate_prob: 0.5
autoencoder:
  spatial_dims: 3
  in_channels: 1
  out_channels: 1
  num_channels: [4, 8, 8]
  latent_channels: 2
  num_res_blocks: 1
  norm_num_groups: 4
  attention_levels: [false, false, true]
  downsample_factors: [2, 2]
  initial_downsample_factor: 1
  use_conv_downsample: true
  use_convtranspose: true
  training:
    n_epochs: 1
    batch_size: 1
    learning_rate: 1.0e-4
    loss:
      reconstruction_loss_type: combined
      weighted: {loss_type: l1, foreground_weight: 100.0, background_weight: 1.0, threshold: 0.05}
      dice: {smooth: 1.0e-5, sigmoid: false}
      combined: {dice_weight: 0.5, recon_weight: 1.0, recon_loss_type: l1, foreground_weight: 100.0,
                 background_weight: 0.5, threshold: 0.05, dice_smooth: 1.0e-5}
    adv_weight: 0.01
    perceptual_weight: 0.001
    kl_weight: 5.0e-5
    use_perceptual_loss: false
    use_gradient_checkpointing: true
    gradient_accumulation_steps: 1
    autoencoder_warm_up_n_epochs: 5
    denoising: {enabled: true, noise_type: mixed, noise_std: 0.03, dropout_prob: 0.1}
    discriminator: {num_layers_d: 2, num_channels: 4}
    val_interval: 5
    save_interval: 10
    fast_dev_run: true
    fast_dev_run_batches: 2
  checkpoints: {output_dir: OUT/ae, save_best: true, resume_from: null}
  logging:
    log_dir: OUT/logs/ae
    log_interval: 10
    visualize_interval: 2
    num_visualize_samples: 4
    use_sliding_window: false
    sliding_window_roi_size: null
    sliding_window_batch_size: 1
diffusion:
  spatial_dims: 3
  in_channels: 2
  out_channels: 2
  num_channels: [8, 8]
  attention_levels: [false, true]
  num_head_channels: [0, 8]
  num_res_blocks: 1
  norm_num_groups: 4
  scheduler: {num_train_timesteps: 1000, schedule: scaled_linear_beta, beta_start: 0.0015, beta_end: 0.0195}
  training:
    n_epochs: 1
    batch_size: 2
    learning_rate: 1.0e-4
    val_interval: 10
    save_interval: 50
    generate_samples_interval: 10
    num_samples_to_generate: 4
    fast_dev_run: true
    fast_dev_run_batches: 2
  checkpoints: {autoencoder_path: OUT/ae/best_model.pt, output_dir: OUT/dm, save_best: true, resume_from: null}
  logging: {log_dir: OUT/logs/dm, log_interval: 20, visualize_interval: 10, num_visualize_samples: 4}
sampling:
  num_inference_steps: 1000
  num_samples: 16
  output_dir: OUT/samples
  save_format: both
  pointcloud: {num_points: 1000, threshold: 0.1, method: probabilistic}
device: {use_cuda: false, gpu_id: 0, mixed_precision: false}
seed: 42
"""


@pytest.fixture(scope="module")
def seed_data(tmp_path_factory) -> Path:
    """Sparse bright lines in 0..255 uint8 volumes of 28x28x14 (bigger than voxel_resize, as the seed's data are)."""
    root = tmp_path_factory.mktemp("seed_data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        (root / split).mkdir()
        for i in range(n):
            v = np.zeros((28, 28, 14), np.uint8)
            for _ in range(3):
                y, z = rng.integers(2, 26), rng.integers(2, 12)
                v[:, y, z] = 255
            nib.save(nib.Nifti1Image(v, np.eye(4)), str(root / split / f"mt_{i:03d}.nii.gz"))
    return root


def write_config(tmp_path: Path, data: Path, edit=None) -> Path:
    text = (SEED_LAYOUT.replace("TRAIN", str(data / "train")).replace("VAL", str(data / "val"))
            .replace("OUT", str(tmp_path)))
    cfg = yaml.safe_load(text)
    if edit is not None:
        edit(cfg)
    path = tmp_path / "seed_layout.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run(path: Path, *sets: str) -> int:
    return train_autoencoder_main(cli_args(path, sets, "--fast-dev-run"))


def test_every_seed_key_is_accepted_with_its_meaning(tmp_path, seed_data):
    s = load_settings(write_config(tmp_path, seed_data))
    assert s.data.voxel_resize == (24, 24, 12) and s.data.max_data_size_for_train == 3
    assert s.autoencoder.training.loss.reconstruction_loss_type == "combined"
    assert s.autoencoder.training.loss.combined.foreground_weight == 100.0
    assert s.autoencoder.training.denoising.enabled and s.autoencoder.training.denoising.noise_type == "mixed"
    assert s.sampling.save_format == "both" and s.sampling.pointcloud.num_points == 1000
    assert s.diffusion.logging.visualize_interval == 10


def test_local_layout_runs_stage1_fast_dev_run(tmp_path, seed_data, capsys):
    assert run(write_config(tmp_path, seed_data)) == 0, capsys.readouterr().err
    assert not (tmp_path / "ae").exists()  # fast_dev_run writes nothing


def test_patched_layout_with_initial_downsample_and_sliding_windows_runs(tmp_path, seed_data, capsys):
    def patched(cfg):
        cfg["data"].pop("voxel_resize")
        cfg["data"]["augmentation"]["use_patch_based"] = True
        cfg["autoencoder"]["initial_downsample_factor"] = 2
        cfg["autoencoder"]["downsample_factors"] = [2, [2, 2, 1]]  # total 8 x 8 x 4: a 2 x 2 x 2 latent
        cfg["autoencoder"]["logging"].update(use_sliding_window=True, sliding_window_roi_size=[16, 16, 8],
                                             sliding_window_batch_size=2)
        cfg["autoencoder"]["training"]["loss"]["reconstruction_loss_type"] = "l1"

    assert run(write_config(tmp_path, seed_data, patched)) == 0, capsys.readouterr().err


def test_latent_and_unet_channel_mismatch_is_named_with_its_fix(tmp_path, seed_data, capsys):
    def remote(cfg):
        cfg["autoencoder"]["latent_channels"] = 16
        cfg["diffusion"].update(in_channels=3, out_channels=3)

    path = write_config(tmp_path, seed_data, remote)
    line = error_line(capsys, run(path))
    assert "diffusion.in_channels" in line and "--set diffusion.in_channels=16" in line
    assert run(path, "diffusion.in_channels=16", "diffusion.out_channels=16") == 0


def test_unet_channels_the_default_groups_cannot_split_are_named_with_the_fix(tmp_path, seed_data, capsys):
    def high_res(cfg):
        cfg["diffusion"].pop("norm_num_groups")  # the seed never set it: MONAI's default 32
        cfg["diffusion"]["num_channels"] = [16, 32]
        cfg["diffusion"]["num_head_channels"] = [0, 32]

    path = write_config(tmp_path, seed_data, high_res)
    line = error_line(capsys, run(path))
    assert "diffusion.norm_num_groups (32)" in line and "--set diffusion.norm_num_groups=16" in line
    assert run(path, "diffusion.norm_num_groups=16") == 0


def test_perceptual_loss_without_local_weights_is_refused_by_name(tmp_path, seed_data, capsys):
    def perceptual(cfg):
        cfg["autoencoder"]["training"]["use_perceptual_loss"] = True

    line = error_line(capsys, run(write_config(tmp_path, seed_data, perceptual)))
    assert "autoencoder.training.perceptual_weights_path" in line

