"""Long runs survive anything: step checkpoints resumed bit for bit, ``resume_from: latest``, SIGTERM/SIGKILL at
random moments, non-finite losses on every rank (stop or skip), checkpoint writes that fail (ENOSPC).

The toy tests run in this process. The stage-1/stage-2 and two-process tests fork their training processes from
one warm interpreter (``Forker``) that imported torch once with one thread, so that each of the many starts costs
milliseconds instead of the seconds of a fresh import, and killing one at a random moment is cheap.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from monai_diffusion import engine
from monai_diffusion.engine import (
    LoopConfig,
    NonFiniteLoss,
    RunError,
    Runtime,
    find_latest_checkpoint,
    load_checkpoint,
    run_loop,
    step_checkpoints,
)
from monai_diffusion.settings import ConfigError, settings_from_dict

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "monai_diffusion" / "config" / "examples" / "quickstart.yaml"
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------ a toy stage
class NoisyToy:
    """Least squares with input noise from the global RNG, so that resuming must restore the random states."""

    name = "toy"

    def __init__(self, nan_at: set[int] = frozenset(), signal_at: int | None = None) -> None:
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)
        self.modules = {"net": self.net}
        self.optimizers = {"net": torch.optim.Adam(self.net.parameters(), lr=0.05)}
        self.calls = 0
        self.nan_at, self.signal_at = nan_at, signal_at

    def training_step(self, batch, epoch):
        self.calls += 1
        if self.calls == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, in the middle of a step
        x, y = batch
        loss = (self.net(x + 0.1 * torch.randn_like(x)) - y).pow(2).mean()
        if self.calls in self.nan_at:
            loss = loss * float("nan")
        return {"net": loss}, {"mse": loss.item()}

    def validation_step(self, batch):
        x, y = batch
        return {"val_loss": (self.net(x) - y).pow(2).mean().item()}

    def visualize(self, batch, quick=False):
        return {}

    def describe(self, batch):
        return []

    def checkpoint_extra(self):
        return {"model_args": {}}

    def architecture(self):
        return {}

    def load_extra(self, ckpt, path):
        pass


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g))
    return DataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator())


def _toy_run(out: Path, stage: NoisyToy | None = None, **kw) -> tuple[NoisyToy, engine.LoopState]:
    stage = stage or NoisyToy()
    cfg = LoopConfig(n_epochs=kw.pop("n_epochs", 3), output_dir=out, log_dir=out / "logs", section="toy", **kw)
    state = run_loop(stage, _loader(), _loader(), cfg, Runtime(CPU, None))
    return stage, state


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_sigterm_stops_after_the_step_and_latest_resumes_bit_for_bit(tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM)
    full, _ = _toy_run(tmp_path / "full")
    # 4 batches per epoch; the signal arrives inside the 6th step (epoch 2, batch 2)
    out = tmp_path / "part"
    _, state = _toy_run(out, NoisyToy(signal_at=6), every_n_steps=5, keep_last=1)
    assert state.stopped_by == "SIGTERM" and state.exit_code == 128 + signal.SIGTERM
    assert state.global_step == 6  # the step in progress was finished
    text = capsys.readouterr().out
    assert "SIGTERM: stopped after optimizer step 6 (epoch 2, batch 2 of 4)" in text
    assert "--set toy.checkpoints.resume_from=latest" in text
    # keep_last=1 kept only the stop's checkpoint of the step checkpoints; the epoch-end one stays
    assert [s for s, _ in step_checkpoints(out)] == [6]
    assert (out / "latest_checkpoint.pt").is_file() and (out / "best_model.pt").is_file()
    assert load_checkpoint(out / "step_checkpoint_00000006.pt")["position"]["batches_done"] == 2

    resumed, state = _toy_run(out, resume_from="latest", every_n_steps=5, keep_last=1)
    assert "Resuming" in capsys.readouterr().out and state.global_step == 12 and state.stopped_by is None
    assert _same_weights(full.net, resumed.net)
    # the epoch's logged mean includes the batches done before the stop
    a = load_checkpoint(tmp_path / "full" / "latest_checkpoint.pt")["history"]
    b = load_checkpoint(out / "latest_checkpoint.pt")["history"]
    assert [h["train_mse"] for h in a] == [h["train_mse"] for h in b]
    # the loop's signal handlers are gone once it returns
    assert signal.getsignal(signal.SIGTERM) is before


def test_latest_skips_a_truncated_checkpoint_and_names_it_when_given(tmp_path, capsys):
    out = tmp_path / "run"
    _toy_run(out, n_epochs=1, every_n_steps=1)
    (out / "latest_checkpoint.pt").unlink()
    (out / "best_model.pt").unlink()
    newest = out / "step_checkpoint_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:200])  # as a full disk or a copy cut short leaves it
    path, skipped = find_latest_checkpoint(out, "toy")
    assert path == out / "step_checkpoint_00000003.pt"
    assert len(skipped) == 1 and "step_checkpoint_00000004.pt" in skipped[0] and "truncated" in skipped[0]
    with pytest.raises(RunError, match="cannot read checkpoint .*step_checkpoint_00000004.pt"):
        _toy_run(out, n_epochs=1, resume_from=newest)
    _, state = _toy_run(out, n_epochs=1, resume_from="latest")
    assert "skipping" in capsys.readouterr().out and state.global_step == 4


def test_latest_without_a_checkpoint_is_an_error_unless_asked_to_start_fresh(tmp_path, capsys):
    with pytest.raises(RunError, match="holds no checkpoint to resume.*start_fresh_if_none"):
        _toy_run(tmp_path / "empty", n_epochs=1, resume_from="latest")
    _, state = _toy_run(tmp_path / "empty", n_epochs=1, resume_from="latest", start_fresh_if_none=True)
    assert state.global_step == 4 and "starting a new run" in capsys.readouterr().out
    # a folder holding only step checkpoints is a run too: a fresh start there is refused
    out = tmp_path / "steps"
    _toy_run(out, n_epochs=1, every_n_steps=2)
    (out / "latest_checkpoint.pt").unlink()
    (out / "best_model.pt").unlink()
    with pytest.raises(RunError, match="already holds a run.*resume_from=latest"):
        _toy_run(out, n_epochs=1)


def test_settings_accept_latest_and_check_the_new_keys():
    s = settings_from_dict({"autoencoder": {"checkpoints": {"resume_from": "latest", "start_fresh_if_none": True,
                                                            "every_n_steps": 100, "keep_last": 3}},
                            "diffusion": {"training": {"on_nonfinite": "skip", "max_consecutive_skips": 4}}},
                           check_paths=True, require_data=False)
    assert s.autoencoder.checkpoints.resume_from == "latest" and s.diffusion.training.on_nonfinite == "skip"
    with pytest.raises(ConfigError, match="start_fresh_if_none: applies only with"):
        settings_from_dict({"diffusion": {"checkpoints": {"start_fresh_if_none": True}}}, check_paths=False)
    with pytest.raises(ConfigError, match="keep_last"):
        settings_from_dict({"autoencoder": {"checkpoints": {"keep_last": 0}}}, check_paths=False)
    with pytest.raises(ConfigError, match="on_nonfinite"):
        settings_from_dict({"autoencoder": {"training": {"on_nonfinite": "ignore"}}}, check_paths=False)


def test_full_disk_keeps_the_previous_checkpoint_and_removes_the_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    writes = []

    def save_then_fill_the_disk(obj, f, *args, **kwargs):
        writes.append(getattr(f, "name", f))
        if len(writes) == 4:  # the 4th checkpoint write: half of it lands, then the disk is full
            f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(engine.torch, "save", save_then_fill_the_disk)
    with pytest.raises(RunError) as info:
        _toy_run(out, n_epochs=1, every_n_steps=1)
    message = str(info.value)
    assert "\n" not in message and "No space left on device (ENOSPC)" in message
    assert "step_checkpoint_00000004.pt" in message
    # the three complete checkpoints are there and readable; nothing partial is left
    assert [s for s, _ in step_checkpoints(out)] == [1, 2, 3]
    assert load_checkpoint(out / "step_checkpoint_00000003.pt")["global_step"] == 3
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_on_nonfinite_skip_drops_the_step_counts_it_and_stops_after_m_in_a_row(tmp_path, capsys):
    # calls 2 and 3 have a NaN loss: two optimizer steps are dropped, the rest goes on
    skipped, state = _toy_run(tmp_path / "skip", NoisyToy(nan_at={2, 3}), n_epochs=1, on_nonfinite="skip")
    out = capsys.readouterr().out
    assert state.skipped_batches == 2 and state.global_step == 2
    assert "skipped: toy: loss 'net' became nan at epoch 1, batch 3 (2 in a row, 2 in all)" in out
    assert "skipped_batches=2" in out
    assert all(torch.isfinite(p).all() for p in skipped.net.parameters())
    with pytest.raises(NonFiniteLoss, match="3 batches in a row had a non-finite loss.*max_consecutive_skips=3"):
        _toy_run(tmp_path / "many", NoisyToy(nan_at={2, 3, 4}), n_epochs=1, on_nonfinite="skip",
                 max_consecutive_skips=3)


def test_nonfinite_loss_stops_and_names_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"loss 'net' became nan at epoch 1, batch 4.*the last good checkpoint "
                                            r"is .*step_checkpoint_00000003.pt"):
        _toy_run(tmp_path / "stop", NoisyToy(nan_at={4}), n_epochs=1, every_n_steps=1)
