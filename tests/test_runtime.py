"""runtime.py: the device rule, precision resolution, the DDP timeout, and CPU runs that never call into CUDA."""

from __future__ import annotations

import inspect
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from monai_diffusion.checkpoints import load_checkpoint, step_checkpoint_path
from monai_diffusion.engine import LoopConfig, run_loop
from monai_diffusion.runtime import choose_device, rng_state, set_rng_state, setup_runtime, teardown_runtime

# torch.manual_seed itself calls these: they only queue the seed until CUDA is first used (asking is_initialized),
# and never start it
_LAZY_SEEDING = {"manual_seed", "manual_seed_all", "seed", "seed_all", "is_initialized"}


@pytest.fixture
def cuda_forbidden(monkeypatch):
    """Every public function of ``torch.cuda`` (but the lazy seeding) raises when this project's code calls it. PyTorch's
    own calls go through (PyTorch 2.11's Adam asks ``torch.cuda.is_available()`` in every step, whatever the device)."""
    called: list[str] = []

    def forbid(name, original):
        def raiser(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.split(".")[0] not in ("monai_diffusion", "generative", "test_runtime"):
                return original(*args, **kwargs)
            called.append(name)
            raise AssertionError(f"a CPU run called torch.cuda.{name} (from {caller})")
        return raiser

    for name, obj in list(vars(torch.cuda).items()):
        if inspect.isfunction(obj) and not name.startswith("_") and name not in _LAZY_SEEDING:
            monkeypatch.setattr(torch.cuda, name, forbid(name, obj))
    return called


class Toy:
    """Least squares with input noise from the global RNG (resuming must restore the random states)."""

    name = "toy"

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)
        self.modules = {"net": self.net}
        self.optimizers = {"net": torch.optim.Adam(self.net.parameters(), lr=0.05)}

    def training_step(self, batch, epoch):
        x, y = batch
        loss = (self.net(x + 0.1 * torch.randn_like(x)) - y).float().pow(2).mean()
        return {"net": loss}, {"mse": loss.item()}

    def validation_step(self, batch):
        x, y = batch
        return {"val_loss": (self.net(x) - y).float().pow(2).mean().item()}

    def visualize(self, batch, quick=False):
        return {"picture": torch.zeros(1, 4, 4)}

    def describe(self, batch):
        return ["toy"]

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


def test_a_cpu_run_never_calls_into_cuda(tmp_path, cuda_forbidden):
    # use_cuda: true as in the default settings; the machine may have a GPU, the run is told to use the CPU
    runtime = setup_runtime(False, 0, True)
    assert runtime.device == torch.device("cpu") and runtime.amp_dtype is torch.bfloat16
    out = tmp_path / "run"
    try:
        # a whole run with step checkpoints (they save the random states), validation and pictures
        run_loop(Toy(), _loader(), _loader(), LoopConfig(n_epochs=1, output_dir=out, log_dir=out / "logs",
                                                         every_n_steps=1), runtime)
        assert load_checkpoint(step_checkpoint_path(out, 2))["position"]["ranks"][0]["rng"]["cuda"] is None
        # resumed inside the epoch (restores the random states)
        state = run_loop(Toy(), _loader(), _loader(),
                         LoopConfig(n_epochs=2, output_dir=out, log_dir=out / "logs",
                                    resume_from=step_checkpoint_path(out, 2)), runtime)
        assert state.global_step == 8  # the rest of epoch 1 (2 steps) and epoch 2 (4)
        # fast_dev_run (measures memory with the CPU meter)
        run_loop(Toy(), _loader(), _loader(), LoopConfig(n_epochs=1, output_dir=tmp_path / "dev", log_dir=tmp_path,
                                                         fast_dev_run=True), runtime)
    finally:
        teardown_runtime(runtime)
    assert cuda_forbidden == []


def test_the_device_rule_asks_cuda_only_when_allowed(cuda_forbidden, monkeypatch):
    assert choose_device(False, 3) == torch.device("cpu")
    assert cuda_forbidden == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device(True, 0) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device(True, 1) == torch.device("cuda", 1)
    assert choose_device(True, 1, local_rank=3) == torch.device("cuda", 3)  # one GPU per process under torchrun


def test_random_states_of_a_cpu_run_round_trip(cuda_forbidden):
    state = rng_state(torch.device("cpu"))
    assert state["cuda"] is None
    first = torch.rand(3)
    set_rng_state(state, torch.device("cpu"))
    torch.testing.assert_close(torch.rand(3), first)
    # a checkpoint written on a GPU (older ones hold a list of per-GPU states) resumes on a CPU without CUDA
    set_rng_state({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)]}, torch.device("cpu"))
    assert cuda_forbidden == []


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_mixed_precision_true_on_cuda_prefers_bf16_where_the_gpu_has_it(monkeypatch, native_bf16, expected):
    from monai_diffusion.runtime import resolve_precision

    asked: list[dict] = []

    def is_bf16_supported(**kwargs):
        asked.append(kwargs)
        return native_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    cuda = torch.device("cuda", 0)
    assert resolve_precision(True, cuda) is expected
    assert asked == [{"including_emulation": False}]  # emulated bf16 (pre-Ampere GPUs) is slow: fp16 there
    # explicit choices are kept whatever the GPU supports
    assert resolve_precision("fp16", cuda) is torch.float16
    assert resolve_precision("bf16", cuda) is torch.bfloat16
    assert resolve_precision(False, cuda) is None
    assert resolve_precision(True, torch.device("cpu")) is torch.bfloat16


def test_ddp_timeout_is_an_hour_unless_set(monkeypatch):
    from datetime import timedelta

    from monai_diffusion.errors import RunError
    from monai_diffusion.runtime import DDP_TIMEOUT_ENV, ddp_timeout

    monkeypatch.delenv(DDP_TIMEOUT_ENV, raising=False)
    assert ddp_timeout() == timedelta(minutes=60)  # NCCL's own default, 10 minutes, is too short
    monkeypatch.setenv(DDP_TIMEOUT_ENV, "150")
    assert ddp_timeout() == timedelta(minutes=150)
    assert ddp_timeout(5) == timedelta(minutes=5)
    for bad in ("soon", "0", "-3", "inf"):
        monkeypatch.setenv(DDP_TIMEOUT_ENV, bad)
        with pytest.raises(RunError, match=f"environment variable {DDP_TIMEOUT_ENV} is .*; expected a"):
            ddp_timeout()


def test_the_process_group_gets_the_timeout(monkeypatch):
    from datetime import timedelta

    import torch.distributed as dist

    from monai_diffusion.errors import RunError
    from monai_diffusion.runtime import DDP_TIMEOUT_ENV

    joined: list[dict] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: joined.append(kwargs))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(DDP_TIMEOUT_ENV, "90")
    runtime = setup_runtime(False, 0, False)
    assert joined == [{"backend": "gloo", "timeout": timedelta(minutes=90)}]
    assert runtime.rank == 1 and runtime.world_size == 2
    monkeypatch.setenv(DDP_TIMEOUT_ENV, "ten")
    with pytest.raises(RunError, match=DDP_TIMEOUT_ENV):
        setup_runtime(False, 0, False)
    assert len(joined) == 1  # refused before joining
