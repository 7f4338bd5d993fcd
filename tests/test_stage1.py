"""Stage 1 end to end: fast_dev_run, exact resume, no overwrite, atomic checkpoints, real NIfTI headers, DDP."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
import torch
from nibabel.testing import data_path as NIB_DATA

from monai_diffusion.cli import train_autoencoder_main
from monai_diffusion.checkpoints import atomic_save, load_checkpoint
from monai_diffusion.errors import RunError
from monai_diffusion.models import load_autoencoder
from monai_diffusion.settings import load_settings
from monai_diffusion.stage1 import train_autoencoder

from conftest import CONFIGS, QUICKSTART, REPO, tiny_any_config as tiny  # tiny: shrinks any shipped config


def settings_for(tmp_path: Path, *extra: str, config: Path = QUICKSTART):
    return load_settings(config, tiny(tmp_path, *extra))


@pytest.mark.parametrize(
    "config, extra",
    [
        ("ldm_config.yaml", ["autoencoder.downsample_factors=[2, 2]", "autoencoder.attention_levels=[false, false, false]"]),
        # fp32 for the two bf16 configs: at these tiny sizes their bf16 autocast gave a NaN loss at the second step,
        # now and then, with 2 CPU threads on a CPU without avx512_bf16 (not with 1 thread); bf16 itself is covered
        # by tests/test_engine.py
        ("examples/ldm_config_8x_downsample.yaml",
         ["autoencoder.attention_levels=[false, false, true]", "device.mixed_precision=false"]),
        (
            "examples/ldm_config_16x_downsample.yaml",
            ["autoencoder.attention_levels=[false, false, true]", "data.voxel_size=[32, 32, 32]",
             "device.mixed_precision=false"],
        ),
        ("examples/quickstart.yaml", []),
    ],
)
def test_fast_dev_run_of_shipped_configs(tmp_path, capsys, config, extra):
    path = CONFIGS / config
    settings = load_settings(path, tiny(tmp_path, "autoencoder.training.fast_dev_run=true", *extra))
    # keep each config's own factors (only the sizes shrink) unless overridden above
    state = train_autoencoder(settings)
    out = capsys.readouterr().out
    assert "total downsample factor" in out and "latent" in out
    assert "parameters: autoencoder" in out
    assert "s/step" in out and "peak memory" in out
    assert state.epoch == 1
    # fast_dev_run leaves nothing a real run could take for its own
    ae_dir = tmp_path / "ae"
    assert not (ae_dir / "latest_checkpoint.pt").exists()
    assert not (ae_dir / "best_model.pt").exists()
    assert not (ae_dir / "logs").exists()


def test_8x_config_keeps_its_factors_when_shrunk(tmp_path, capsys):
    path = CONFIGS / "examples" / "ldm_config_8x_downsample.yaml"
    settings = load_settings(path, tiny(tmp_path, "autoencoder.training.fast_dev_run=true",
                                        "device.mixed_precision=false"))  # fp32: see above
    assert list(settings.autoencoder.downsample_factors) == [4, 2]
    train_autoencoder(settings)
    assert "latent (2, 2, 2, 2, 2)" in capsys.readouterr().out  # 16^3 / 8


def _weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(path, expected_stage="autoencoder")
    return {f"{m}.{k}": v for m, sd in ckpt["state_dict"].items() for k, v in sd.items()}


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    train_autoencoder(settings_for(full, "data.augmentation={enabled: true, random_flip_prob: 0.5}"))

    part = tmp_path / "part"
    train_autoencoder(
        settings_for(part, "autoencoder.training.n_epochs=1", "data.augmentation={enabled: true, random_flip_prob: 0.5}")
    )
    first = load_checkpoint(part / "ae" / "latest_checkpoint.pt")
    assert first["epoch"] == 0
    train_autoencoder(
        settings_for(
            part,
            "data.augmentation={enabled: true, random_flip_prob: 0.5}",
            f"autoencoder.checkpoints.resume_from={part / 'ae' / 'latest_checkpoint.pt'}",
        )
    )
    a, b = _weights(full / "ae" / "latest_checkpoint.pt"), _weights(part / "ae" / "latest_checkpoint.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the discriminator trained in epoch 2 (warm-up 1), so its optimizer state was restored too
    assert any(not torch.equal(first["state_dict"]["discriminator"][k], v) for k, v in
               load_checkpoint(part / "ae" / "latest_checkpoint.pt")["state_dict"]["discriminator"].items())


def test_checkpoint_describes_itself(tmp_path):
    train_autoencoder(settings_for(tmp_path, "autoencoder.downsample_factors=[[2, 2, 1], 2]", "autoencoder.training.n_epochs=1"))
    model, ckpt = load_autoencoder(tmp_path / "ae" / "best_model.pt")
    assert model.downsample_factors == ((2, 2, 1), (2, 2, 2))
    assert ckpt["model_args"]["downsample_factors"] == [[2, 2, 1], [2, 2, 2]]
    assert ckpt["settings"]["autoencoder"]["downsample_factors"] == [[2, 2, 1], 2]
    for key in ("optimizers", "scalers", "epoch", "global_step", "best_metric", "data_info", "version"):
        assert key in ckpt, key
    assert (tmp_path / "ae" / "logs").is_dir() and any((tmp_path / "ae" / "logs").iterdir())


def test_new_run_refuses_to_overwrite_a_previous_run(tmp_path, capsys):
    train_autoencoder(settings_for(tmp_path, "autoencoder.training.n_epochs=1"))
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "ae").glob("*.pt")}
    with pytest.raises(RunError, match="already holds a run"):
        train_autoencoder(settings_for(tmp_path, "autoencoder.training.n_epochs=1"))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ae").glob("*.pt")} == before
    # the command line reports it as an error, not a traceback
    rc = train_autoencoder_main(["--config", str(QUICKSTART), *sum((["--set", o] for o in tiny(tmp_path)), [])])
    assert rc == 2
    assert "resume_from" in capsys.readouterr().err


def test_atomic_save_keeps_the_previous_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "latest_checkpoint.pt"
    atomic_save({"value": 1}, target)

    def half_then_full_disk(obj, f):
        f.write(b"PK\x03\x04 a partial checkpoint")
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", half_then_full_disk)
    with pytest.raises(RuntimeError, match="simulated"):
        atomic_save({"value": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"value": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["latest_checkpoint.pt"]  # no temporary file left behind


def test_resume_from_a_missing_or_foreign_file_is_a_clear_error(tmp_path):
    from monai_diffusion.settings import ConfigError

    with pytest.raises(ConfigError, match=r"autoencoder\.checkpoints\.resume_from: file not found"):
        settings_for(tmp_path, f"autoencoder.checkpoints.resume_from={tmp_path / 'nope.pt'}")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(RunError, match="not a monai-diffusion checkpoint"):
        train_autoencoder(settings_for(tmp_path, f"autoencoder.checkpoints.resume_from={foreign}"))


def test_perceptual_loss_without_weights_stops_before_training(tmp_path):
    from monai_diffusion.settings import ConfigError

    with pytest.raises(ConfigError, match="perceptual_weights_path"):
        settings_for(tmp_path, "autoencoder.training.use_perceptual_loss=true")


def test_real_nifti_header_goes_through_stage_one(tmp_path, capsys):
    """nibabel's anatomical.nii: 33x41x25, LAS, 2 mm; reoriented to RAS and resized to the network size."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.nii", "b.nii"):
        shutil.copy(Path(NIB_DATA) / "anatomical.nii", data / name)
    assert nib.aff2axcodes(nib.load(data / "a.nii").affine) == ("L", "A", "S")
    settings = settings_for(
        tmp_path,
        "data.synthetic={enabled: false}",
        f"data.train_data_dir={data}",
        "data.voxel_size=[16, 16, 16]",
        "autoencoder.training.n_epochs=1",
        "autoencoder.training.batch_size=1",
    )
    train_autoencoder(settings)
    ckpt = load_checkpoint(tmp_path / "ae" / "latest_checkpoint.pt")
    info = ckpt["data_info"]
    assert "".join(info["orientation"]) == "RAS"
    affine = torch.tensor(info["affine"])
    assert nib.aff2axcodes(affine.numpy()) == ("R", "A", "S")
    assert "1 validation" in capsys.readouterr().out  # no validation source: split off from training


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_on_gloo(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    overrides = tiny(tmp_path, "autoencoder.training.n_epochs=2", "autoencoder.training.batch_size=1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(REPO / "monai_diffusion" / "3d_ldm" / "train_autoencoder.py"),
        "--config",
        str(QUICKSTART),
        *sum((["--set", o] for o in overrides), []),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "processes: 2" in proc.stdout
    ckpt = load_checkpoint(tmp_path / "ae" / "latest_checkpoint.pt")
    assert ckpt["epoch"] == 1
    # 4 training volumes, batch 1, 2 ranks: 2 optimizer steps per epoch
    assert ckpt["global_step"] == 4


def test_frozen_discriminator_forward_survives_an_inplace_buffer_broadcast():
    """The generator's adversarial forward gives a plain call's outputs, gradients and BatchNorm statistics, and its
    graph does not hold the buffers that DDP's buffer broadcast (the wrapped discriminator's next forward) writes in
    place before backward (torch 2.11 failed there: "modified by an inplace operation")."""
    from monai_diffusion.stage1 import build_discriminator, forward_with_own_buffers

    torch.manual_seed(0)
    plain_d, own_d = build_discriminator(3, 1, 2, 8), build_discriminator(3, 1, 2, 8)
    own_d.load_state_dict(plain_d.state_dict())
    x = torch.rand(2, 1, 16, 16, 16)
    results = []
    for disc, call in ((plain_d, lambda d, v: d(v)), (own_d, forward_with_own_buffers)):
        v = x.clone().requires_grad_(True)
        disc.requires_grad_(False)
        out = call(disc, v)[-1]
        disc.requires_grad_(True)
        results.append((out, v, {k: b.clone() for k, b in disc.state_dict().items()}))
    (out_a, v_a, state_a), (out_b, v_b, state_b) = results
    assert torch.equal(out_a, out_b)
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert any(k.endswith("running_mean") and not torch.equal(state_a[k], torch.zeros_like(state_a[k])) for k in state_a)
    with torch.no_grad():  # what DDP's broadcast_buffers does to every buffer before the discriminator's forward
        for buf in own_d.buffers():
            buf.copy_(buf)
    out_b.square().mean().backward()
    out_a.square().mean().backward()
    assert torch.equal(v_a.grad, v_b.grad)


def test_random_patch_training_validates_whole_volumes_with_sliding_windows(tmp_path, capsys):
    """Patches of 16^3 from the 33x41x25 nibabel volume; validation reconstructs the whole (padded) volume."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.nii", "b.nii", "c.nii"):
        shutil.copy(Path(NIB_DATA) / "anatomical.nii", data / name)
    settings = settings_for(
        tmp_path,
        "data.synthetic={enabled: false}",
        f"data.train_data_dir={data}",
        "data.crop_mode=random_patch",
        "data.voxel_size=[16, 16, 16]",
        "autoencoder.training.n_epochs=1",
        "autoencoder.training.batch_size=2",
    )
    state = train_autoencoder(settings)
    assert "input batch (2, 1, 16, 16, 16)" in capsys.readouterr().out
    metrics = state.history[-1]
    assert 0 < metrics["val_l1"] < 1 and metrics["val_psnr"] > 0


def test_resume_never_writes_into_another_runs_folder(tmp_path):
    train_autoencoder(settings_for(tmp_path / "a", "autoencoder.training.n_epochs=1"))
    train_autoencoder(settings_for(tmp_path / "b", "autoencoder.training.n_epochs=1"))
    before = (tmp_path / "b" / "ae" / "latest_checkpoint.pt").read_bytes()
    with pytest.raises(RunError, match="holds another run"):
        train_autoencoder(
            settings_for(tmp_path / "b", f"autoencoder.checkpoints.resume_from={tmp_path / 'a' / 'ae' / 'latest_checkpoint.pt'}")
        )
    assert (tmp_path / "b" / "ae" / "latest_checkpoint.pt").read_bytes() == before


def test_attention_warning_names_the_matrix_size_and_the_fix():
    from monai_diffusion.stage1 import attention_warning

    # the seed's high-resolution config: 256x256x64, [16, 32, 64], factors 2, 2: 64x64x16 = 65,536 positions
    args = {"num_channels": [16, 32, 64], "attention_levels": [False, False, True], "downsample_factors": None}
    (line,) = attention_warning(args, (256, 256, 64))
    assert "65,536 positions" in line and "16.0 GiB" in line and "autoencoder.use_flash_attention=true" in line
    assert attention_warning({**args, "use_flash_attention": True}, (256, 256, 64)) == []
    assert attention_warning({**args, "downsample_factors": [4, 2]}, (256, 256, 64)) == []  # 8,192: 0.25 GiB
    # attention on the first level only, no non-local blocks: the full-resolution level counts
    first = {**args, "attention_levels": [True, False, False], "with_encoder_nonlocal_attn": False,
             "with_decoder_nonlocal_attn": False, "initial_downsample_factor": 2}
    assert "65,536 positions" in attention_warning(first, (128, 128, 32))[0]  # 64 x 64 x 16
