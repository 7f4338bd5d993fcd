"""Every error a config, a data file or a checkpoint can cause reaches the user as one ``error:`` line, exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from monai_diffusion.cli import generate_samples_main, train_autoencoder_main, train_diffusion_main
from monai_diffusion.checkpoints import CHECKPOINT_FORMAT

from conftest import QUICKSTART, cli_args, error_line, tiny_overrides


def tiny(root: Path, *extra: str) -> list[str]:
    """The tiny run at 8^3 (2 train, 1 val): autoencoder [4, 4] with factor 2, UNet [4, 4] without attention,
    20 timesteps, no sample during training, one sample of 2 steps at quickstart's sampling batch size."""
    sets = tiny_overrides(
        root,
        "data.synthetic={enabled: true, num_train: 2, num_val: 1, seed: 0}",
        "data.voxel_size=[8, 8, 8]",
        "autoencoder.num_channels=[4, 4]",
        "autoencoder.downsample_factors=[2]",
        "diffusion.num_channels=[4, 4]",
        "diffusion.attention_levels=[false, false]",
        "diffusion.num_head_channels=4",
        "diffusion.scheduler.num_train_timesteps=20",
        "diffusion.training.n_epochs=1",
        "diffusion.training.num_samples_to_generate=0",
        "sampling.num_inference_steps=2",
        "sampling.num_samples=1",
        *extra,
    )
    return cli_args(QUICKSTART, sets)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny stage-1 and stage-2 run (one epoch each)."""
    root = tmp_path_factory.mktemp("trained")
    assert train_autoencoder_main(tiny(root)) == 0
    assert train_diffusion_main(tiny(root)) == 0
    return root


def test_config_errors_name_the_key(tmp_path, capsys):
    line = error_line(capsys, train_autoencoder_main(tiny(tmp_path, "autoencoder.num_chanels=[4, 4]")))
    assert "autoencoder.num_chanels" in line and "num_channels" in line
    line = error_line(capsys, train_autoencoder_main(tiny(tmp_path, "data.voxel_size=[9, 8, 8]")))
    assert "data.voxel_size" in line and "8 and 10" in line
    # several problems still make one line
    line = error_line(capsys, train_autoencoder_main(tiny(tmp_path, "autoencoder.training.n_epochs=0",
                                                              "autoencoder.latent_channels=0")))
    assert "autoencoder.training.n_epochs" in line and "autoencoder.latent_channels" in line
    line = error_line(capsys, train_autoencoder_main(["--config", str(tmp_path / "missing.yaml")]))
    assert "missing.yaml" in line


def test_data_errors_name_the_file(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (folder / "good.nii.gz").write_bytes(b"")
    line = error_line(capsys, train_autoencoder_main(tiny(tmp_path, "data.synthetic={enabled: false}",
                                                              f"data.train_data_dir={folder}")))
    assert "broken.nii.gz" in line
    line = error_line(capsys, train_autoencoder_main(tiny(tmp_path, "data.synthetic={enabled: false}",
                                                              f"data.train_data_dir={tmp_path / 'nope'}")))
    assert "data.train_data_dir" in line and "nope" in line


def test_resume_with_other_model_arguments(trained, tmp_path, capsys):
    ckpt = trained / "ae" / "latest_checkpoint.pt"
    code = train_autoencoder_main(tiny(trained, "autoencoder.latent_channels=3", "diffusion.in_channels=3",
                                       "diffusion.out_channels=3", f"autoencoder.checkpoints.resume_from={ckpt}",
                                       "autoencoder.training.n_epochs=2"))
    line = error_line(capsys, code)
    assert str(ckpt) in line and "latent_channels: 2 in the checkpoint, 3 in the settings" in line
    # an execution knob is not architecture: switching it on a resume is allowed
    code = train_autoencoder_main(tiny(trained, "autoencoder.use_flash_attention=true",
                                       f"autoencoder.checkpoints.resume_from={ckpt}", "autoencoder.training.n_epochs=2"))
    assert code == 0


def test_checkpoint_of_another_stage(trained, tmp_path, capsys):
    ckpt = trained / "dm" / "latest_checkpoint.pt"
    line = error_line(capsys, train_autoencoder_main(tiny(trained, f"autoencoder.checkpoints.resume_from={ckpt}")))
    assert str(ckpt) in line and "'diffusion' checkpoint, expected a 'autoencoder'" in line
    line = error_line(capsys, train_diffusion_main(tiny(trained, f"diffusion.checkpoints.autoencoder_path={ckpt}",
                                                        f"diffusion.checkpoints.output_dir={tmp_path / 'dm'}")))
    assert str(ckpt) in line and "expected a 'autoencoder'" in line


def test_older_newer_and_truncated_checkpoints(trained, tmp_path, capsys):
    def stage2(path: Path) -> int:
        return train_diffusion_main(tiny(trained, f"diffusion.checkpoints.autoencoder_path={path}",
                                         f"diffusion.checkpoints.output_dir={tmp_path / 'dm'}"))

    good = torch.load(trained / "ae" / "best_model.pt", weights_only=False)
    older = {k: v for k, v in good.items() if k != "optimizers"}
    torch.save(older, tmp_path / "older.pt")
    line = error_line(capsys, stage2(tmp_path / "older.pt"))
    assert "older.pt" in line and "older or incomplete format" in line and "'optimizers'" in line
    torch.save({**good, "version": 99}, tmp_path / "newer.pt")
    line = error_line(capsys, stage2(tmp_path / "newer.pt"))
    assert "newer.pt" in line and "version 99" in line
    data = (trained / "ae" / "best_model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    line = error_line(capsys, stage2(tmp_path / "cut.pt"))
    assert "cut.pt" in line and "cannot read checkpoint" in line
    torch.save({"format": CHECKPOINT_FORMAT, "version": 2, "stage": "diffusion"}, tmp_path / "bare.pt")
    line = error_line(capsys, generate_samples_main(tiny(trained) + ["--checkpoint", str(tmp_path / "bare.pt")]))
    assert "bare.pt" in line and "lacks" in line


def test_class_labels_outside_num_classes(trained, tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    entries = []
    for i, label in enumerate([0, 1, 2]):
        nib.save(nib.Nifti1Image(np.random.default_rng(i).random((8, 8, 8)).astype(np.float32), np.eye(4)),
                 str(tmp_path / f"v{i}.nii.gz"))
        entries.append({"image": f"v{i}.nii.gz", "group": label})
    (tmp_path / "dl.json").write_text(json.dumps({"training": entries[:2], "validation": entries[2:]}))
    code = train_diffusion_main(tiny(trained, "data.synthetic={enabled: false}", f"data.datalist={tmp_path / 'dl.json'}",
                                     "diffusion.conditioning={class_key: group, num_classes: 2}",
                                     f"diffusion.checkpoints.output_dir={tmp_path / 'dm'}"))
    line = error_line(capsys, code)
    assert "dl.json" in line and "validation[0]" in line and "group=2" in line and "0..1" in line
    assert not (tmp_path / "dm").exists()  # refused before anything was written


def test_output_folder_of_another_run_and_existing_samples(trained, capsys):
    line = error_line(capsys, train_autoencoder_main(tiny(trained)))
    assert "already holds a run" in line and "resume_from" in line
