"""Every error a config, a data file or a checkpoint can cause reaches the user as one ``error:`` line, exit code 2."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from monai_diffusion.cli import generate_samples_main, train_autoencoder_main, train_diffusion_main
from monai_diffusion.checkpoints import CHECKPOINT_FORMAT

QUICKSTART = Path(__file__).resolve().parents[1] / "monai_diffusion" / "config" / "examples" / "quickstart.yaml"


def tiny(root: Path, *extra: str) -> list[str]:
    sets = [
        "data.synthetic={enabled: true, num_train: 2, num_val: 1, seed: 0}",
        "data.voxel_size=[8, 8, 8]",
        "autoencoder.num_channels=[4, 4]",
        "autoencoder.downsample_factors=[2]",
        "autoencoder.attention_levels=[false, false]",
        "autoencoder.norm_num_groups=4",
        "autoencoder.latent_channels=2",
        "autoencoder.training.n_epochs=1",
        "autoencoder.training.batch_size=2",
        "autoencoder.training.discriminator={num_layers_d: 1, num_channels: 4}",
        f"autoencoder.checkpoints.output_dir={root / 'ae'}",
        "diffusion.in_channels=2",
        "diffusion.out_channels=2",
        "diffusion.num_channels=[4, 4]",
        "diffusion.attention_levels=[false, false]",
        "diffusion.num_head_channels=4",
        "diffusion.norm_num_groups=4",
        "diffusion.scheduler.num_train_timesteps=20",
        "diffusion.training.n_epochs=1",
        "diffusion.training.batch_size=2",
        "diffusion.training.num_samples_to_generate=0",
        f"diffusion.checkpoints.autoencoder_path={root / 'ae' / 'best_model.pt'}",
        f"diffusion.checkpoints.output_dir={root / 'dm'}",
        "sampling.num_inference_steps=2",
        "sampling.num_samples=1",
        f"sampling.output_dir={root / 'samples'}",
        "device.use_cuda=false",
        *extra,
    ]
    return cli_args(QUICKSTART, sets)


def cli_args(config: Path, sets: Sequence[str], *flags: str) -> list[str]:
    """The argv of a CLI entry point: ``--config CONFIG [FLAGS] --set S ...`` for these overrides."""
    out = ["--config", str(config), *flags]
    for s in sets:
        out += ["--set", s]
    return out


def error_line(capsys, code: int) -> str:
    """The command's exit code is 2 and stderr holds exactly one line, starting with 'error: '."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "it/s" not in line and "%|" not in line]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


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
