"""The one training loop shared by both stages.

A stage (``monai_diffusion.stages``) says what to compute per batch; this module does everything else the same way
for both: device and precision, DDP, gradient accumulation and clipping, exact resume (from epoch-end or step
checkpoints, or the newest one with ``resume_from: latest``), atomic checkpoints that never overwrite another run,
stopping cleanly on SIGTERM/SIGINT, non-finite losses decided alike on every process, TensorBoard,
``fast_dev_run``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import math
import os
import random
import re
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .errors import NonFiniteLoss, RunError
from .fileio import atomic_write, atomic_write_text
from .memory import PeakMeter, tensor_bytes, use_clean_malloc

CHECKPOINT_FORMAT = "monai-diffusion-checkpoint"
CHECKPOINT_VERSION = 2  # 2: model_args hold the architecture only (no execution knobs)




class BatchSkipped(Exception):
    """``on_nonfinite: skip``: this batch's loss was not finite somewhere; its step's gradients were dropped."""


# ------------------------------------------------------------------------------------------------ environment
@dataclass
class Runtime:
    """Where and how a run executes: device, precision, distributed rank."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None: full precision
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    log: Any = None  # an open text file that receives what print() shows (the run's train.log), or None
    printed: list[str] = field(default_factory=list)  # lines printed before the log was opened

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
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


def resolve_precision(mixed_precision: bool | str, device: torch.device) -> torch.dtype | None:
    """Map the ``device.mixed_precision`` setting to an autocast dtype (None = fp32).

    ``true`` means fp16 on CUDA and bf16 elsewhere; fp16 is only used on CUDA (on CPU it falls back to bf16 with a
    warning, since CPU autocast in fp16 is slow and needs no loss scaling anyway).
    """
    if mixed_precision in (False, None, "false", "no", "fp32"):
        return None
    if mixed_precision is True:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if mixed_precision == "bf16":
        return torch.bfloat16
    if mixed_precision == "fp16":
        if device.type != "cuda":
            warnings.warn("device.mixed_precision=fp16 needs CUDA; using bf16 autocast on this device instead.")
            return torch.bfloat16
        return torch.float16
    raise ValueError(f"device.mixed_precision must be true, false, 'fp16' or 'bf16', got {mixed_precision!r}.")


def setup_runtime(use_cuda: bool, gpu_id: int, mixed_precision: bool | str) -> Runtime:
    """Pick the device and, under ``torchrun``, join the process group (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = use_cuda and torch.cuda.is_available()
    if cuda:
        index = local_rank if world_size > 1 else gpu_id
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Runtime(device, resolve_precision(mixed_precision, device), rank, world_size, local_rank)


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.log is not None:
        runtime.log.close()
        runtime.log = None
    if runtime.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def all_reduce_mean(value: float, runtime: Runtime) -> float:
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


def stage_tensor_bytes(stage: Any, batch: Any = None) -> int:
    """Bytes of everything a stage holds before a step: its networks (trained and frozen), optimizer states and
    the batch's tensors."""
    modules = {id(m): m for m in stage.modules.values()}
    modules.update({id(v): v for v in vars(stage).values() if isinstance(v, nn.Module)})
    tensors = list(batch.values()) if isinstance(batch, dict) else [batch]
    return tensor_bytes(modules.values(), stage.optimizers.values(), tensors)


# ------------------------------------------------------------------------------------------------ checkpoints
def atomic_save(obj: Any, path: str | Path) -> None:
    """Write ``obj`` with ``torch.save`` so that ``path`` is either the old file or the complete new one."""
    atomic_write(path, lambda f: torch.save(obj, f))


# what each stage's checkpoint must hold; anything less is an older or foreign format
_REQUIRED_KEYS = {
    "autoencoder": ("state_dict", "model_args", "epoch", "global_step", "optimizers"),
    "diffusion": ("state_dict", "model_args", "epoch", "global_step", "optimizers", "scheduler_args",
                  "scale_factor", "latent_shape", "autoencoder", "lr_scheduler"),
}


def load_checkpoint(path: str | Path, expected_stage: str | None = None) -> dict[str, Any]:
    """Open a checkpoint written by this project; every problem is a one-line :class:`RunError` naming the path.

    Checks the format marker, the format version (1, whose model arguments still held the execution knobs, and the
    current one are read), the stage, and that the keys the stage needs are there.
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RunError(f"cannot read checkpoint {path} (truncated or not a PyTorch file?): {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RunError(
            f"{path} is not a monai-diffusion checkpoint (no '{CHECKPOINT_FORMAT}' marker); expected a "
            "latest_checkpoint.pt or best_model.pt written by this project."
        )
    version = ckpt.get("version")
    if not isinstance(version, int) or not 1 <= version <= CHECKPOINT_VERSION:
        raise RunError(f"{path} has checkpoint format version {version!r}; this monai-diffusion reads versions 1 to "
                       f"{CHECKPOINT_VERSION} (a newer version wrote it? upgrade monai-diffusion)")
    stage = ckpt.get("stage")
    if expected_stage is not None and stage != expected_stage:
        raise RunError(f"{path} is a '{stage}' checkpoint, expected a '{expected_stage}' checkpoint.")
    missing = [k for k in _REQUIRED_KEYS.get(stage, ()) if k not in ckpt]
    if missing:
        raise RunError(f"{path} is a '{stage}' checkpoint of an older or incomplete format: it lacks "
                       f"{', '.join(repr(k) for k in missing)}")
    return ckpt


# step checkpoints: step_checkpoint_<global step, 8 digits>.pt beside latest_checkpoint.pt and best_model.pt
STEP_CHECKPOINT = re.compile(r"^step_checkpoint_(\d+)\.pt$")
_OWN_TMP = re.compile(r"^\.(latest_checkpoint|best_model|step_checkpoint_\d+)\.pt\.tmp-(\d+)$")


def step_checkpoint_path(output_dir: Path, global_step: int) -> Path:
    """Where the step checkpoint of optimizer step ``global_step`` goes."""
    return Path(output_dir) / f"step_checkpoint_{global_step:08d}.pt"


def step_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """The step checkpoints in ``output_dir`` as (step, path), oldest first (by the step in the name)."""
    if not Path(output_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(output_dir).iterdir() if (m := STEP_CHECKPOINT.match(p.name))]
    return sorted(found)


def write_checkpoint(ckpt: dict[str, Any], path: Path) -> None:
    """:func:`atomic_save` whose failure (full disk, quota, permissions) is a one-line :class:`RunError`; the
    previous file at ``path`` is left as it was and the partial file is removed."""
    try:
        atomic_save(ckpt, path)
    except OSError as exc:
        code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
        why = exc.strerror or str(exc) or type(exc).__name__
        previous = f"the previous {path.name} is intact" if path.exists() else "the earlier checkpoints are intact"
        raise RunError(f"cannot write checkpoint {path}: {why}{f' ({code})' if code else ''}; {previous} and the "
                       "partial file was removed. Free some space (or fix the folder's permissions) and resume "
                       "with resume_from=latest") from None


def prune_step_checkpoints(output_dir: Path, keep_last: int | None) -> list[Path]:
    """Delete all but the newest ``keep_last`` step checkpoints (nothing else, ever). Returns what was deleted."""
    if keep_last is None:
        return []
    old = [path for _, path in step_checkpoints(output_dir)[:-keep_last]]
    for path in old:
        path.unlink(missing_ok=True)
    return old


def _remove_stale_temporaries(output_dir: Path, runtime: Runtime) -> None:
    """Remove half-written checkpoint files (``.<name>.pt.tmp-<pid>``) left by a killed process of this machine."""
    if not runtime.is_main or not Path(output_dir).is_dir():
        return
    for path in Path(output_dir).iterdir():
        m = _OWN_TMP.match(path.name)
        if m is None or int(m.group(2)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(2)), 0)
            continue  # its writer is still alive
        except ProcessLookupError:
            pass
        except OSError:
            continue
        path.unlink(missing_ok=True)
        runtime.print(f"removed {path.name}: a checkpoint that a killed run had not finished writing")


def find_latest_checkpoint(output_dir: Path, expected_stage: str | None,
                           say: Callable[[str], None] = print) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint of a run folder, by global step: ``latest_checkpoint.pt``, ``best_model.pt``
    and ``step_checkpoint_*.pt``. At equal steps an epoch-end checkpoint wins over a step checkpoint (it has the
    validation done). A file that cannot be read (truncated, corrupt, another stage) is skipped with a message.

    Returns:
        The path (None when there is none) and the names of the files skipped, with why.
    """
    output_dir = Path(output_dir)
    best: tuple[tuple[int, int, int], Path] | None = None
    skipped: list[str] = []

    def consider(path: Path, preference: int) -> bool:
        nonlocal best
        try:
            ckpt = load_checkpoint(path, expected_stage)
        except RunError as exc:
            skipped.append(f"{path.name} ({exc})")
            say(f"resume_from=latest: skipping {path}: {exc}")
            return False
        key = (int(ckpt["global_step"]), preference, int(ckpt["epoch"]))
        if best is None or key > best[0]:
            best = (key, path)
        return True

    for preference, name in ((2, "latest_checkpoint.pt"), (1, "best_model.pt")):
        if (output_dir / name).is_file():
            consider(output_dir / name, preference)
    for step, path in reversed(step_checkpoints(output_dir)):
        if best is not None and step < best[0][0]:
            break  # older than what was found already
        if consider(path, 0):
            break  # the newest readable step checkpoint; the rest are older
    return (best[1] if best else None), skipped


def resolve_resume(cfg: "LoopConfig", runtime: Runtime, expected_stage: str | None) -> "LoopConfig":
    """``resume_from: latest`` -> the newest complete checkpoint in ``cfg.output_dir`` (or None with
    ``start_fresh_if_none`` when there is none); any other value is returned unchanged. Under DDP rank 0 chooses
    and tells the others, so that every process resumes the same file.

    Raises:
        RunError: there is no readable checkpoint (naming the folder and every file skipped), unless
            ``start_fresh_if_none`` and the folder holds no checkpoint at all.
    """
    if cfg.resume_from != "latest":
        return cfg
    choice: list[Any] = [None, ""]  # the path (as text) or None, and an error message
    if runtime.is_main:  # rank 0 chooses, so that every process resumes the same file
        try:
            path = _choose_latest(cfg, runtime, expected_stage)
            choice = [None if path is None else str(path), ""]
        except RunError as exc:
            choice = [None, str(exc)]
    if runtime.distributed:
        dist.broadcast_object_list(choice, src=0)
    if choice[1]:
        raise RunError(choice[1])
    return dataclasses.replace(cfg, resume_from=None if choice[0] is None else Path(choice[0]))


def _choose_latest(cfg: "LoopConfig", runtime: Runtime, expected_stage: str | None) -> Path | None:
    key = f"{cfg.section}.checkpoints.resume_from"
    path, skipped = find_latest_checkpoint(cfg.output_dir, expected_stage, runtime.print)
    if path is not None:
        _remove_stale_temporaries(cfg.output_dir, runtime)
        runtime.print(f"{key}=latest: {path}")
        return path
    if skipped:
        raise RunError(f"{key}=latest: no complete checkpoint in {cfg.output_dir}; unreadable: {'; '.join(skipped)}")
    if cfg.start_fresh_if_none:
        runtime.print(f"{key}=latest: no checkpoint in {cfg.output_dir} yet; starting a new run "
                      f"({cfg.section}.checkpoints.start_fresh_if_none)")
        _remove_stale_temporaries(cfg.output_dir, runtime)
        return None
    raise RunError(f"{key}=latest: {cfg.output_dir} holds no checkpoint to resume (latest_checkpoint.pt, "
                   f"best_model.pt or step_checkpoint_*.pt); to start a new run there set {key}=null, or set "
                   f"{cfg.section}.checkpoints.start_fresh_if_none=true to do so whenever none exists")


def _rng_state() -> dict[str, Any]:
    """The global random states (Python, NumPy, torch CPU and CUDA) of this process."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_same_architecture(ckpt: dict[str, Any], stage: Any, path: str | Path) -> None:
    """Refuse weights of another architecture, naming each argument that differs (checkpoint vs settings)."""
    from .models import architecture

    saved, current = architecture(ckpt["model_args"]), stage.architecture()
    if saved == current:
        return
    diff = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} in the settings"
                     for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k))
    raise RunError(f"{path} holds a {stage.name} network of another architecture ({diff}); use the settings it was "
                   "trained with (the config.yaml in its folder)")


def init_weights(stage: Any, path: str | Path, runtime: Runtime) -> None:
    """``checkpoints.init_from``: the network weights of another run of the same architecture (e.g. trained at a
    smaller input size); optimizer, epoch, step and output folder start fresh."""
    ckpt = load_checkpoint(path, expected_stage=stage.name)
    check_same_architecture(ckpt, stage, path)
    for name, module in stage.modules.items():
        if name in ckpt["state_dict"]:
            load_weights(unwrap(module), ckpt["state_dict"][name], path)
    runtime.print(f"initialised {', '.join(n for n in stage.modules if n in ckpt['state_dict'])} from {path} "
                  f"(epoch {ckpt['epoch'] + 1}); optimizer and epoch start fresh")


def load_weights(model: nn.Module, state_dict: dict[str, Any], path: str | Path) -> None:
    """``model.load_state_dict`` with a one-line :class:`RunError` naming the checkpoint when it does not fit."""
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise RunError(f"the weights in {path} do not fit the network it describes: {first}") from None


# --------------------------------------------------------------------------------------------------- stages
class Stage(Protocol):
    """What a stage provides to the loop. Optional hooks, called when a stage has them: ``on_epoch_start(epoch)``
    (0-based, before the epoch's first batch) and ``on_validation_start()``."""

    name: str  # "autoencoder" or "diffusion"
    modules: dict[str, nn.Module]  # trained (and checkpointed) networks
    optimizers: dict[str, torch.optim.Optimizer]  # one per loss returned by training_step, same keys

    def training_step(self, batch: Any, epoch: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Losses to back-propagate (keyed by optimizer name) and scalars to log."""

    def validation_step(self, batch: Any) -> dict[str, float]:
        """Metrics of one validation batch (averaged by the loop); must contain ``val_loss``."""

    def visualize(self, batch: Any, quick: bool = False) -> dict[str, torch.Tensor]:
        """Images (C x H x W in [0, 1]) for TensorBoard; ``quick``: the cheapest complete version (fast_dev_run)."""

    def describe(self, batch: Any) -> list[str]:
        """Lines printed at start: shapes, factors, parameter counts."""

    def checkpoint_extra(self) -> dict[str, Any]:
        """Stage-specific, self-describing checkpoint content (constructor arguments, scale factor, ...)."""

    def architecture(self) -> dict[str, Any]:
        """The trained network's architecture arguments (what a checkpoint must match to be loaded)."""

    def load_extra(self, ckpt: dict[str, Any], path: str | Path) -> None:
        """Restore stage-specific content on resume."""


@dataclass
class LoopConfig:
    """The loop settings shared by both stages (taken from ``<stage>.training``/``checkpoints``/``logging``)."""

    n_epochs: int
    output_dir: Path
    log_dir: Path
    seed: int = 42
    gradient_accumulation_steps: int = 1
    grad_clip_norm: float | None = None
    val_interval: int = 1
    save_interval: int = 1
    save_best: bool = True
    log_interval: int = 10
    visualize_interval: int = 1
    resume_from: Path | str | None = None  # a checkpoint, or "latest" (see resolve_resume)
    init_from: Path | None = None
    fast_dev_run: bool = False
    fast_dev_run_batches: int = 2
    every_n_steps: int | None = None  # also a step checkpoint every N optimizer steps
    keep_last: int | None = None  # step checkpoints kept (newest first); None = all
    start_fresh_if_none: bool = False  # resume_from="latest" in a folder without checkpoints starts a new run
    on_nonfinite: str = "stop"  # "stop" | "skip"
    max_consecutive_skips: int = 10
    settings: dict[str, Any] = field(default_factory=dict)
    section: str = "autoencoder"  # settings section, for messages that name config keys


def loop_config(settings: Any, section: str, visualize_interval: int | None = None) -> LoopConfig:
    """The loop settings of one stage, from its ``training``/``checkpoints``/``logging`` settings sections."""
    stage = getattr(settings, section)
    t, ckpt, log = stage.training, stage.checkpoints, stage.logging
    output_dir = Path(ckpt.output_dir)
    return LoopConfig(
        n_epochs=t.n_epochs,
        output_dir=output_dir,
        log_dir=Path(log.log_dir) if log.log_dir else output_dir / "logs",
        seed=settings.seed if settings.seed is not None else 0,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        grad_clip_norm=t.grad_clip_norm,
        val_interval=t.val_interval,
        save_interval=t.save_interval,
        save_best=ckpt.save_best,
        log_interval=log.log_interval,
        visualize_interval=visualize_interval or log.visualize_interval,
        resume_from="latest" if ckpt.resume_from == "latest" else Path(ckpt.resume_from) if ckpt.resume_from else None,
        init_from=Path(ckpt.init_from) if ckpt.init_from else None,
        fast_dev_run=t.fast_dev_run,
        fast_dev_run_batches=t.fast_dev_run_batches,
        every_n_steps=ckpt.every_n_steps,
        keep_last=ckpt.keep_last,
        start_fresh_if_none=ckpt.start_fresh_if_none,
        on_nonfinite=t.on_nonfinite,
        max_consecutive_skips=t.max_consecutive_skips,
        settings=settings.to_dict(),
        section=section,
    )


@dataclass
class LoopState:
    epoch: int = 0  # next epoch to run
    global_step: int = 0  # optimizer steps taken
    best_metric: float = math.inf
    history: list[dict[str, float]] = field(default_factory=list)
    skipped_batches: int = 0  # batches dropped for a non-finite loss (on_nonfinite: skip), whole run
    stopped_by: str | None = None  # "SIGTERM"/"SIGINT" when a signal stopped the run early

    @property
    def exit_code(self) -> int:
        """0 for a finished run, 128 + the signal number for one stopped by a signal (as a shell reports it)."""
        return 128 + int(getattr(signal, self.stopped_by)) if self.stopped_by else 0


def prepare_output_dir(cfg: LoopConfig, runtime: Runtime) -> None:
    """Refuse to start a fresh run where another run left checkpoints; never delete anything.

    Resuming may write into the folder of the checkpoint it resumes, and into an empty folder, but not into a
    folder that holds some other run.
    """
    if cfg.fast_dev_run:
        return
    existing = [cfg.output_dir / n for n in ("latest_checkpoint.pt", "best_model.pt") if (cfg.output_dir / n).exists()]
    existing += [path for _, path in step_checkpoints(cfg.output_dir)][-1:]
    if cfg.resume_from == "latest":
        return  # resolve_resume picks a checkpoint of this folder, or starts fresh only where there is none
    if cfg.resume_from is not None:
        if existing and Path(cfg.resume_from).resolve().parent != cfg.output_dir.resolve():
            raise RunError(
                f"{cfg.section}.checkpoints.output_dir {cfg.output_dir} holds another run than the one resumed from "
                f"{cfg.resume_from}; nothing was changed. Resume into the checkpoint's own folder or an empty one."
            )
        return
    if existing:
        raise RunError(
            f"{cfg.output_dir} already holds a run ({', '.join(p.name for p in existing)}); nothing was changed. "
            f"To continue it, add --set {cfg.section}.checkpoints.resume_from=latest; "
            f"to start a new run, choose another {cfg.section}.checkpoints.output_dir."
        )


def start_record(cfg: LoopConfig, runtime: Runtime) -> None:
    """A plain-text record of the run in its output folder: ``config.yaml`` (the resolved settings, every default
    filled in) and ``train.log`` (what the run prints, appended on resume). A resume whose settings differ from the
    folder's ``config.yaml`` writes them beside it as ``config.resume-N.yaml``; nothing is overwritten. Nothing is
    written by ``fast_dev_run`` or by ranks other than 0."""
    import yaml

    if cfg.fast_dev_run or not runtime.is_main:
        return
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.settings, sort_keys=False, default_flow_style=None)
    target = cfg.output_dir / "config.yaml"
    if target.exists() and target.read_text(encoding="utf-8") != text:
        n = 1
        while (cfg.output_dir / f"config.resume-{n}.yaml").exists():
            n += 1
        target = cfg.output_dir / f"config.resume-{n}.yaml"
    if not target.exists():
        atomic_write_text(target, text)
    runtime.log = open(cfg.output_dir / "train.log", "a", encoding="utf-8")
    what = f"resuming {cfg.resume_from}" if cfg.resume_from else "new run"
    runtime.log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {cfg.section}: {what}; settings in {target.name}; "
                      f"command: {' '.join(sys.argv)}\n")
    runtime.log.writelines(line + "\n" for line in runtime.printed)
    runtime.printed.clear()
    runtime.log.flush()


def _epoch_seed(cfg: LoopConfig, epoch: int, runtime: Runtime) -> int:
    return cfg.seed + 1_000_003 * (epoch + 1) + 7919 * runtime.rank


def _reseed_loader(loader: Iterable, seed: int) -> None:
    """Make an epoch's shuffling and augmentation a function of the epoch alone, so resuming is exact."""
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)
    dataset = getattr(loader, "dataset", None)
    transform = getattr(dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed % (2**32))


def train_step(
    stage: Stage,
    batch: Any,
    epoch: int,
    scalers: dict[str, torch.amp.GradScaler],
    runtime: Runtime,
    *,
    group_size: int = 1,
    boundary: bool = True,
    grad_clip_norm: float | None = None,
    global_step: int = 0,
    where: str = "",
    on_nonfinite: str = "stop",
) -> dict[str, float]:
    """The one training step of every stage and every tool that measures one (``plan``, benchmarks).

    Forward and losses under the runtime's autocast, a finite-loss check on every process (one all-reduce under
    DDP, so that all processes decide alike), backward of each loss divided by ``group_size`` (gradient
    accumulation; DDP gradient sync is skipped until the group's last batch), and, when ``boundary`` (the last
    batch of an accumulation group), per optimizer: unscale, clip to ``grad_clip_norm``, step, scaler update; then
    all gradients are zeroed and the stage's ``after_optimizer_step`` runs (learning-rate schedule, EMA) with the
    new step count ``global_step + 1``.

    Args:
        on_nonfinite: what a non-finite loss on any process does: ``"stop"`` raises :class:`NonFiniteLoss` on every
            process; ``"skip"`` drops the gradients accumulated for the current optimizer step (no optimizer
            step when this batch ends the group) and raises :class:`BatchSkipped` on every process.

    Returns:
        The stage's scalars to log for this batch.

    Raises:
        NonFiniteLoss: a loss is not finite on some process (names the loss, the process and ``where``).
        BatchSkipped: the same with ``on_nonfinite="skip"``, after the gradients were dropped.
    """
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
    sync = contextlib.ExitStack()
    if runtime.distributed and not boundary:
        for module in stage.modules.values():
            if isinstance(module, DistributedDataParallel):
                sync.enter_context(module.no_sync())
    with sync:
        with runtime.autocast():
            losses, logs = stage.training_step(batch, epoch)
        bad = _nonfinite_losses(losses, runtime)
        if bad and on_nonfinite == "stop":
            raise NonFiniteLoss(
                f"{stage.name}: {bad}" + (f" at {where}" if where else "")
                + ". Lower the learning rate, enable grad_clip_norm, or check the input intensities."
            )
        for name, loss in losses.items():
            # a skipped batch still runs backward, so that DDP's gradient bookkeeping stays the same on every
            # process; its gradients are dropped just below
            scalers[name].scale(loss / group_size).backward()
    if bad:
        for opt in stage.optimizers.values():
            opt.zero_grad(set_to_none=True)
        raise BatchSkipped(f"{stage.name}: {bad}" + (f" at {where}" if where else ""))
    if boundary:
        for name, opt in stage.optimizers.items():
            if name not in losses:
                continue
            if grad_clip_norm:
                scalers[name].unscale_(opt)
                params = [p for g in opt.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
            scalers[name].step(opt)
            scalers[name].update()
        for opt in stage.optimizers.values():
            opt.zero_grad(set_to_none=True)
        if hasattr(stage, "after_optimizer_step"):
            stage.after_optimizer_step(global_step + 1)
    return logs


def _nonfinite_losses(losses: dict[str, torch.Tensor], runtime: Runtime) -> str:
    """'' when every loss is finite on every process, else what was not, e.g. "loss 'g' became nan on rank 1".

    Under DDP every process contributes its row of loss values to one all-reduce, so every process sees every
    value and returns the same text.
    """
    names = sorted(losses)
    if not names:
        return ""
    values = torch.stack([losses[n].detach().float().reshape(()) for n in names])
    if runtime.distributed:
        table = torch.zeros(runtime.world_size, len(names), dtype=torch.float32, device=values.device)
        table[runtime.rank] = values
        dist.all_reduce(table)  # each row is one process's values (x + 0 = x, also for nan and inf)
    else:
        table = values[None]
    finite = torch.isfinite(table).cpu()
    if bool(finite.all()):
        return ""
    table = table.cpu()
    found = [f"loss '{names[j]}' became {table[r, j].item()}" + (f" on rank {r}" if runtime.distributed else "")
             for r in range(table.shape[0]) for j in range(len(names)) if not finite[r, j]]
    return "; ".join(found)


def make_scalers(stage: Stage, runtime: Runtime) -> dict[str, torch.amp.GradScaler]:
    """One gradient scaler per optimizer, active only for fp16 autocast."""
    enabled = runtime.amp_dtype == torch.float16
    return {name: torch.amp.GradScaler(runtime.device.type, enabled=enabled) for name in stage.optimizers}


class StopOnSignal:
    """While active (in the main thread), SIGTERM or SIGINT asks the loop to stop after the current optimizer step
    (``signum`` is set); a second one exits at once with the signal's default action."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum:
            os.write(2, f"\n{name} again: exiting now\n".encode())
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        os.write(2, f"\n{name}: stopping after the current optimizer step and writing a checkpoint "
                    f"(send it again to exit at once)\n".encode())


def _max_over_ranks(value: int, runtime: Runtime) -> int:
    if not runtime.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=runtime.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _raise_on_any_rank(error: str, runtime: Runtime) -> None:
    """Every process raises when one failed (a collective, so it also keeps them in step)."""
    failed = any_rank(bool(error), runtime)
    if error:
        raise RunError(error)
    if failed:
        raise RunError("rank 0 could not write a checkpoint (its message says why)")


@dataclass
class _EpochProgress:
    """What a step checkpoint records of the epoch in progress, per process."""

    sums: dict[str, float] = field(default_factory=dict)  # logged scalars summed over the counted batches
    counted: int = 0  # batches whose scalars are in sums (skipped batches are not)
    in_a_row: int = 0  # batches skipped in a row (on_nonfinite: skip)


def _save_step_checkpoint(stage: Stage, scalers: dict, state: LoopState, epoch: int, batches_done: int,
                          progress: _EpochProgress, cfg: LoopConfig, runtime: Runtime) -> Path:
    """Write ``step_checkpoint_<step>.pt``: everything an epoch-end checkpoint holds, plus the position inside the
    epoch and each process's global random states and partial sums (gathered to rank 0); then keep the newest
    ``keep_last``. Collective under DDP."""
    mine = {"rng": _rng_state(), **dataclasses.asdict(progress)}
    ranks: list[Any] = [None] * runtime.world_size
    if runtime.distributed:
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    path = step_checkpoint_path(cfg.output_dir, state.global_step)
    error = ""
    if runtime.is_main:
        ckpt = _checkpoint(stage, scalers, state, epoch - 1, cfg)
        ckpt["position"] = {"epoch": epoch, "batches_done": batches_done, "ranks": ranks}
        try:
            write_checkpoint(ckpt, path)
            prune_step_checkpoints(cfg.output_dir, cfg.keep_last)
        except RunError as exc:
            error = str(exc)
    _raise_on_any_rank(error, runtime)
    return path


def _restore_position(position: dict[str, Any], runtime: Runtime) -> tuple[dict[str, Any] | None, _EpochProgress]:
    """This process's saved random states (None when the run had another number of processes) and sums."""
    ranks = position["ranks"]
    if len(ranks) != runtime.world_size:
        runtime.print(f"note: the checkpoint was written by {len(ranks)} process(es), this run has "
                      f"{runtime.world_size}: the rest of the epoch continues, but not bit for bit")
        mine = ranks[0]
        return None, _EpochProgress(dict(mine["sums"]), mine["counted"], mine["in_a_row"])
    mine = ranks[runtime.rank]
    return mine["rng"], _EpochProgress(dict(mine["sums"]), mine["counted"], mine["in_a_row"])


def _batches_after(loader: Iterable, done: int, rng: dict[str, Any] | None) -> Iterator:
    """The loader's batches after the first ``done`` of the epoch. Those are loaded and augmented again (not trained
    on), so that the loader's and the transforms' random states are where the interrupted run left them; then the
    global random states saved at that point (``rng``) are restored."""
    batches = iter(loader)
    for _ in range(done):
        next(batches)
    if rng is not None:
        _set_rng_state(rng)
    return batches


def run_loop(
    stage: Stage,
    train_loader: Any,
    val_loader: Any | None,
    cfg: LoopConfig,
    runtime: Runtime,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> LoopState:
    """Train ``stage`` for ``cfg.n_epochs`` epochs (or a few batches with ``fast_dev_run``).

    Checkpoints at epoch ends (``latest_checkpoint.pt``, ``best_model.pt``) and, with ``cfg.every_n_steps``, every
    N optimizer steps (``step_checkpoint_<step>.pt``, resumable inside the epoch, bit for bit on CPU). SIGTERM or
    SIGINT stops every process after the same optimizer step with a step checkpoint; the returned state's
    ``stopped_by`` names the signal. A non-finite loss stops every process (or, with ``on_nonfinite: skip``, drops
    the step).
    """
    state = LoopState()
    cfg = resolve_resume(cfg, runtime, stage.name)
    prepare_output_dir(cfg, runtime)
    scalers = make_scalers(stage, runtime)
    position: dict[str, Any] | None = None
    last_saved: Path | None = None

    if cfg.resume_from is not None:
        ckpt = load_checkpoint(cfg.resume_from, expected_stage=stage.name)
        check_same_architecture(ckpt, stage, cfg.resume_from)
        stage.load_extra(ckpt, cfg.resume_from)
        for name, module in stage.modules.items():
            load_weights(unwrap(module), ckpt["state_dict"][name], cfg.resume_from)
        for name, opt in stage.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        for name, scaler in scalers.items():
            if name in ckpt.get("scalers", {}):
                scaler.load_state_dict(ckpt["scalers"][name])
        state = LoopState(ckpt["epoch"] + 1, ckpt["global_step"], ckpt["best_metric"], ckpt.get("history", []),
                          ckpt.get("skipped_batches", 0))
        position = ckpt.get("position")
        del ckpt
        last_saved = Path(cfg.resume_from)
        at = f", batch {position['batches_done'] + 1}" if position else ""
        runtime.print(f"Resuming {cfg.resume_from} at epoch {state.epoch + 1}{at} (step {state.global_step}).")
        if state.epoch >= cfg.n_epochs:
            runtime.print(f"Checkpoint already finished all {cfg.n_epochs} epochs; nothing to do.")
            return state
    elif cfg.init_from is not None:
        init_weights(stage, cfg.init_from, runtime)
    start_record(cfg, runtime)  # after every check, so that a refused run leaves no files

    writer = None
    if runtime.is_main and not cfg.fast_dev_run:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run hides what the interrupted one logged after its checkpoint, so that curves do not double
        purge = state.global_step + 1 if cfg.resume_from is not None else None
        writer = SummaryWriter(log_dir=str(cfg.log_dir), purge_step=purge)

    precision = {None: "fp32", torch.float16: "fp16 autocast", torch.bfloat16: "bf16 autocast"}[runtime.amp_dtype]
    runtime.print(f"device: {runtime.device}, precision: {precision}, processes: {runtime.world_size}")
    for line in stage.describe(next(iter(train_loader))):  # RNG is re-seeded per epoch, so this peek is harmless
        runtime.print(line)
    n_epochs = state.epoch + 1 if cfg.fast_dev_run else cfg.n_epochs
    max_batches = cfg.fast_dev_run_batches if cfg.fast_dev_run else None
    accum = cfg.gradient_accumulation_steps
    step_times: list[float] = []
    meter = PeakMeter(runtime.device)
    if cfg.fast_dev_run and not meter.cuda:
        use_clean_malloc()  # measure as plan's fresh processes do (memory.py)
    step_peak_mib = None
    resume_command = f"--set {cfg.section}.checkpoints.resume_from=latest"

    try:
        with StopOnSignal(enabled=not cfg.fast_dev_run) as stop:
            for epoch in range(state.epoch, n_epochs):
                epoch_seed = _epoch_seed(cfg, epoch, runtime)
                seed_everything(epoch_seed)
                _reseed_loader(train_loader, epoch_seed)
                sampler = getattr(train_loader, "sampler", None)
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
                for module in stage.modules.values():
                    module.train()
                if hasattr(stage, "on_epoch_start"):
                    stage.on_epoch_start(epoch)

                epoch_start = time.perf_counter()
                n_batches = len(train_loader) if max_batches is None else min(max_batches, len(train_loader))
                done = _EpochProgress()
                first, rng = 0, None
                if position is not None:
                    first = position["batches_done"]
                    rng, done = _restore_position(position, runtime)
                    position = None
                progress = tqdm(total=n_batches, initial=first, desc=f"{stage.name} epoch {epoch + 1}/{n_epochs}",
                                disable=not runtime.is_main)
                try:
                    for i, batch in enumerate(_batches_after(train_loader, min(first, n_batches), rng), start=first):
                        if i >= n_batches:
                            break
                        t0 = time.perf_counter()
                        group_start = (i // accum) * accum
                        group_size = min(accum, n_batches - group_start)
                        boundary = i == group_start + group_size - 1
                        measure = cfg.fast_dev_run and i == n_batches - 1 and (i > 0 or n_batches == 1)
                        if measure:  # the last fast_dev_run step (the first one allocates optimizer states)
                            meter.start(stage_tensor_bytes(stage, batch))
                        where = f"epoch {epoch + 1}, batch {i + 1}"
                        logs: dict[str, float] | None = None
                        try:
                            logs = train_step(stage, batch, epoch, scalers, runtime, group_size=group_size,
                                              boundary=boundary, grad_clip_norm=cfg.grad_clip_norm,
                                              global_step=state.global_step, where=where, on_nonfinite=cfg.on_nonfinite)
                            done.in_a_row = 0
                        except BatchSkipped as exc:
                            state.skipped_batches += 1
                            done.in_a_row += 1
                            runtime.print(f"skipped: {exc} ({done.in_a_row} in a row, {state.skipped_batches} in all)")
                            if done.in_a_row >= cfg.max_consecutive_skips:
                                raise NonFiniteLoss(
                                    f"{done.in_a_row} batches in a row had a non-finite loss (the last: {exc}; "
                                    f"{cfg.section}.training.max_consecutive_skips={cfg.max_consecutive_skips})"
                                ) from None
                        if measure:
                            step_peak_mib = meter.peak_mib()
                        stepped = boundary and logs is not None
                        if stepped:
                            state.global_step += 1
                        if runtime.device.type == "cuda":
                            torch.cuda.synchronize(runtime.device)
                        step_times.append(time.perf_counter() - t0)
                        progress.update(1)
                        if logs is not None:
                            done.counted += 1
                            for key, value in logs.items():
                                done.sums[key] = done.sums.get(key, 0.0) + float(value)
                            progress.set_postfix({k: f"{v:.4g}" for k, v in logs.items()})
                        if writer is not None and stepped and state.global_step % cfg.log_interval == 0:
                            for key, value in logs.items():
                                writer.add_scalar(f"train/{key}", float(value), state.global_step)
                            for name, opt in stage.optimizers.items():
                                writer.add_scalar(f"lr/{name}", opt.param_groups[0]["lr"], state.global_step)
                            if state.skipped_batches:
                                writer.add_scalar("train/skipped_batches", state.skipped_batches, state.global_step)
                        if not boundary or cfg.fast_dev_run:
                            continue
                        signum = _max_over_ranks(stop.signum, runtime)  # every process stops after the same step
                        due = stepped and cfg.every_n_steps and state.global_step % cfg.every_n_steps == 0
                        if due or signum:
                            last_saved = _save_step_checkpoint(stage, scalers, state, epoch, i + 1, done, cfg, runtime)
                        if signum:
                            state.stopped_by = signal.Signals(signum).name
                            runtime.print(
                                f"{state.stopped_by}: stopped after optimizer step {state.global_step} (epoch "
                                f"{epoch + 1}, batch {i + 1} of {n_batches}); checkpoint written to {last_saved}. To "
                                f"resume, run the same command with {resume_command}"
                            )
                            break
                finally:
                    progress.close()  # also when an error ends the epoch
                if state.stopped_by:
                    break

                epoch_logs = {f"train_{k}": all_reduce_mean(v / max(1, done.counted), runtime)
                              for k, v in done.sums.items()}
                if cfg.on_nonfinite == "skip":
                    epoch_logs["skipped_batches"] = float(state.skipped_batches)
                epoch_logs["train_seconds"] = time.perf_counter() - epoch_start
                # validate every val_interval epochs and after the last one, so best_model.pt always exists
                run_val = val_loader is not None and (cfg.fast_dev_run or (epoch + 1) % cfg.val_interval == 0
                                                      or epoch + 1 == cfg.n_epochs)
                if run_val:
                    val = validate(stage, val_loader, runtime, max_batches)
                    epoch_logs.update({f"val_{k}" if not k.startswith("val_") else k: v for k, v in val.items()})
                # pictures every visualize_interval epochs, whether or not this epoch validates
                if (val_loader is not None and runtime.is_main
                        and (cfg.fast_dev_run or (epoch + 1) % cfg.visualize_interval == 0)):
                    with torch.no_grad():
                        images = stage.visualize(next(iter(val_loader)), quick=cfg.fast_dev_run)
                    for tag, image in images.items():
                        if writer is not None:
                            writer.add_image(tag, image, epoch + 1)
                    if cfg.fast_dev_run:
                        runtime.print(f"fast_dev_run: visualisation made {len(images)} image(s)")
                if writer is not None:
                    for key, value in epoch_logs.items():
                        writer.add_scalar(f"epoch/{key}", value, epoch + 1)
                runtime.print(f"{stage.name} epoch {epoch + 1}: "
                              + ", ".join(f"{k}={v:.5g}" for k, v in epoch_logs.items()))
                state.history.append({"epoch": epoch + 1, **epoch_logs})

                if cfg.fast_dev_run:
                    state.epoch = epoch + 1
                    # serialise a checkpoint into memory: what a real run would write, without writing it
                    buffer = io.BytesIO()
                    torch.save(_checkpoint(stage, scalers, state, epoch, cfg), buffer)
                    runtime.print(f"fast_dev_run: checkpoint serialised in memory ({buffer.tell() / 2**20:.1f} MiB)")
                    _print_dev_run_summary(runtime, step_times, step_peak_mib, meter)
                    break
                improved = run_val and epoch_logs["val_loss"] < state.best_metric
                if improved:
                    state.best_metric = epoch_logs["val_loss"]
                state.epoch = epoch + 1
                error = ""
                if runtime.is_main:
                    ckpt = _checkpoint(stage, scalers, state, epoch, cfg)
                    last = epoch + 1 == cfg.n_epochs
                    try:
                        if (epoch + 1) % cfg.save_interval == 0 or last:
                            write_checkpoint(ckpt, cfg.output_dir / "latest_checkpoint.pt")
                            last_saved = cfg.output_dir / "latest_checkpoint.pt"
                        if cfg.save_best and (improved or (val_loader is None and last)):
                            write_checkpoint(ckpt, cfg.output_dir / "best_model.pt")
                            runtime.print(f"  saved best model (val_loss={state.best_metric:.5g}) to "
                                          f"{cfg.output_dir / 'best_model.pt'}")
                    except RunError as exc:
                        error = str(exc)
                    if on_checkpoint is not None and not error:
                        on_checkpoint(ckpt)
                _raise_on_any_rank(error, runtime)  # also keeps the processes in step, like a barrier
    except NonFiniteLoss as exc:
        kept = (f"the last good checkpoint is {last_saved} (to continue from it: {resume_command})" if last_saved
                else "no checkpoint was written yet")
        everywhere = " on every process" if runtime.distributed else ""
        error = NonFiniteLoss(f"{exc} Stopped{everywhere}; {kept}.")
        _log_error(runtime, error)
        raise error from None
    except RunError as exc:  # e.g. a checkpoint that could not be written
        _log_error(runtime, exc)
        raise
    finally:
        if writer is not None:
            writer.close()
    return state


def _log_error(runtime: Runtime, error: BaseException) -> None:
    """Put the error that ends a run into its train.log too (the command line shows it on stderr)."""
    if runtime.log is not None:
        runtime.log.write(f"error: {error}\n")
        runtime.log.flush()


@torch.no_grad()
def validate(stage: Stage, loader: Any, runtime: Runtime, max_batches: int | None = None) -> dict[str, float]:
    """Average the stage's validation metrics over the loader (and over DDP ranks)."""
    for module in stage.modules.values():
        module.eval()
    if hasattr(stage, "on_validation_start"):
        stage.on_validation_start()
    sums: dict[str, float] = {}
    count = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with runtime.autocast():
            metrics = stage.validation_step(batch)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        count += 1
    for module in stage.modules.values():
        module.train()
    return {k: all_reduce_mean(v / max(1, count), runtime) for k, v in sums.items()}


def _checkpoint(stage: Stage, scalers: dict, state: LoopState, epoch: int, cfg: LoopConfig) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "stage": stage.name,
        "epoch": epoch,
        "global_step": state.global_step,
        "best_metric": state.best_metric,
        "history": state.history,
        "skipped_batches": state.skipped_batches,
        "state_dict": {name: unwrap(m).state_dict() for name, m in stage.modules.items()},
        "optimizers": {name: opt.state_dict() for name, opt in stage.optimizers.items()},
        "scalers": {name: s.state_dict() for name, s in scalers.items()},
        "settings": cfg.settings,
        **stage.checkpoint_extra(),
    }


def _print_dev_run_summary(runtime: Runtime, step_times: list[float], peak_mib: float | None,
                           meter: PeakMeter) -> None:
    timed = step_times[1:] or step_times  # the first step includes warm-up
    runtime.print(f"fast_dev_run: {len(step_times)} training step(s), {sum(timed) / max(1, len(timed)):.3f} s/step")
    if peak_mib is not None:
        runtime.print(f"fast_dev_run: peak memory of the last training step {peak_mib:.0f} MiB ({meter.method})")
    runtime.print("fast_dev_run: no checkpoints or logs were written.")
