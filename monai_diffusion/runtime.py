"""Where and how a run executes: the device (one rule for training, sampling, evaluation and ``plan``), the autocast
precision, the DDP process group, seeding and the random states that exact resume saves.

A CPU run never calls into CUDA here: the device rule asks ``torch.cuda`` only when the settings allow a GPU, and the
random states include CUDA's only when the run's device is a GPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import IO, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .errors import RunError


# How long a process waits in a collective (a barrier, an all-reduce) for the others. NCCL's own default is 10
# minutes, shorter than what rank 0 alone may do while the others wait: build the dataset cache, encode the latent
# cache, draw stage 2's sample pictures, write a large checkpoint.
DDP_TIMEOUT_ENV = "MONAI_DIFFUSION_DDP_TIMEOUT_MINUTES"
DEFAULT_DDP_TIMEOUT_MINUTES = 60.0


@dataclass
class Runtime:
    """Where and how a run executes: device, precision, distributed rank."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None: full precision
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    log: IO[str] | None = None  # an open text file that receives what print() shows (the run's train.log), or None
    printed: list[str] = field(default_factory=list)  # lines printed before the log was opened

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def print(self, *args: Any) -> None:
        if self.is_main:
            line = " ".join(str(a) for a in args)
            tqdm.write(line, file=sys.stdout)
            if self.log is not None:
                self.log.write(line + "\n")
                self.log.flush()
            else:
                self.printed.append(line)


# ------------------------------------------------------------------------------------------- device, precision
def choose_device(use_cuda: bool, gpu_id: int, local_rank: int | None = None) -> torch.device:
    """The one device rule: CUDA when ``device.use_cuda`` allows it and PyTorch sees a GPU, else the CPU.

    The GPU is ``local_rank`` for a process of a multi-process run (one GPU per process), else ``device.gpu_id``.
    ``torch.cuda`` is not asked at all when ``use_cuda`` is false.
    """
    if not (use_cuda and torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", gpu_id if local_rank is None else local_rank)


def _cuda_has_native_bf16() -> bool:
    """The current CUDA device computes in bf16 natively (Ampere and newer: A100, H100, H200; ROCm), not emulated."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(mixed_precision: bool | str | None, device: torch.device) -> torch.dtype | None:
    """Map the ``device.mixed_precision`` setting to an autocast dtype (None = fp32).

    ``true`` lets the project choose: bf16 on a CPU and on a GPU that computes in bf16 natively (it needs no loss
    scaling and has fp32's range), fp16 with loss scaling on an older GPU. ``'bf16'`` and ``'fp16'`` are explicit and
    kept, except that fp16 needs CUDA: on another device it falls back to bf16 with a warning (CPU autocast in fp16
    is slow and gains nothing). On CUDA the answer is about the current device (``setup_runtime`` selects the run's
    device before asking).
    """
    if mixed_precision in (False, None, "false", "no", "fp32"):
        return None
    if mixed_precision is True:
        if device.type == "cuda" and not _cuda_has_native_bf16():
            return torch.float16
        return torch.bfloat16
    if mixed_precision == "bf16":
        return torch.bfloat16
    if mixed_precision == "fp16":
        if device.type != "cuda":
            warnings.warn("device.mixed_precision=fp16 needs CUDA; using bf16 autocast on this device instead.")
            return torch.bfloat16
        return torch.float16
    raise ValueError(f"device.mixed_precision must be true, false, 'fp16' or 'bf16', got {mixed_precision!r}.")


# ------------------------------------------------------------------------------------------------------- DDP
def ddp_timeout(minutes: float | None = None) -> timedelta:
    """How long a process waits for the others in a collective: ``minutes``, else the environment variable
    ``MONAI_DIFFUSION_DDP_TIMEOUT_MINUTES``, else 60 minutes.

    Raises:
        RunError: the value is not a positive number of minutes (naming where it came from).
    """
    source = "the timeout"
    if minutes is None:
        text = os.environ.get(DDP_TIMEOUT_ENV)
        if text is None or not text.strip():
            return timedelta(minutes=DEFAULT_DDP_TIMEOUT_MINUTES)
        source = f"environment variable {DDP_TIMEOUT_ENV}"
        try:
            minutes = float(text)
        except ValueError:
            raise RunError(f"{source} is {text!r}; expected a number of minutes, e.g. 120") from None
    if not (math.isfinite(minutes) and minutes > 0):
        raise RunError(f"{source} is {minutes!r}; expected a positive number of minutes, e.g. 120")
    return timedelta(minutes=minutes)


def setup_runtime(use_cuda: bool, gpu_id: int, mixed_precision: bool | str | None, *,
                  timeout_minutes: float | None = None) -> Runtime:
    """Pick the device and, under ``torchrun``, join the process group (NCCL on CUDA, gloo on CPU) with the
    collective timeout of :func:`ddp_timeout`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = ddp_timeout(timeout_minutes) if world_size > 1 else None  # a bad value fails before any work
    device = choose_device(use_cuda, gpu_id, local_rank if world_size > 1 else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return Runtime(device, resolve_precision(mixed_precision, device), rank, world_size, local_rank)


def teardown_runtime(runtime: Runtime) -> None:
    """Close the run's log and leave the process group (after a last barrier)."""
    if runtime.log is not None:
        runtime.log.close()
        runtime.log = None
    if runtime.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def rank0_first(runtime: Runtime) -> Iterator[None]:
    """Let rank 0 run the block first (e.g. writing the synthetic dataset or its cache), then the others."""
    if runtime.distributed and not runtime.is_main:
        dist.barrier()
    yield
    if runtime.distributed and runtime.is_main:
        dist.barrier()


def all_reduce_mean(value: float, runtime: Runtime) -> float:
    """The mean of ``value`` over the processes (``value`` itself without DDP)."""
    if not runtime.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=runtime.device)
    dist.all_reduce(t)
    return float(t.item()) / runtime.world_size


def any_rank(flag: bool, runtime: Runtime) -> bool:
    """True on every process when ``flag`` is true on at least one (one small all-reduce under DDP)."""
    if not runtime.distributed:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=runtime.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_over_ranks(value: int, runtime: Runtime) -> int:
    """The largest ``value`` of all processes, on every process."""
    if not runtime.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=runtime.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (the module itself when it is not wrapped)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------ seeds, RNG states
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (torch's CUDA seeding is deferred until CUDA is used)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The global random states of this process: Python, NumPy, torch CPU and, on a CUDA run, its own GPU's; as
    tensors and plain values only, so that a checkpoint holding them loads with ``weights_only=True``."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "key": torch.from_numpy(np.asarray(key, dtype=np.uint32).astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _python_state(saved: Any) -> Any:
    """Python's state tuple (``random.setstate`` wants tuples; a checkpoint may give lists back)."""
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)


def _numpy_state(saved: Any) -> Any:
    """NumPy's state tuple from :func:`rng_state`'s dict (or an older checkpoint's tuple, unchanged)."""
    if not isinstance(saved, dict):
        return saved
    key = np.asarray(saved["key"].numpy() if isinstance(saved["key"], torch.Tensor) else saved["key"], dtype=np.uint32)
    return (saved["kind"], key, saved["pos"], saved["has_gauss"], saved["cached_gaussian"])


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` saved. A CUDA state is restored only on a CUDA run; older checkpoints hold
    a list with one state per visible GPU, of which the run's own is taken, and NumPy's state as its own tuple."""
    random.setstate(_python_state(state["python"]))
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)
