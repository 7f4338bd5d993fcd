"""The one training loop shared by both stages, and the one training step.

A stage (:class:`Stage`) says what to compute per batch; this module does everything else the same way for both:
the step (autocast, gradient accumulation and clipping, loss scaling, non-finite losses decided alike on every
process), the loop (exact resume from epoch-end or step checkpoints, validation, pictures, atomic checkpoints,
stopping cleanly on SIGTERM/SIGINT, TensorBoard, ``fast_dev_run``) and the run record (``config.yaml``,
``train.log``). Device, precision and DDP are :mod:`.runtime`'s; checkpoint files are :mod:`.checkpoints`'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    check_same_architecture,
    load_checkpoint,
    load_weights,
    prepare_output_dir,
    prune_step_checkpoints,
    resolve_resume,
    step_checkpoint_path,
    write_checkpoint,
)
from .errors import ConfigError, NonFiniteLoss, OutOfMemory, RunError
from .fileio import atomic_write_text
from .memory import PeakMeter, is_out_of_memory, process_peak_mib, stage_modules, tensor_bytes, use_clean_malloc
from .models import architecture
from .runtime import (
    Runtime,
    all_reduce_mean,
    any_rank,
    is_compile_failure,
    max_over_ranks,
    rng_state,
    seed_everything,
    set_rng_state,
    unwrap,
)
from .settings import Settings
from .tracking import MlflowTracker, TensorBoardTracker, default_mlflow_uri


class BatchSkipped(Exception):
    """``on_nonfinite: skip``: this batch's loss was not finite somewhere; its step's gradients were dropped."""


class Stage(Protocol):
    """What a stage provides to the loop. Optional hooks, called when a stage has them: ``on_epoch_start(epoch)``
    (0-based, before the epoch's first batch), ``after_optimizer_step(step)`` (after each optimizer step taken, with
    the new global step; see :func:`train_step`) and ``on_validation_start()``."""

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
    tracker: str = "tensorboard"  # "tensorboard" | "mlflow" | "none" (logging.tracker)
    mlflow_uri: str | None = None  # None: tracking.default_mlflow_uri(output_dir)

    def logs_description(self) -> str:
        """Where this stage's logs went, for the closing line: TensorBoard's folder, the MLflow store, or none."""
        if self.tracker == "none":
            return "no logs (logging.tracker: none)"
        if self.tracker == "mlflow":
            return f"MLflow run in {self.mlflow_uri or default_mlflow_uri(self.output_dir)}"
        return f"TensorBoard logs in {self.log_dir}"


def loop_config(settings: Settings, section: str, visualize_interval: int | None = None) -> LoopConfig:
    """The loop settings of one stage, from its ``training``/``checkpoints``/``logging`` settings sections."""
    stage = getattr(settings, section)
    t, ckpt, log = stage.training, stage.checkpoints, stage.logging
    if t.batch_size == "auto":
        raise ConfigError(f"{section}.training.batch_size: auto is resolved before training (the command line does "
                          "it; from Python call monai_diffusion.plan.preflight.prepare_training(settings, "
                          f"{section!r}) and train with the settings it returns)", key=f"{section}.training.batch_size")
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
        tracker=log.tracker,
        mlflow_uri=log.mlflow_uri,
    )


@dataclass
class LoopState:
    epoch: int = 0  # next epoch to run
    global_step: int = 0  # optimizer steps taken (not those fp16 loss scaling skipped, nor skipped batches)
    best_metric: float = math.inf
    history: list[dict[str, float]] = field(default_factory=list)
    skipped_batches: int = 0  # batches dropped for a non-finite loss (on_nonfinite: skip), whole run
    stopped_by: str | None = None  # "SIGTERM"/"SIGINT" when a signal stopped the run early
    mlflow_run_id: str | None = None  # the MLflow run this training run logs to (logging.tracker mlflow)

    @property
    def exit_code(self) -> int:
        """0 for a finished run, 128 + the signal number for one stopped by a signal (as a shell reports it)."""
        return 128 + int(getattr(signal, self.stopped_by)) if self.stopped_by else 0


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


class StepResult(NamedTuple):
    """What :func:`train_step` did."""

    logs: dict[str, float]  # the stage's scalars of this batch
    stepped: bool  # an optimizer step was taken (the last batch of its group, not skipped by fp16 loss scaling)


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
) -> StepResult:
    """The one training step of every stage and every tool that measures one (``plan``, benchmarks).

    Forward and losses under the runtime's autocast, a finite-loss check on every process (one all-reduce under
    DDP, so that all processes decide alike), backward of each loss divided by ``group_size`` (gradient
    accumulation; DDP gradient sync is skipped until the group's last batch), and, when ``boundary`` (the last
    batch of an accumulation group), per optimizer: unscale, clip to ``grad_clip_norm``, step, scaler update; then
    all gradients are zeroed and, when the optimizer step went through, the stage's ``after_optimizer_step`` runs
    (learning-rate schedule, EMA) with the new step count ``global_step + 1``.

    With fp16 loss scaling the scaler skips an optimizer's step whose gradients hold inf or NaN (and lowers its
    scale); such a step did not happen: the learning-rate schedule and the EMA do not advance, and the loop does
    not count it as a global step. When a stage has several optimizers, the step counts only if none was skipped.

    Args:
        on_nonfinite: what a non-finite loss on any process does: ``"stop"`` raises :class:`NonFiniteLoss` on every
            process; ``"skip"`` drops the gradients accumulated for the current optimizer step (no optimizer
            step when this batch ends the group) and raises :class:`BatchSkipped` on every process.

    Returns:
        The stage's scalars to log for this batch, and whether an optimizer step was taken (False when not
        ``boundary`` or when the scaler skipped it).

    Raises:
        NonFiniteLoss: a loss is not finite on some process (names the loss, the process and ``where``).
        BatchSkipped: the same with ``on_nonfinite="skip"``, after the gradients were dropped.
    """
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
    try:
        return _train_step(stage, batch, epoch, scalers, runtime, group_size, boundary, grad_clip_norm, global_step,
                           where, on_nonfinite)
    except Exception as exc:
        if not _compile_fell_back(stage, exc, runtime):
            raise
    # torch.compile failed in this step's forward or backward (compiling is lazy): the networks now run eager, and
    # the batch runs again from the start with the gradients of its group dropped
    for opt in stage.optimizers.values():
        opt.zero_grad(set_to_none=True)
    return _train_step(stage, batch, epoch, scalers, runtime, group_size, boundary, grad_clip_norm, global_step,
                       where, on_nonfinite)


def _compile_fell_back(stage: Stage, exc: BaseException, runtime: Runtime) -> bool:
    """When ``exc`` is a failure of torch.compile and the stage trains through compiled networks
    (``stage.compiled``, :class:`~monai_diffusion.runtime.CompiledNetwork`), switch them to eager with one warning
    and return True; else False."""
    compiled = [c for c in getattr(stage, "compiled", {}).values() if not c.eager]
    if not compiled or not is_compile_failure(exc):
        return False
    for network in compiled:
        network.fall_back(exc, runtime)
    return True


def _train_step(stage: Stage, batch: Any, epoch: int, scalers: dict[str, torch.amp.GradScaler], runtime: Runtime,
                group_size: int, boundary: bool, grad_clip_norm: float | None, global_step: int, where: str,
                on_nonfinite: str) -> StepResult:
    """:func:`train_step`'s work (its arguments, checked)."""
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
    if not boundary:
        return StepResult(logs, False)
    stepped = True
    for name, opt in stage.optimizers.items():
        if name not in losses:
            continue
        scaler = scalers[name]
        if grad_clip_norm:
            scaler.unscale_(opt)
            params = [p for g in opt.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(opt)
        scaler.update()
        if scale is not None and scaler.get_scale() < scale:  # update() lowers the scale exactly when step() skipped
            stepped = False
    for opt in stage.optimizers.values():
        opt.zero_grad(set_to_none=True)
    if stepped and hasattr(stage, "after_optimizer_step"):
        stage.after_optimizer_step(global_step + 1)
    return StepResult(logs, stepped)


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


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict[str, Any] | None, name: str, runtime: Runtime) -> None:
    """Put a checkpoint's gradient-scaler state into ``scaler`` (a no-op when fp16 loss scaling is off).

    A run trained in fp32 or bf16 saved an empty state (a disabled scaler has none), and older checkpoints may have
    none at all: an fp16 run resuming it starts with a fresh scaler, as a new fp16 run would, and says so.
    """
    if not scaler.is_enabled():
        return
    if not saved:
        runtime.print(f"note: the checkpoint holds no fp16 loss-scaling state for '{name}' (it was trained in fp32 "
                      "or bf16); its gradient scaler starts fresh")
        return
    scaler.load_state_dict(saved)


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
    mine = {"rng": rng_state(runtime.device), **dataclasses.asdict(progress)}
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


def _batches_after(loader: Iterable, done: int, rng: dict[str, Any] | None, device: torch.device) -> Iterator:
    """The loader's batches after the first ``done`` of the epoch. Those are loaded and augmented again (not trained
    on), so that the loader's and the transforms' random states are where the interrupted run left them; then the
    global random states saved at that point (``rng``) are restored."""
    batches = iter(loader)
    for _ in range(done):
        next(batches)
    if rng is not None:
        set_rng_state(rng, device)
    return batches


def init_weights(stage: Stage, path: str | Path, runtime: Runtime) -> None:
    """``checkpoints.init_from``: the network weights of another run of the same architecture (e.g. trained at a
    smaller input size); optimizer, epoch, step and output folder start fresh."""
    ckpt = load_checkpoint(path, expected_stage=stage.name)
    check_same_architecture(architecture(ckpt["model_args"]), stage.architecture(), stage.name, path)
    for name, module in stage.modules.items():
        if name in ckpt["state_dict"]:
            load_weights(unwrap(module), ckpt["state_dict"][name], path)
    runtime.print(f"initialised {', '.join(n for n in stage.modules if n in ckpt['state_dict'])} from {path} "
                  f"(epoch {ckpt['epoch'] + 1}); optimizer and epoch start fresh")


def stage_tensor_bytes(stage: Stage, batch: Any = None) -> int:
    """Bytes of everything a stage holds before a step: its networks (trained and frozen), optimizer states and
    the batch's tensors."""
    tensors = list(batch.values()) if isinstance(batch, dict) else [batch]
    return tensor_bytes(stage_modules(stage), stage.optimizers.values(), tensors)


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
    cfg = resolve_resume(cfg, runtime, stage.name)
    prepare_output_dir(cfg, runtime)
    loop = _Loop(stage, train_loader, val_loader, cfg, runtime, on_checkpoint)
    if cfg.resume_from is not None:
        if not loop.resume():
            return loop.state
    elif cfg.init_from is not None:
        init_weights(stage, cfg.init_from, runtime)
    start_record(cfg, runtime)  # after every check, so that a refused run leaves no files
    return loop.run()


class _Loop:
    """One call of :func:`run_loop`: what the loop holds between its pieces (resume, epochs, batches, the end of an
    epoch)."""

    def __init__(self, stage: Stage, train_loader: Any, val_loader: Any | None, cfg: LoopConfig, runtime: Runtime,
                 on_checkpoint: Callable[[dict[str, Any]], None] | None) -> None:
        self.stage, self.train_loader, self.val_loader = stage, train_loader, val_loader
        self.cfg, self.runtime, self.on_checkpoint = cfg, runtime, on_checkpoint
        self.state = LoopState()
        self.scalers = make_scalers(stage, runtime)
        self.position: dict[str, Any] | None = None  # where a step checkpoint left its epoch
        self.last_saved: Path | None = None
        self.writer: Any = None  # TensorBoard's SummaryWriter on rank 0 of a real run
        self.step_times: list[float] = []
        self.compile_reported = False  # the first step's time with compiling was printed (device.compile)
        self.step_peak_mib: float | None = None
        self.meter: PeakMeter | None = None  # fast_dev_run measures its last step with it
        self.resume_command = f"--set {cfg.section}.checkpoints.resume_from=latest"

    # ------------------------------------------------------------------------------------------------- resume
    def resume(self) -> bool:
        """Restore networks, optimizers, scalers and the loop's position from ``cfg.resume_from``. Returns False
        when that checkpoint already finished every epoch (nothing to do)."""
        cfg, stage, runtime = self.cfg, self.stage, self.runtime
        ckpt = load_checkpoint(cfg.resume_from, expected_stage=stage.name)
        check_same_architecture(architecture(ckpt["model_args"]), stage.architecture(), stage.name, cfg.resume_from)
        stage.load_extra(ckpt, cfg.resume_from)
        for name, module in stage.modules.items():
            load_weights(unwrap(module), ckpt["state_dict"][name], cfg.resume_from)
        for name, opt in stage.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        for name, scaler in self.scalers.items():
            restore_scaler(scaler, ckpt.get("scalers", {}).get(name), name, runtime)
        self.state = LoopState(ckpt["epoch"] + 1, ckpt["global_step"], ckpt["best_metric"], ckpt.get("history", []),
                               ckpt.get("skipped_batches", 0), mlflow_run_id=ckpt.get("mlflow_run_id"))
        self.position = ckpt.get("position")
        del ckpt
        self.last_saved = Path(cfg.resume_from)
        at = f", batch {self.position['batches_done'] + 1}" if self.position else ""
        state = self.state
        runtime.print(f"Resuming {cfg.resume_from} at epoch {state.epoch + 1}{at} (step {state.global_step}).")
        if state.epoch >= cfg.n_epochs:
            runtime.print(f"Checkpoint already finished all {cfg.n_epochs} epochs; nothing to do.")
            return False
        return True

    # ---------------------------------------------------------------------------------------------- the run
    def run(self) -> LoopState:
        """Open the TensorBoard log, describe the run, then train epoch after epoch until the last, a signal or an
        error."""
        cfg, runtime, state = self.cfg, self.runtime, self.state
        if runtime.is_main and not cfg.fast_dev_run:
            self.writer = self.open_tracker()
        precision = {None: "fp32", torch.float16: "fp16 autocast", torch.bfloat16: "bf16 autocast"}[runtime.amp_dtype]
        runtime.print(f"device: {runtime.device}, precision: {precision}, processes: {runtime.world_size}"
                      + "".join(f", {name}" for name, on in (("channels_last", runtime.channels_last),
                                                              ("compile", runtime.compile)) if on))
        for line in self.stage.describe(next(iter(self.train_loader))):  # RNG is re-seeded per epoch: a harmless peek
            runtime.print(line)
        n_epochs = state.epoch + 1 if cfg.fast_dev_run else cfg.n_epochs
        self.meter = PeakMeter(runtime.device)
        if cfg.fast_dev_run and not self.meter.cuda:
            use_clean_malloc()  # measure as plan's fresh processes do (memory.py)
        completed = False
        try:
            with StopOnSignal(enabled=not cfg.fast_dev_run) as stop:
                for epoch in range(state.epoch, n_epochs):
                    self.start_epoch(epoch)
                    epoch_start = time.perf_counter()
                    done = self.train_epoch(epoch, n_epochs, stop)
                    if state.stopped_by:
                        break
                    epoch_logs, validated = self.end_of_epoch_logs(epoch, done, epoch_start)
                    if cfg.fast_dev_run:
                        self.finish_dev_run(epoch)
                        break
                    self.save_epoch(epoch, epoch_logs, validated)
            completed = True
        except NonFiniteLoss as exc:
            kept = (f"the last good checkpoint is {self.last_saved} (to continue from it: {self.resume_command})"
                    if self.last_saved else "no checkpoint was written yet")
            everywhere = " on every process" if runtime.distributed else ""
            error = NonFiniteLoss(f"{exc} Stopped{everywhere}; {kept}.")
            _log_error(runtime, error)
            raise error from None
        except RunError as exc:  # e.g. a checkpoint that could not be written
            _log_error(runtime, exc)
            raise
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            error = self.out_of_memory(exc)
            _log_error(runtime, error)
            raise error from None
        finally:
            if self.writer is not None:  # an MLflow run records how the training run ended
                self.writer.close("FAILED" if not completed else "KILLED" if state.stopped_by else "FINISHED")
        return state

    def open_tracker(self) -> Any:
        """The run's tracker (``logging.tracker``; :mod:`monai_diffusion.tracking`), or None for ``none``."""
        cfg, state = self.cfg, self.state
        if cfg.tracker == "none":
            return None
        if cfg.tracker == "mlflow":
            uri = cfg.mlflow_uri or default_mlflow_uri(cfg.output_dir)
            tracker = MlflowTracker(uri, experiment=Path(cfg.output_dir).resolve().parent.name or "monai-diffusion",
                                    run_name=cfg.section, params=cfg.settings, run_id=state.mlflow_run_id,
                                    artifacts=(cfg.output_dir / "config.yaml",))
            state.mlflow_run_id = tracker.run_id
            return tracker
        # a resumed run hides what the interrupted one logged after its checkpoint, so that curves do not double
        purge = state.global_step + 1 if cfg.resume_from is not None else None
        return TensorBoardTracker(cfg.log_dir, purge)

    def out_of_memory(self, exc: BaseException) -> OutOfMemory:
        """The one-line error of a failed allocation during training: where, the peak so far, the last good
        checkpoint (kept as it was)."""
        cfg, runtime, state = self.cfg, self.runtime, self.state
        device = runtime.device
        if device.type == "cuda":
            torch.cuda.empty_cache()
        kept = (f"the last good checkpoint {self.last_saved} is kept (to continue from it: {self.resume_command})"
                if self.last_saved else "no checkpoint was written yet")
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return OutOfMemory(
            f"{self.stage.name} training ran out of {device.type.upper()} memory in epoch {state.epoch + 1} after "
            f"optimizer step {state.global_step} (peak so far {process_peak_mib(device):,.0f} MiB; {first[:160]}); "
            f"{kept}. Make a step smaller (see monai-diffusion-plan --budget-gb for what to change)",
            section=cfg.section,
        )

    # -------------------------------------------------------------------------------------------- one epoch
    def start_epoch(self, epoch: int) -> None:
        """Seed the epoch (a function of the epoch alone, so resuming is exact) and put the networks in training."""
        epoch_seed = _epoch_seed(self.cfg, epoch, self.runtime)
        seed_everything(epoch_seed)
        _reseed_loader(self.train_loader, epoch_seed)
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for module in self.stage.modules.values():
            module.train()
        if hasattr(self.stage, "on_epoch_start"):
            self.stage.on_epoch_start(epoch)

    def train_epoch(self, epoch: int, n_epochs: int, stop: StopOnSignal) -> _EpochProgress:
        """The epoch's batches (those a step checkpoint had not done yet), after :meth:`start_epoch`; sets
        ``state.stopped_by`` when a signal stopped it. Returns the epoch's partial sums."""
        max_batches = self.cfg.fast_dev_run_batches if self.cfg.fast_dev_run else None
        n_batches = len(self.train_loader) if max_batches is None else min(max_batches, len(self.train_loader))
        done = _EpochProgress()
        first, rng = 0, None
        if self.position is not None:
            first = self.position["batches_done"]
            rng, done = _restore_position(self.position, self.runtime)
            self.position = None
        progress = tqdm(total=n_batches, initial=first, desc=f"{self.stage.name} epoch {epoch + 1}/{n_epochs}",
                        disable=not self.runtime.is_main)
        try:
            batches = _batches_after(self.train_loader, min(first, n_batches), rng, self.runtime.device)
            for i, batch in enumerate(batches, start=first):
                if i >= n_batches:
                    break
                if self.train_batch(epoch, i, batch, n_batches, done, progress, stop):
                    break
        finally:
            progress.close()  # also when an error ends the epoch
        return done

    def train_batch(self, epoch: int, i: int, batch: Any, n_batches: int, done: _EpochProgress, progress: tqdm,
                    stop: StopOnSignal) -> bool:
        """Batch ``i`` of the epoch: the train step, logging and, at an optimizer step, a step checkpoint when one is
        due or a signal came. Returns True when a signal stopped the run."""
        cfg, runtime, state, stage = self.cfg, self.runtime, self.state, self.stage
        t0 = time.perf_counter()
        accum = cfg.gradient_accumulation_steps
        group_start = (i // accum) * accum
        group_size = min(accum, n_batches - group_start)
        boundary = i == group_start + group_size - 1
        measure = cfg.fast_dev_run and i == n_batches - 1 and (i > 0 or n_batches == 1)
        if measure:  # the last fast_dev_run step (the first one allocates optimizer states)
            self.meter.start(stage_tensor_bytes(stage, batch))
        where = f"epoch {epoch + 1}, batch {i + 1}"
        logs: dict[str, float] | None = None
        stepped = False  # an optimizer step was taken: not a skipped batch, nor a step fp16 loss scaling skipped
        try:
            logs, stepped = train_step(stage, batch, epoch, self.scalers, runtime, group_size=group_size,
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
            self.step_peak_mib = self.meter.peak_mib()
        if stepped:
            state.global_step += 1
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
        self.step_times.append(time.perf_counter() - t0)
        compiled = [c.name for c in getattr(stage, "compiled", {}).values() if not c.eager]
        if compiled and not self.compile_reported:
            self.compile_reported = True
            runtime.print(f"device.compile: the first training step took {self.step_times[-1]:.1f} s, compiling the "
                          f"{' and '.join(compiled)} included (once per run and input shape)")
        progress.update(1)
        if logs is not None:
            done.counted += 1
            for key, value in logs.items():
                done.sums[key] = done.sums.get(key, 0.0) + float(value)
            progress.set_postfix({k: f"{v:.4g}" for k, v in logs.items()})
        if self.writer is not None and stepped and state.global_step % cfg.log_interval == 0:
            self.log_step(logs)
        if not boundary or cfg.fast_dev_run:
            return False
        signum = max_over_ranks(stop.signum, runtime)  # every process stops after the same step
        due = stepped and cfg.every_n_steps and state.global_step % cfg.every_n_steps == 0
        if due or signum:
            self.last_saved = _save_step_checkpoint(stage, self.scalers, state, epoch, i + 1, done, cfg, runtime)
        if not signum:
            return False
        state.stopped_by = signal.Signals(signum).name
        runtime.print(
            f"{state.stopped_by}: stopped after optimizer step {state.global_step} (epoch {epoch + 1}, batch {i + 1} "
            f"of {n_batches}); checkpoint written to {self.last_saved}. To resume, run the same command with "
            f"{self.resume_command}"
        )
        return True

    def log_step(self, logs: dict[str, float]) -> None:
        """TensorBoard scalars of an optimizer step: the stage's, the learning rates, the batches skipped so far."""
        step = self.state.global_step
        for key, value in logs.items():
            self.writer.add_scalar(f"train/{key}", float(value), step)
        for name, opt in self.stage.optimizers.items():
            self.writer.add_scalar(f"lr/{name}", opt.param_groups[0]["lr"], step)
        if self.state.skipped_batches:
            self.writer.add_scalar("train/skipped_batches", self.state.skipped_batches, step)

    # ------------------------------------------------------------------------------------- end of an epoch
    def end_of_epoch_logs(self, epoch: int, done: _EpochProgress, epoch_start: float) -> tuple[dict[str, float], bool]:
        """The epoch's means (over processes too), validation when due, pictures when due; logged, printed and
        added to the history. Returns the epoch's logs and whether it validated."""
        cfg, runtime, stage, val_loader = self.cfg, self.runtime, self.stage, self.val_loader
        max_batches = cfg.fast_dev_run_batches if cfg.fast_dev_run else None
        epoch_logs = {f"train_{k}": all_reduce_mean(v / max(1, done.counted), runtime) for k, v in done.sums.items()}
        if cfg.on_nonfinite == "skip":
            epoch_logs["skipped_batches"] = float(self.state.skipped_batches)
        epoch_logs["train_seconds"] = time.perf_counter() - epoch_start
        # validate every val_interval epochs and after the last one, so best_model.pt always exists
        validated = val_loader is not None and (cfg.fast_dev_run or (epoch + 1) % cfg.val_interval == 0
                                                or epoch + 1 == cfg.n_epochs)
        if validated:
            val = validate(stage, val_loader, runtime, max_batches)
            epoch_logs.update({f"val_{k}" if not k.startswith("val_") else k: v for k, v in val.items()})
        # pictures every visualize_interval epochs, whether or not this epoch validates
        if (val_loader is not None and runtime.is_main
                and (cfg.fast_dev_run or (epoch + 1) % cfg.visualize_interval == 0)):
            with torch.no_grad():
                images = stage.visualize(next(iter(val_loader)), quick=cfg.fast_dev_run)
            for tag, image in images.items():
                if self.writer is not None:
                    self.writer.add_image(tag, image, epoch + 1)
            if cfg.fast_dev_run:
                runtime.print(f"fast_dev_run: visualisation made {len(images)} image(s)")
        if self.writer is not None:
            for key, value in epoch_logs.items():
                self.writer.add_scalar(f"epoch/{key}", value, epoch + 1)
        runtime.print(f"{stage.name} epoch {epoch + 1}: " + ", ".join(f"{k}={v:.5g}" for k, v in epoch_logs.items()))
        self.state.history.append({"epoch": epoch + 1, **epoch_logs})
        return epoch_logs, validated

    def finish_dev_run(self, epoch: int) -> None:
        """``fast_dev_run``: serialise the checkpoint a real run would write into memory, and print the summary."""
        self.state.epoch = epoch + 1
        buffer = io.BytesIO()
        torch.save(_checkpoint(self.stage, self.scalers, self.state, epoch, self.cfg), buffer)
        self.runtime.print(f"fast_dev_run: checkpoint serialised in memory ({buffer.tell() / 2**20:.1f} MiB)")
        _print_dev_run_summary(self.runtime, self.step_times, self.step_peak_mib, self.meter)

    def save_epoch(self, epoch: int, epoch_logs: dict[str, float], validated: bool) -> None:
        """Rank 0 writes ``latest_checkpoint.pt`` (every ``save_interval`` epochs and after the last) and
        ``best_model.pt`` (when validation improved); every process raises when that failed."""
        cfg, runtime, state = self.cfg, self.runtime, self.state
        improved = validated and epoch_logs["val_loss"] < state.best_metric
        if improved:
            state.best_metric = epoch_logs["val_loss"]
        state.epoch = epoch + 1
        error = ""
        if runtime.is_main:
            ckpt = _checkpoint(self.stage, self.scalers, state, epoch, cfg)
            last = epoch + 1 == cfg.n_epochs
            try:
                if (epoch + 1) % cfg.save_interval == 0 or last:
                    write_checkpoint(ckpt, cfg.output_dir / "latest_checkpoint.pt")
                    self.last_saved = cfg.output_dir / "latest_checkpoint.pt"
                if cfg.save_best and (improved or (self.val_loader is None and last)):
                    write_checkpoint(ckpt, cfg.output_dir / "best_model.pt")
                    runtime.print(f"  saved best model (val_loss={state.best_metric:.5g}) to "
                                  f"{cfg.output_dir / 'best_model.pt'}")
            except RunError as exc:
                error = str(exc)
            if self.on_checkpoint is not None and not error:
                self.on_checkpoint(ckpt)
        _raise_on_any_rank(error, runtime)  # also keeps the processes in step, like a barrier


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
        "state_dict": {name: _contiguous(unwrap(m).state_dict()) for name, m in stage.modules.items()},
        "optimizers": {name: _contiguous(opt.state_dict()) for name, opt in stage.optimizers.items()},
        "scalers": {name: s.state_dict() for name, s in scalers.items()},
        "settings": cfg.settings,
        **({"mlflow_run_id": state.mlflow_run_id} if state.mlflow_run_id is not None else {}),
        **stage.checkpoint_extra(),
    }


def _contiguous(obj: Any) -> Any:
    """``obj`` (a state dict, nested dicts and lists) with every tensor in the standard contiguous layout: a run with
    ``device.channels_last`` writes the same checkpoint layout as one without (a no-op for contiguous tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.contiguous()
    if isinstance(obj, dict):
        out = type(obj)((k, _contiguous(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module's state_dict carries its version metadata
            out._metadata = obj._metadata
        return out
    if isinstance(obj, list):
        return [_contiguous(v) for v in obj]
    return obj


def _print_dev_run_summary(runtime: Runtime, step_times: list[float], peak_mib: float | None,
                           meter: PeakMeter) -> None:
    timed = step_times[1:] or step_times  # the first step includes warm-up
    runtime.print(f"fast_dev_run: {len(step_times)} training step(s), {sum(timed) / max(1, len(timed)):.3f} s/step")
    if peak_mib is not None:
        runtime.print(f"fast_dev_run: peak memory of the last training step {peak_mib:.0f} MiB ({meter.method})")
    runtime.print("fast_dev_run: no checkpoints or logs were written.")
