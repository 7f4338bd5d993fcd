"""fp16 loss scaling in the loop, on CPU: resuming a run that had no scaler, and steps the scaler skips."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from monai_diffusion.checkpoints import load_checkpoint
from monai_diffusion.engine import LoopConfig, run_loop
from monai_diffusion.runtime import Runtime

CPU = torch.device("cpu")


class Toy:
    """Least squares; ``blow_up_at`` (1-based training_step calls) multiplies that batch's loss by 1e35, so that its
    gradients, scaled by fp16 loss scaling, overflow to inf while the loss itself stays finite."""

    name = "toy"

    def __init__(self, blow_up_at: frozenset[int] = frozenset()) -> None:
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)
        self.modules = {"net": self.net}
        self.optimizers = {"net": torch.optim.SGD(self.net.parameters(), lr=0.05)}
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizers["net"], lambda step: 0.9**step)
        self.blow_up_at = blow_up_at
        self.calls = 0
        self.after_steps: list[int] = []  # the step numbers after_optimizer_step was called with

    def training_step(self, batch, epoch):
        self.calls += 1
        x, y = batch
        loss = (self.net(x) - y).float().pow(2).mean()
        if self.calls in self.blow_up_at:
            loss = loss * 1e35
        return {"net": loss}, {"mse": loss.item()}

    def after_optimizer_step(self, step: int) -> None:
        self.lr_scheduler.step()
        self.after_steps.append(step)

    def validation_step(self, batch):
        x, y = batch
        return {"val_loss": (self.net(x) - y).pow(2).mean().item()}

    def visualize(self, batch, quick=False):
        return {}

    def describe(self, batch):
        return []

    def checkpoint_extra(self):
        return {"model_args": {}, "lr_scheduler": self.lr_scheduler.state_dict()}

    def architecture(self):
        return {}

    def load_extra(self, ckpt, path):
        self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g))
    return DataLoader(data, batch_size=2, shuffle=False)


def _cfg(out: Path, n_epochs: int, **kw) -> LoopConfig:
    return LoopConfig(n_epochs=n_epochs, output_dir=out, log_dir=out / "logs", **kw)


def test_fp16_resume_of_a_run_without_loss_scaling_starts_a_fresh_scaler(tmp_path):
    out = tmp_path / "run"
    run_loop(Toy(), _loader(), None, _cfg(out, 1), Runtime(CPU, torch.bfloat16))
    assert load_checkpoint(out / "latest_checkpoint.pt")["scalers"] == {"net": {}}  # a disabled scaler saves nothing

    stage = Toy()
    state = run_loop(stage, _loader(), None, _cfg(out, 2, resume_from="latest"), Runtime(CPU, torch.float16))
    # a fresh fp16 scaler starts at a high scale and skips the first steps whose gradients overflow; those are not
    # counted (test_a_step_the_scaler_skips_...)
    assert state.epoch == 2 and state.global_step == 4 + len(stage.after_steps) and stage.after_steps
    log = (out / "train.log").read_text()
    assert "no fp16 loss-scaling state for 'net'" in log and "starts fresh" in log
    saved = load_checkpoint(out / "latest_checkpoint.pt")["scalers"]["net"]
    assert saved["scale"] > 0  # the fp16 run's scaler is saved and restored from now on

    # and back: a bf16 run resumes the fp16 run's checkpoint (its scaler state is not needed)
    state = run_loop(Toy(), _loader(), None, _cfg(out, 3, resume_from="latest"), Runtime(CPU, torch.bfloat16))
    assert state.epoch == 3


class SkippingScaler:
    """Stands in for fp16 loss scaling: the optimizer steps numbered in ``skip_at`` (1-based) are skipped, as
    ``GradScaler.step`` skips a step whose gradients hold inf or NaN, and ``update`` then halves the scale."""

    def __init__(self, skip_at: frozenset[int] = frozenset()) -> None:
        self.skip_at, self.calls, self.current, self.skipped = skip_at, 0, 1024.0, False

    def is_enabled(self) -> bool:
        return True

    def scale(self, loss):
        return loss

    def unscale_(self, optimizer) -> None:
        pass

    def get_scale(self) -> float:
        return self.current

    def step(self, optimizer) -> None:
        self.calls += 1
        self.skipped = self.calls in self.skip_at
        if not self.skipped:
            optimizer.step()

    def update(self) -> None:
        if self.skipped:
            self.current /= 2

    def state_dict(self):
        return {"scale": self.current}

    def load_state_dict(self, state) -> None:
        self.current = state["scale"]


def test_a_step_the_scaler_skips_advances_neither_schedule_nor_ema_nor_the_global_step(tmp_path, monkeypatch):
    from monai_diffusion import engine

    out = tmp_path / "run"
    scaler = SkippingScaler(frozenset({2, 3}))
    monkeypatch.setattr(engine, "make_scalers", lambda stage, runtime: {"net": scaler})
    stage = Toy()
    state = run_loop(stage, _loader(), None, _cfg(out, 1, every_n_steps=1), Runtime(CPU, None))
    # four batches, two optimizer steps skipped: two steps taken, and the schedule moved twice
    assert scaler.calls == 4 and state.global_step == 2
    assert stage.after_steps == [1, 2] and stage.lr_scheduler.last_epoch == 2
    steps = sorted(int(p.stem.rsplit("_", 1)[1]) for p in out.glob("step_checkpoint_*.pt"))
    assert steps == [1, 2]  # no step checkpoint for a step that did not happen
    ckpt = load_checkpoint(out / "latest_checkpoint.pt")
    assert ckpt["global_step"] == 2 and ckpt["lr_scheduler"]["last_epoch"] == 2

    # the resumed run continues the same count: global step and schedule stay equal
    scaler = SkippingScaler()
    stage = Toy()
    state = run_loop(stage, _loader(), None, _cfg(out, 2, resume_from="latest"), Runtime(CPU, None))
    assert state.global_step == 6 and stage.after_steps == [3, 4, 5, 6] and stage.lr_scheduler.last_epoch == 6
