"""Out of memory is an answer, not a crash: a failed allocation during training becomes one error naming the stage,
the step, the peak so far and the checkpoint that is kept; the helpers that recognise and measure it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from monai_diffusion.checkpoints import load_checkpoint
from monai_diffusion.engine import LoopConfig, run_loop
from monai_diffusion.errors import USER_ERRORS, OutOfMemory, one_line
from monai_diffusion.memory import available_bytes, estimate_peak_bytes, is_out_of_memory
from monai_diffusion.runtime import Runtime

CPU = torch.device("cpu")


class Greedy:
    """Least squares that runs out of memory (as the CPU allocator reports it) in its ``fail_at``-th step."""

    name = "toy"

    def __init__(self, fail_at: int) -> None:
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)
        self.modules = {"net": self.net}
        self.optimizers = {"net": torch.optim.SGD(self.net.parameters(), lr=0.1)}
        self.calls, self.fail_at = 0, fail_at

    def training_step(self, batch, epoch):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 21474836480 bytes. Error code 12 (Cannot allocate memory)")
        x, y = batch
        loss = (self.net(x) - y).pow(2).mean()
        return {"net": loss}, {"mse": loss.item()}

    def validation_step(self, batch):
        return {"val_loss": 0.0}

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
    return DataLoader(TensorDataset(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)), batch_size=2)


def test_allocation_failure_is_one_line_and_keeps_the_checkpoint(tmp_path):
    cfg = LoopConfig(n_epochs=3, output_dir=tmp_path, log_dir=tmp_path / "logs", section="toy")
    with pytest.raises(OutOfMemory) as info:
        run_loop(Greedy(fail_at=6), _loader(), _loader(), cfg, Runtime(CPU, None))  # 4 steps an epoch: in epoch 2
    err = info.value
    assert isinstance(err, USER_ERRORS) and err.section == "toy"
    line = one_line(err)
    assert "toy training ran out of CPU memory in epoch 2 after optimizer step 5" in line
    assert "peak so far" in line and "can't allocate memory" in line
    assert f"{tmp_path / 'latest_checkpoint.pt'} is kept" in line and "resume_from=latest" in line
    assert load_checkpoint(tmp_path / "latest_checkpoint.pt")["global_step"] == 4  # as the first epoch left it
    assert "ran out of CPU memory" in (tmp_path / "train.log").read_text()


def test_other_errors_pass_through(tmp_path):
    class Broken(Greedy):
        def training_step(self, batch, epoch):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    cfg = LoopConfig(n_epochs=1, output_dir=tmp_path, log_dir=tmp_path / "logs", section="toy")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run_loop(Broken(fail_at=0), _loader(), _loader(), cfg, Runtime(CPU, None))


def test_is_out_of_memory():
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8"))
    if hasattr(torch, "OutOfMemoryError"):
        assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert not is_out_of_memory(RuntimeError("expected scalar type Float but found Half"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_estimate_of_a_known_step():
    """A step whose live tensors are known exactly: y = x @ w (kept for backward), its square, and the gradient."""
    w = nn.Parameter(torch.zeros(256, 256))
    opt = torch.optim.SGD([w], lr=0.1)
    batch = {}

    def step():
        if "x" not in batch:
            batch["x"] = torch.empty(1024, 256)
        y = batch["x"] @ w  # 1 MiB
        loss = (y * y).sum()  # y * y: 1 MiB
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    held = lambda: [w, w.grad, batch["x"]]  # noqa: E731
    peak = estimate_peak_bytes(step, held)
    mib = 2**20
    # held: w 0.25 MiB, its gradient 0.25 MiB, x 1 MiB; during the step at least y and y * y (1 MiB each) are alive
    assert 3.5 * mib <= peak <= 6 * mib, peak / mib
    # the real parameter was an input only: the fake optimizer step did not change it
    assert torch.count_nonzero(w) == 0


def test_cpu_convolution_scratch_follows_the_measured_onednn_copies():
    """A CPU convolution holds oneDNN's blocked copies while it runs: measured 776 MiB beyond a 512 MiB fp32 input
    (32 channels to 1 at 256x256x64, a 16 MiB output), and 1,064 MiB for a bf16 one-channel 512x512x128 patchify
    convolution (the input padded to 16 channels). The estimate counts max(blocked input copy, blocked output) +
    blocked output during every forward convolution; an fp32 input with fewer than 16 channels is read in place."""
    from monai_diffusion.memory import ONEDNN_CHANNEL_BLOCK, cpu_convolution_scratch

    mib = 2**20
    x, y = torch.empty(1, 32, 256, 256, 64), torch.empty(1, 1, 256, 256, 64)
    assert (cpu_convolution_scratch(x, y) + y.nbytes) / mib == 512 + 16 * ONEDNN_CHANNEL_BLOCK  # measured 776
    x = torch.empty(1, 1, 512, 512, 128, dtype=torch.bfloat16)
    y = torch.empty(1, 32, 128, 128, 32, dtype=torch.bfloat16)
    assert (cpu_convolution_scratch(x, y) + y.nbytes) / mib == 64 * ONEDNN_CHANNEL_BLOCK + 32  # measured 1,064
    assert (cpu_convolution_scratch(x.float(), y.float()) + y.float().nbytes) / mib == 2 * 64  # measured 136
    assert cpu_convolution_scratch(torch.empty(1, 32, 8, 8, 8), torch.empty(1, 32, 8, 8, 8)) > 0
    assert cpu_convolution_scratch(torch.empty(32, 8), torch.empty(32, 8)) == 0  # not a convolution's shapes


def test_estimate_counts_the_scratch_while_the_convolution_runs():
    conv = nn.Conv3d(32, 1, 3, padding=1)
    shape = (1, 32, 16, 16, 8)
    x_bytes = math.prod(shape) * 4
    y_bytes = x_bytes // 32
    from monai_diffusion.memory import ONEDNN_CHANNEL_BLOCK

    def no_grad_forward():
        with torch.no_grad():
            conv(torch.empty(shape))

    def forward():
        conv(torch.empty(shape))

    held = lambda: [*conv.parameters()]  # noqa: E731
    weights = sum(p.numel() * 4 for p in conv.parameters())
    # input and output live, plus, while the convolution runs, the input's copy and the output's padded copy
    expected = weights + x_bytes + y_bytes + (x_bytes + y_bytes * ONEDNN_CHANNEL_BLOCK - y_bytes)
    assert estimate_peak_bytes(no_grad_forward, held) == expected
    assert estimate_peak_bytes(forward, held) == expected


def test_available_bytes_cpu():
    free, source = available_bytes("cpu")
    assert free is None or free > 0
    assert isinstance(source, str) and source


def test_sampling_out_of_memory_is_one_line(monkeypatch, capsys, tmp_path):
    """Outside training (sampling, evaluate) a failed allocation is one line too, with what bounds the memory."""
    import monai_diffusion.generate as generate
    from monai_diffusion.cli import generate_samples_main

    from conftest import QUICKSTART, cli_args, error_line, tiny_overrides

    def greedy(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.15 GiB total capacity)")

    monkeypatch.setattr(generate, "generate_samples", greedy)
    line = error_line(capsys, generate_samples_main(cli_args(QUICKSTART, tiny_overrides(tmp_path))))
    assert "ran out of memory (CUDA out of memory. Tried to allocate 20.00 GiB" in line
    assert "sampling.batch_size=1" in line and "autoencoder.tile_size" in line
