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


def stage_modules(stage: Any) -> list[torch.nn.Module]:
    """The networks a stage holds: its trained ``modules`` and every other module attribute (a frozen autoencoder,
    a loss network), each once. MONAI's ``RFlowScheduler`` is an ``nn.Module`` that never runs
    ``nn.Module.__init__`` (it holds no tensors, and asking for its parameters raises): modules without that state
    are left out."""
    found = {id(m): m for m in stage.modules.values()}
    found.update({id(v): v for v in vars(stage).values() if isinstance(v, torch.nn.Module)})
    return [m for m in found.values() if "_parameters" in vars(m)]


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


# ------------------------------------------------------------------------------------------------ estimates
class _LiveStorages:
    """While fake-tensor work runs: the bytes of the tensor storages alive, and their peak.

    A storage is counted once, when an operation first returns a tensor on it (views share their base's storage),
    and uncounted when it is freed (a finaliser on the storage object, which PyTorch keeps alive exactly as long as
    the storage itself). An operation whose tensor arguments are all real (a batch's class labels, a parameter
    alone) runs for real, so that checks on small real inputs (labels in range) see their true values; every other
    operation, and every factory call, runs on fake tensors. ``.item()`` of a fake tensor answers 1 (``True`` for
    booleans): fake tensors hold no values, and the work only uses such reads for logging and finiteness checks.
    """

    def __init__(self) -> None:
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        from torch.utils.weak import WeakIdKeyDictionary

        owner = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
                if tensors and not any(isinstance(x, FakeTensor) for x in tensors):
                    with unset_fake_temporarily():
                        out = func(*args, **kwargs)
                elif func is torch.ops.aten._local_scalar_dense.default:
                    dtype = args[0].dtype
                    return True if dtype == torch.bool else (1.0 if dtype.is_floating_point else 1)
                else:
                    out = func(*args, **kwargs)
                if owner.counting:
                    for leaf in tree_leaves(out):
                        if isinstance(leaf, torch.Tensor):
                            owner.add(leaf)
                    if func is torch.ops.aten.convolution.default:
                        owner.transient(cpu_convolution_scratch(args[0], out))
                return out

        self.mode = Mode()
        self._seen = WeakIdKeyDictionary()
        self.live = 0
        self.peak = 0
        self.counting = False

    def add(self, tensor: torch.Tensor) -> None:
        import weakref

        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def transient(self, size: int) -> None:
        """Memory an operation holds only while it runs (on top of what is live after it)."""
        self.peak = max(self.peak, self.live + size)

    def _free(self, size: int) -> None:
        self.live -= size


# oneDNN, which runs PyTorch's CPU convolutions, works in channel blocks of up to 16
ONEDNN_CHANNEL_BLOCK = 16


def cpu_convolution_scratch(x: torch.Tensor, y: torch.Tensor) -> int:
    """The bytes a CPU convolution from ``x`` to ``y`` holds while it runs, beyond its output: oneDNN copies the
    input and the output into channel-blocked layouts (channels padded to :data:`ONEDNN_CHANNEL_BLOCK`) and converts
    the result back; an fp32 input with fewer than 16 channels is read in place. Measured with PyTorch 2.13 on the
    CPU (3D; 1 to 64 channels; kernel 3 stride 1, kernel 4 stride 2 and 4; fp32 and bf16; 256x256x64 and
    512x512x128; no autograd): the resident memory rose by ``max(blocked input copy, blocked y) + blocked y``
    beyond the input to within 16 MiB, e.g. 776 MiB for 32 channels to 1 in fp32 (a 16 MiB output), and 1,064 MiB
    for the bf16 patchify convolution of a one-channel 512x512x128 volume (a 32 MiB output: the 64 MiB input padded
    to 16 channels). The one overstatement: small bf16 inputs with few channels, which oneDNN sometimes reads in
    place (16 MiB against 132 MiB counted for the same convolution at 256x256x64). 0 off the CPU (cuDNN's
    workspaces are in the CUDA margin).

    Counted for every forward convolution, with or without autograd: it is what made the seed's remote config (a
    bf16 patchify input layer at 512x512x128) peak at 1.5x its estimate, and with it that step's estimate equals the
    measured peak. The backward pass holds similar copies (measured: about twice the blocked input and output
    gradient), but counting them put the estimates of other configs' training steps 15-18 % above their measured
    peaks; what remains is in the CPU margin (:data:`MARGIN`)."""
    if y.device.type != "cpu" or x.dim() < 3:
        return 0

    def blocked(t: torch.Tensor) -> int:
        channels = t.shape[1]
        padded = -(-channels // ONEDNN_CHANNEL_BLOCK) * ONEDNN_CHANNEL_BLOCK
        return t.numel() // max(channels, 1) * padded * t.element_size()

    out_blocked = blocked(y)
    in_copy = blocked(x) if x.shape[1] >= ONEDNN_CHANNEL_BLOCK or x.element_size() < 4 else 0
    return max(in_copy, out_blocked) + out_blocked - y.numel() * y.element_size()


def estimate_peak_bytes(step: Any, held: Any) -> int:
    """Estimate the peak memory of one call of ``step()`` without allocating it: both calls below run on fake tensors
    (PyTorch's ``FakeTensorMode``: shapes, dtypes and devices, no data), so a step that needs 60 GiB is estimated in
    seconds on any machine.

    ``step()`` is called twice: a warm-up that creates what persists between steps (gradients, optimizer states),
    then the counted call. Before the counted call, ``held()`` must return every tensor that exists between steps
    (parameters, buffers, gradients, optimizer states, the batch); they count from the start, and a freed one (a
    gradient set to None) stops counting. Tensors created before the fake mode (real weights) are used as inputs;
    large inputs (a batch of volumes) must be created inside ``step`` with a factory (``torch.empty(shape)``), which
    makes them fake, or an operation on them and real weights alone would run for real.

    Returns the peak bytes of live tensors during the counted call: what ``torch.cuda.max_memory_allocated`` would
    report for it, before any allocator slack, workspace or library overhead (the caller adds its margin).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    live = _LiveStorages()
    with FakeTensorMode(allow_non_fake_inputs=True), live.mode:
        step()
        for tensor in held():
            live.add(tensor)
        live.peak = live.live
        live.counting = True
        try:
            step()
        finally:
            live.counting = False
    return live.peak


# what an estimate of live tensors leaves out, by device type: (factor, MiB added): on the CPU allocator slack and
# oneDNN's copies in the backward pass (the configs' measured training steps were 0.98-1.25x the estimate,
# docs/memory_check.md), on CUDA the caching allocator's fragmentation and cuDNN workspaces
MARGIN = {"cpu": (1.20, 256.0), "cuda": (1.15, 512.0)}


def with_margin(peak_mib: float, device: torch.device | str) -> float:
    """``peak_mib`` of live tensors plus :data:`MARGIN` for ``device``'s type: what to compare with the memory
    available."""
    factor, extra = MARGIN["cuda" if torch.device(device).type == "cuda" else "cpu"]
    return peak_mib * factor + extra


def _cgroup_free_bytes() -> int | None:
    """The memory this process's cgroup may still use (limit minus usage), or None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                raw = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if raw == "max" or not raw.isdigit() or int(raw) >= 2**60:
            return None
        return max(0, int(raw) - usage)
    return None


def available_bytes(device: torch.device | str) -> tuple[int | None, str]:
    """How much memory new work on ``device`` can still get, and where that figure comes from.

    CUDA: the free device memory (``torch.cuda.mem_get_info``). CPU: Linux's ``MemAvailable`` from ``/proc/meminfo``,
    lowered to what the cgroup's limit leaves when there is one (containers, CI, job schedulers). ``(None, why)`` where
    neither can be read.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {torch.cuda.get_device_name(device)}"
    found: list[tuple[int, str]] = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) * 1024, "MemAvailable"))
                    break
    except (OSError, ValueError, IndexError):
        pass
    cgroup = _cgroup_free_bytes()
    if cgroup is not None:
        found.append((cgroup, "the cgroup's memory limit minus its usage"))
    if not found:
        return None, "no /proc/meminfo or cgroup limit to read"
    return min(found)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed allocation: CUDA's out-of-memory error, Python's ``MemoryError``, or the CPU
    allocator's ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory")."""
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None), MemoryError) if t is not None)
    if isinstance(exc, oom_types):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def process_peak_mib(device: torch.device | str) -> float:
    """The peak memory of this process so far: CUDA's ``max_memory_allocated`` on a CUDA device, else the peak
    resident memory (``VmHWM``, or ``ru_maxrss``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return (_status_kib("VmHWM") or _maxrss_kib()) / 1024
