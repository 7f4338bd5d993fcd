"""The one way peak memory is measured: by the training loop's ``fast_dev_run``, by ``plan`` and by the benchmarks.

Method:

* **CUDA**: ``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats``: every tensor the step
  holds at its worst moment (weights, optimizer states, activations, gradients), without the CUDA context and the
  caching allocator's unused slack (``max_memory_reserved`` is reported beside it).
* **CPU**: the process's peak resident memory during the measured work above its resident memory just before it,
  plus the bytes of the tensors that exist before the work starts (models, optimizer states, inputs), so that the
  figure compares with a memory budget and with the CUDA figure. The peak is Linux's ``VmHWM``, reset through
  ``/proc/self/clear_refs`` right before the work: ``getrusage().ru_maxrss`` cannot be reset and, in a child
  process, starts at the parent's peak, so it would report nothing for a worker started from a large process.
  Where ``/proc`` is missing (not Linux), the growth of ``ru_maxrss`` is used, a lower bound, and the method string
  says so.

Freed memory may stay in glibc's heap and count towards later peaks; measuring in a fresh process, with
``MALLOC_MMAP_THRESHOLD_=131072`` in its environment (:data:`CLEAN_MALLOC_ENV`), makes CPU peaks repeatable to about
1 %. ``plan`` and the benchmarks do that; ``fast_dev_run`` measures inside the training process and calls
:func:`use_clean_malloc` before its first step, which sets the same for the rest of that process (without it, a
32^3 quickstart step measured 284 MiB in the training process against 84 MiB in a clean one). It cannot undo what
earlier work in the same process left in the heap: stage 2's fast_dev_run run in the process that had just trained
stage 1 measured 36 MiB against 31 MiB in its own process.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import sys
from collections.abc import Iterable
from typing import Any

import torch

MIB = 2**20

# glibc: serve every allocation above 128 KiB with its own mmap, returned to the system when freed
CLEAN_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def use_clean_malloc() -> bool:
    """From now on in this process, what :data:`CLEAN_MALLOC_ENV` does for a new one: glibc serves every allocation
    above 128 KiB with its own mmap (no dynamic threshold), so freed memory leaves the resident set at once. Returns
    False where glibc's ``mallopt`` is not available (the CPU figure then includes heap slack)."""
    m_mmap_threshold = -3  # glibc's mallopt parameter number
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, int(CLEAN_MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"])))
    except (OSError, AttributeError):
        return False


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _maxrss_kib() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r


def tensor_bytes(modules: Iterable[Any] = (), optimizers: Iterable[Any] = (), tensors: Iterable[Any] = ()) -> int:
    """Bytes of the parameters and buffers of ``modules``, the tensor states of ``optimizers``, and ``tensors``
    (each tensor counted once, also when shared)."""
    everything: list[torch.Tensor] = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    everything += [v for opt in optimizers for state in opt.state.values() for v in state.values()
                   if isinstance(v, torch.Tensor)]
    everything += [t for t in tensors if isinstance(t, torch.Tensor)]
    seen: set[int] = set()
    total = 0
    for t in everything:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class PeakMeter:
    """Peak memory of a piece of work on one device (see the module docstring for the method).

    Use::

        meter = PeakMeter(device)
        meter.start(static_bytes=tensor_bytes(models, optimizers, inputs))
        work()
        peak = meter.peak_mib()   # static + the rise during work (CPU) or max allocated (CUDA)

    Args:
        device: where the work runs; ``cuda`` devices use the CUDA allocator's statistics, anything else the
            process's resident memory.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._resettable = False if self.cuda else _reset_hwm()
        self._baseline_kib = 0
        self.static_mib = 0.0
        self.reserved_mib = 0.0

    @property
    def method(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated (tensors only; the CUDA context comes on top)"
        if self._resettable:
            return "CPU: peak RSS (VmHWM, reset before the work) above the RSS before it, plus the tensors held then"
        return "CPU: growth of getrusage ru_maxrss during the work (VmHWM not resettable here: a lower bound)"

    def start(self, static_bytes: int = 0) -> None:
        """Begin a measurement; ``static_bytes`` are the tensors that exist before the work (CPU figure only)."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.static_mib = static_bytes / MIB
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        if self._resettable:
            _reset_hwm()
            self._baseline_kib = _status_kib("VmRSS") or 0
        else:
            self._baseline_kib = _maxrss_kib()

    def rise_mib(self) -> float:
        """CPU: how far the resident memory rose above its level at :meth:`start`."""
        peak = (_status_kib("VmHWM") or 0) if self._resettable else _maxrss_kib()
        return max(0, peak - self._baseline_kib) / 1024

    def peak_mib(self) -> float:
        """The peak since :meth:`start`, in MiB."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.reserved_mib = max(self.reserved_mib, torch.cuda.max_memory_reserved(self.device) / MIB)
            return torch.cuda.max_memory_allocated(self.device) / MIB
        return self.static_mib + self.rise_mib()

    @staticmethod
    def rss_mib() -> float:
        """The process's resident memory now (CPU)."""
        return (_status_kib("VmRSS") or _maxrss_kib()) / 1024
