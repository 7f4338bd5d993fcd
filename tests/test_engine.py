"""The shared training loop on a toy stage: accumulation scaling, clipping, precision resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from monai_diffusion.engine import LoopConfig, run_loop
from monai_diffusion.runtime import Runtime, resolve_precision


class ToyStage:
    """Least squares on fixed data: the loss of a batch is the mean over its items."""

    name = "toy"

    def __init__(self, lr: float = 0.1) -> None:
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)
        self.modules = {"net": self.net}
        self.optimizers = {"net": torch.optim.SGD(self.net.parameters(), lr=lr)}

    def training_step(self, batch, epoch):
        x, y = batch
        loss = (self.net(x) - y).pow(2).mean()
        return {"net": loss}, {"mse": loss.item()}

    def validation_step(self, batch):
        x, y = batch
        return {"val_loss": (self.net(x) - y).pow(2).mean().item()}

    def visualize(self, batch):
        return {}

    def describe(self, batch):
        return []

    def checkpoint_extra(self):
        return {}

    def load_extra(self, ckpt):
        pass


def _data(n: int = 6) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g))


def _run(tmp_path: Path, batch_size: int, accum: int, n: int = 6, clip: float | None = None) -> ToyStage:
    stage = ToyStage()
    loader = DataLoader(_data(n), batch_size=batch_size, shuffle=False)
    cfg = LoopConfig(
        n_epochs=1,
        output_dir=tmp_path / f"b{batch_size}a{accum}",
        log_dir=tmp_path / "logs",
        gradient_accumulation_steps=accum,
        grad_clip_norm=clip,
    )
    run_loop(stage, loader, None, cfg, Runtime(torch.device("cpu"), None))
    return stage


def _manual(batches: list[int], n: int = 6, clip: float | None = None) -> nn.Linear:
    """Plain SGD where each optimizer step sees the mean loss over the items of its group."""
    x, y = _data(n).tensors
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    start = 0
    for size in batches:
        loss = (net(x[start : start + size]) - y[start : start + size]).pow(2).mean()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        opt.zero_grad()
        start += size
    return net


@pytest.mark.parametrize("batch_size, accum", [(1, 6), (2, 3), (3, 2), (6, 1)])
def test_accumulation_equals_one_large_batch(tmp_path, batch_size, accum):
    stage = _run(tmp_path, batch_size, accum)
    reference = _manual([6])
    torch.testing.assert_close(stage.net.weight, reference.weight)
    torch.testing.assert_close(stage.net.bias, reference.bias)


def test_last_incomplete_group_is_averaged_over_its_own_size(tmp_path):
    # 5 items, batch 1, accumulation 2: groups of 2, 2 and 1 items -> three steps on the group means
    stage = _run(tmp_path, batch_size=1, accum=2, n=5)
    reference = _manual([2, 2, 1], n=5)
    torch.testing.assert_close(stage.net.weight, reference.weight)


def test_gradient_clipping(tmp_path):
    stage = _run(tmp_path, batch_size=6, accum=1, clip=0.01)
    reference = _manual([6], clip=0.01)
    torch.testing.assert_close(stage.net.weight, reference.weight)
    unclipped = _manual([6])
    assert not torch.allclose(reference.weight, unclipped.weight)


def test_precision_resolution(monkeypatch):
    # a GPU without native bf16 (true means bf16 where the GPU has it: tests/test_runtime.py)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kwargs: False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision(False, cpu) is None
    assert resolve_precision(True, cpu) is torch.bfloat16
    assert resolve_precision(True, cuda) is torch.float16
    assert resolve_precision("bf16", cuda) is torch.bfloat16
    with pytest.warns(UserWarning, match="fp16 needs CUDA"):
        assert resolve_precision("fp16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="mixed_precision"):
        resolve_precision("fp8", cpu)


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    stage = ToyStage(lr=1e30)
    loader = DataLoader(_data(), batch_size=1, shuffle=False)
    cfg = LoopConfig(n_epochs=1, output_dir=tmp_path / "nan", log_dir=tmp_path / "logs")
    with pytest.raises(RuntimeError, match="loss 'net' became"):
        run_loop(stage, loader, None, cfg, Runtime(torch.device("cpu"), None))
