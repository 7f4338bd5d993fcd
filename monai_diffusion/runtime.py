"""Where and how a run executes: the device (one rule for training, sampling, evaluation and ``plan``), the autocast
precision, the DDP process group, seeding and the random states that exact resume saves.

A CPU run never calls into CUDA here: the device rule asks ``torch.cuda`` only when the settings allow a GPU, and the
random states include CUDA's only when the run's device is a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
    channels_last: bool = False  # networks and their inputs in channels_last(_3d) memory format (device.channels_last)
    compile: bool = False  # the trained network's training-step forward through torch.compile (device.compile)

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

    def to_memory_format(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in channels_last(_3d) memory format when ``channels_last`` is on and ``x`` is a batch of 2D or 3D
        images (4 or 5 axes); otherwise ``x`` itself. The values are the same; only the order in memory changes."""
        if not self.channels_last or x.ndim not in (4, 5):
            return x
        return x.contiguous(memory_format=memory_format(x.ndim - 2))

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

    ``'auto'`` is :func:`auto_knob`'s choice for the device (bf16 on a CPU with avx512_bf16/AMX, else fp32).

    ``true`` lets the project choose: bf16 on a CPU and on a GPU that computes in bf16 natively (it needs no loss
    scaling and has fp32's range), fp16 with loss scaling on an older GPU. ``'bf16'`` and ``'fp16'`` are explicit and
    kept, except that fp16 needs CUDA: on another device it falls back to bf16 with a warning (CPU autocast in fp16
    is slow and gains nothing). On CUDA the answer is about the current device (``setup_runtime`` selects the run's
    device before asking).
    """
    if mixed_precision == "auto":
        mixed_precision = auto_knob("mixed_precision", device)[0]
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
    raise ValueError(f"device.mixed_precision must be true, false, 'fp16', 'bf16' or 'auto', got {mixed_precision!r}.")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where that file is missing, e.g. macOS, Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU computes bf16 natively: ``avx512_bf16`` or AMX (``amx_bf16``)."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


# ------------------------------------------------------------------------------------ execution knobs, auto
# What ``auto`` turns on, by machine, from benchmarks/knobs.py (results in benchmarks/results/knobs_cpu.md and
# docs/performance.md). Only what was measured to win is on; a machine that was not measured keeps the plain
# configuration (fp32, contiguous, eager), which is also what every knob did before it existed.
KNOB_KEYS = ("channels_last", "compile", "mixed_precision")


def auto_knob(name: str, device: torch.device, flags: frozenset[str] | None = None,
              stage: str = "autoencoder") -> tuple[Any, str]:
    """What ``device.<name>: auto`` means on ``device`` (a CPU with ``flags``, default this machine's) for ``stage``
    (``autoencoder``: stage 1's training; ``diffusion``: stage 2's, and sampling, where the UNet does the work):
    the value and the reason, one short phrase. ``name`` is ``channels_last``, ``compile`` or ``mixed_precision``."""
    if name not in KNOB_KEYS:
        raise ValueError(f"no auto rule for device.{name}; expected one of {KNOB_KEYS}")
    if stage not in ("autoencoder", "diffusion"):
        raise ValueError(f"stage must be 'autoencoder' or 'diffusion', got {stage!r}")
    if device.type != "cpu":
        return False, f"not measured on {device.type.upper()}, so off as before"
    flags = cpu_flags() if flags is None else flags
    bf16 = cpu_has_bf16(flags)
    if name == "channels_last":
        if not bf16:
            return False, "not measured on CPUs without avx512_bf16/AMX"
        if stage == "diffusion":
            return False, "the UNet's step measured no faster in it on this kind of CPU"
        return True, "the autoencoder's step measured faster in it on CPUs with avx512_bf16/AMX"
    if name == "compile":
        return False, "on the CPU its compile time outweighed the step-time gain"
    if bf16:
        return "bf16", "this CPU has avx512_bf16/AMX"
    return False, "this CPU has no avx512_bf16/AMX: bf16 autocast is emulated and slower"


def resolve_knob(name: str, value: Any, device: torch.device, stage: str = "autoencoder") -> tuple[Any, str | None]:
    """The setting ``device.<name>`` with ``auto`` replaced by :func:`auto_knob`'s value for ``stage``; the reason,
    or None when the value was not ``auto``."""
    if value != "auto":
        return value, None
    return auto_knob(name, device, stage=stage)


def memory_format(spatial_dims: int) -> torch.memory_format:
    """channels_last_3d for volumes, channels_last for 2D images."""
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def to_channels_last(module: nn.Module, spatial_dims: int) -> nn.Module:
    """Put the convolution weights of ``module`` (its parameters and buffers with ``spatial_dims + 2`` axes) in
    channels_last(_3d) memory format, in place; returns ``module``. The values are unchanged."""
    fmt, ndim = memory_format(spatial_dims), spatial_dims + 2
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.ndim == ndim:
                tensor.data = tensor.data.contiguous(memory_format=fmt)
    return module


def is_compile_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from torch.compile itself (no working C++ compiler, an operation it cannot lower), not
    from the network: every such error is a ``TorchDynamoException``."""
    import torch._dynamo.exc as dynamo_exc

    return isinstance(exc, dynamo_exc.TorchDynamoException)


class CompiledNetwork:
    """A network's forward through ``torch.compile`` for the training step, falling back to the network itself
    (eager) for the rest of the run when compiling fails.

    The network is not changed: its state_dict keys, checkpoints, validation, tiled encoding and sampling use the
    plain module; only calls through this object are compiled (on the first call, lazily; the backward on the first
    backward). ``module`` may be DDP-wrapped (PyTorch compiles DDP models as a whole).
    """

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        self.name = name
        self.compiled = torch.compile(module)
        self.eager = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return (self.module if self.eager else self.compiled)(*args, **kwargs)

    def fall_back(self, exc: BaseException, runtime: "Runtime") -> None:
        """Use the eager network from now on, with one warning line naming why."""
        self.eager = True
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        runtime.print(f"warning: device.compile: compiling the {self.name} failed ({type(exc).__name__}: "
                      f"{first[:200]}); it trains without torch.compile")


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
                  timeout_minutes: float | None = None, channels_last: bool | str = False,
                  compile: bool | str = False, stage: str = "autoencoder") -> Runtime:
    """Pick the device and, under ``torchrun``, join the process group (NCCL on CUDA, gloo on CPU) with the
    collective timeout of :func:`ddp_timeout`. ``mixed_precision``, ``channels_last`` and ``compile``
    (``device.*``; ``'auto'``: :func:`auto_knob` for ``stage``) become the runtime's precision and switches."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = ddp_timeout(timeout_minutes) if world_size > 1 else None  # a bad value fails before any work
    device = choose_device(use_cuda, gpu_id, local_rank if world_size > 1 else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    mixed_precision = resolve_knob("mixed_precision", mixed_precision, device, stage)[0]
    return Runtime(device, resolve_precision(mixed_precision, device), rank, world_size, local_rank,
                   channels_last=bool(resolve_knob("channels_last", channels_last, device, stage)[0]),
                   compile=bool(resolve_knob("compile", compile, device, stage)[0]))


def resolve_device_settings(settings: Any, runtime: Runtime, stage: str) -> tuple[Any, list[str]]:
    """``settings`` with every ``auto`` among ``device.channels_last``, ``device.compile`` and
    ``device.mixed_precision`` replaced by what it resolved to for ``stage`` on ``runtime``'s device, so that the
    stage's ``config.yaml`` records it (as ``batch_size: auto`` is recorded); and one line per resolved key, to
    print."""
    device = settings.device
    changes, lines = {}, []
    for name in KNOB_KEYS:
        value, reason = resolve_knob(name, getattr(device, name), runtime.device, stage)
        if reason is None:
            continue
        changes[name] = value
        shown = {True: "true", False: "false"}.get(value, value)
        lines.append(f"device.{name} auto: {shown} on this {runtime.device.type} ({reason})")
    if not changes:
        return settings, []
    return dataclasses.replace(settings, device=dataclasses.replace(device, **changes)), lines


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
