"""What a run leaves behind and what it starts from: config.yaml and train.log, init_from (progressive resolution),
fast_dev_run of both stages, and a 2D PNG folder through all three scripts."""

from __future__ import annotations

import numpy as np
import torch
import yaml

from monai_diffusion.cli import generate_samples_main, train_autoencoder_main, train_diffusion_main
from monai_diffusion.settings import load_settings

from conftest import QUICKSTART, tiny_run_args as args  # args: the tiny train -> train -> sample run

CONFIG_2D = QUICKSTART.parent / "ldm_config_2d_512.yaml"


def test_run_record_config_and_log(tmp_path, capsys):
    assert train_autoencoder_main(args(tmp_path)) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "ae"
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    # every default filled in, and it loads back to the settings the run used
    defaults = load_settings(None, check_paths=False)
    assert saved["autoencoder"]["training"]["perceptual_network"] == defaults.autoencoder.training.perceptual_network
    assert saved["data"]["voxel_size"] == [16, 16, 16] and "max_filaments" in saved["data"]["synthetic"]
    assert load_settings(folder / "config.yaml").autoencoder.latent_channels == 2
    log = (folder / "train.log").read_text()
    assert "new run" in log and "data: synthetic" in log and "autoencoder epoch 1:" in log
    assert all(line in log for line in out.splitlines() if line.startswith("autoencoder epoch"))
    # a resume appends to the log and keeps the first config.yaml; changed settings go beside it
    ckpt = folder / "latest_checkpoint.pt"
    assert train_autoencoder_main(args(tmp_path, f"autoencoder.checkpoints.resume_from={ckpt}",
                                       "autoencoder.training.n_epochs=2")) == 0
    log = (folder / "train.log").read_text()
    assert log.count("====") == 2 and "resuming" in log and "autoencoder epoch 2:" in log
    assert (folder / "config.resume-1.yaml").is_file()
    assert yaml.safe_load((folder / "config.yaml").read_text()) == saved


def test_fast_dev_run_runs_everything_once_and_writes_nothing(tmp_path, capsys):
    assert train_autoencoder_main(args(tmp_path)) == 0
    capsys.readouterr()
    assert train_diffusion_main(args(tmp_path, "diffusion.training.fast_dev_run=true")) == 0
    out = capsys.readouterr().out
    # one sample after 2 DDIM steps: three planes, and the same sample next to a real volume
    assert "fast_dev_run: visualisation made 4 image(s)" in out
    assert "checkpoint serialised in memory" in out and "peak memory of the last training step" in out
    assert not (tmp_path / "dm").exists()


def test_init_from_a_smaller_run_and_refusal_of_another_architecture(tmp_path, capsys):
    small = tmp_path / "small"
    assert train_autoencoder_main(args(small)) == 0  # trained at 16^3
    source = torch.load(small / "ae" / "best_model.pt", weights_only=False)["state_dict"]["autoencoder"]
    big = tmp_path / "big"
    code = train_autoencoder_main(args(big, "autoencoder.training.learning_rate=1e-12",
                                       f"autoencoder.checkpoints.init_from={small / 'ae' / 'best_model.pt'}",
                                       size="[32, 32, 32]"))
    assert code == 0
    out = capsys.readouterr().out
    assert "initialised autoencoder, discriminator from" in out and "optimizer and epoch start fresh" in out
    trained = torch.load(big / "ae" / "latest_checkpoint.pt", weights_only=False)
    assert trained["epoch"] == 0 and trained["global_step"] == 1  # a fresh run: epoch 1, one step
    # with a negligible learning rate the weights are still (almost) those of the 16^3 run
    for key, value in source.items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(trained["state_dict"]["autoencoder"][key], value, atol=1e-6, rtol=0)
    other = tmp_path / "other"
    code = train_autoencoder_main(args(other, "autoencoder.num_channels=[4, 8]",
                                       f"autoencoder.checkpoints.init_from={small / 'ae' / 'best_model.pt'}"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "num_channels: [4, 4] in the checkpoint, [4, 8] in the settings" in err[0]
    assert not (other / "ae").exists()


def test_2d_png_folder_through_all_three_scripts(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "pngs"
    folder.mkdir()
    yy, xx = np.mgrid[:20, :24]
    for i in range(4):
        cy, cx = rng.uniform(6, 14), rng.uniform(6, 18)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(9, 30)).astype(np.float32)
        Image.fromarray((disc * 200 + 20).astype(np.uint8)).save(folder / f"img{i}.png")
    two_d = ["data.synthetic={enabled: false}", f"data.train_data_dir={folder}", "data.val_data_dir=null",
             "data.cache_rate=0", "data.augmentation={enabled: false}", "autoencoder.num_res_blocks=1",
             "autoencoder.training.perceptual_weight=0", "autoencoder.training.gradient_accumulation_steps=1",
             "diffusion.num_res_blocks=1", "diffusion.num_head_channels=4", "diffusion.training.cache_latents=false",
             "diffusion.training.gradient_accumulation_steps=1", "diffusion.training.lr_warmup_steps=0",
             "diffusion.training.ema_decay=null"]
    a = args(tmp_path, *two_d, config=CONFIG_2D, size="[16, 16]")
    assert train_autoencoder_main(a) == 0
    assert train_diffusion_main(a) == 0
    assert generate_samples_main(a) == 0
    samples = sorted((tmp_path / "samples").iterdir())
    assert [p.name for p in samples] == ["sample_0000.png", "sample_0001.png"]  # 2D samples are PNG images
    assert all(Image.open(p).size == (16, 16) and Image.open(p).mode == "L" for p in samples)
