"""Memory before work: the estimate of a training step (fake tensors, nothing allocated), the check that stops a run
that will not fit before anything is written, and ``batch_size: auto``; all against a small artificial limit."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from monai_diffusion.cli import train_autoencoder_main, train_diffusion_main
from monai_diffusion.errors import ConfigError
from monai_diffusion.memory import MARGIN, MIB
from monai_diffusion.plan import preflight
from monai_diffusion.settings import load_settings, settings_from_dict

from conftest import QUICKSTART, cli_args, error_line, tiny_overrides


def _limit(monkeypatch, mib: float) -> None:
    monkeypatch.setattr(preflight, "available_bytes", lambda device: (int(mib * MIB), "a test limit"))


def _settings(root: Path, **training):
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["autoencoder"].setdefault("training", {}).update(training)
    raw["autoencoder"].setdefault("checkpoints", {})["output_dir"] = str(root / "ae")
    raw["data"]["voxel_size"] = [16, 16, 16]
    raw["device"] = {"use_cuda": False, "mixed_precision": False}
    return settings_from_dict(raw, check_paths=False, require_data=False)


def test_estimate_grows_with_the_batch(tmp_path):
    s = _settings(tmp_path)
    one = preflight.estimate_step(s, "autoencoder", preflight._device(s), 1)
    four = preflight.estimate_step(s, "autoencoder", preflight._device(s), 4)
    assert 0 < one["peak_mib"] < four["peak_mib"]
    assert four["need_mib"] == pytest.approx(four["peak_mib"] * MARGIN["cpu"][0] + MARGIN["cpu"][1])
    assert one["precision"] == "fp32" and one["batch_size"] == 1


def test_too_large_stops_before_anything_is_written(tmp_path, monkeypatch, capsys):
    _limit(monkeypatch, 100)  # below the margin alone
    line = error_line(capsys, train_autoencoder_main(cli_args(QUICKSTART, tiny_overrides(tmp_path))))
    assert "autoencoder training step (batch 2, fp32) needs about" in line
    assert "0.1 GiB available (a test limit)" in line and "device.memory_check=false" in line
    assert "--set " in line  # plan's changes, most effective first
    assert not (tmp_path / "ae").exists()


def test_check_can_be_turned_off_and_fitting_runs_say_so(tmp_path, monkeypatch, capsys):
    _limit(monkeypatch, 100)
    sets = tiny_overrides(tmp_path, "device.memory_check=false")
    assert train_autoencoder_main(cli_args(QUICKSTART, sets, "--fast-dev-run")) == 0
    _limit(monkeypatch, 64 * 1024)
    assert train_autoencoder_main(cli_args(QUICKSTART, tiny_overrides(tmp_path), "--fast-dev-run")) == 0
    assert "GiB estimated for one autoencoder training step (batch 2, fp32), 64.0 GiB available" in \
        capsys.readouterr().out


def test_auto_batch_picks_what_fits_and_resume_keeps_it(tmp_path, monkeypatch, capsys):
    s = load_settings(QUICKSTART, overrides=tiny_overrides(tmp_path), check_paths=False)  # the run below, at batch b
    needs = {b: preflight.estimate_step(s, "autoencoder", preflight._device(s), b)["need_mib"] for b in (2, 4)}
    assert needs[2] < needs[4]
    _limit(monkeypatch, (needs[2] + needs[4]) / 2)
    sets = tiny_overrides(tmp_path, "autoencoder.training.batch_size=auto",
                          "autoencoder.training.effective_batch_size=5")
    assert train_autoencoder_main(cli_args(QUICKSTART, sets)) == 0
    out = capsys.readouterr().out
    assert "autoencoder.training.batch_size auto: 2 (" in out and "gradient_accumulation_steps 3: 6 volumes" in out
    record = yaml.safe_load((tmp_path / "ae" / "config.yaml").read_text())["autoencoder"]["training"]
    assert (record["batch_size"], record["gradient_accumulation_steps"], record["effective_batch_size"]) == (2, 3, 5)
    # a resume with more memory keeps the run's batch (its config.yaml), so that the run goes on as it started
    _limit(monkeypatch, 64 * 1024)
    more = [*sets, "autoencoder.training.n_epochs=2", "autoencoder.checkpoints.resume_from=latest"]
    assert train_autoencoder_main(cli_args(QUICKSTART, more)) == 0
    assert "resuming with the run's batch_size 2 and gradient_accumulation_steps 3" in capsys.readouterr().out


def test_auto_batch_that_cannot_fit_even_one(tmp_path, monkeypatch, capsys):
    _limit(monkeypatch, 100)
    sets = tiny_overrides(tmp_path, "autoencoder.training.batch_size=auto",
                          "autoencoder.training.effective_batch_size=4")
    line = error_line(capsys, train_autoencoder_main(cli_args(QUICKSTART, sets)))
    assert "(batch 1, fp32) needs about" in line and not (tmp_path / "ae").exists()


@pytest.mark.parametrize("extra, key", [
    ({"batch_size": "auto"}, "autoencoder.training.effective_batch_size"),
    ({"batch_size": "auto", "effective_batch_size": 8, "gradient_accumulation_steps": 2},
     "autoencoder.training.gradient_accumulation_steps"),
    ({"batch_size": 2, "effective_batch_size": 8}, "autoencoder.training.effective_batch_size"),
])
def test_auto_batch_settings_errors(tmp_path, extra, key):
    with pytest.raises(ConfigError) as info:
        _settings(tmp_path, **extra)
    assert info.value.key == key


def test_auto_batch_from_python_needs_prepare_training(tmp_path):
    from monai_diffusion.engine import loop_config

    s = _settings(tmp_path, batch_size="auto", effective_batch_size=4)
    with pytest.raises(ConfigError, match="prepare_training"):
        loop_config(s, "autoencoder")


def test_stage2_check_runs_on_the_latent_unet(tmp_path, monkeypatch, capsys):
    _limit(monkeypatch, 64 * 1024)
    assert train_autoencoder_main(cli_args(QUICKSTART, tiny_overrides(tmp_path))) == 0
    _limit(monkeypatch, 100)
    line = error_line(capsys, train_diffusion_main(cli_args(QUICKSTART, tiny_overrides(tmp_path))))
    assert "diffusion training step (batch 2, fp32) needs about" in line and "--set diffusion." in line
    assert not (tmp_path / "dm").exists()


def test_stage2_check_with_rectified_flow(tmp_path, monkeypatch, capsys):
    # MONAI's RFlowScheduler is an nn.Module without nn.Module's own state: the estimate must still be made
    _limit(monkeypatch, 64 * 1024)
    assert train_autoencoder_main(cli_args(QUICKSTART, tiny_overrides(tmp_path))) == 0
    rflow = tiny_overrides(tmp_path, "diffusion.scheduler.type=rflow")
    _limit(monkeypatch, 100)
    line = error_line(capsys, train_diffusion_main(cli_args(QUICKSTART, rflow)))
    assert "diffusion training step (batch 2, fp32) needs about" in line
    _limit(monkeypatch, 64 * 1024)
    assert train_diffusion_main(cli_args(QUICKSTART, rflow, "--fast-dev-run")) == 0
    out = capsys.readouterr().out
    assert "GiB estimated for one diffusion training step" in out and "training step failed" not in out
