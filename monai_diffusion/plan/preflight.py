"""The memory check before a stage trains: estimate one training step's peak, compare it with what the device can
still give, and stop before any work with one line (the need, what is available, and ``plan``'s ``--set`` changes,
most effective first) when it will not fit.

How the estimate is made: the stage is built from the settings exactly as ``plan`` builds it (the real networks,
losses and optimizers, random weights), and ``engine.train_step`` runs twice on PyTorch's fake tensors
(``memory.estimate_peak_bytes``): shapes and dtypes flow through every operation, nothing is computed or allocated.
The peak of live tensors in the second step (weights, gradients, optimizer states, activations, temporaries) is what
``torch.cuda.max_memory_allocated`` would report; on the CPU each forward convolution also counts oneDNN's blocked
copies while it runs (``memory.cpu_convolution_scratch``). The need adds a margin for what that does not show
(``memory.MARGIN``): on the CPU 20 % plus 256 MiB (oneDNN's copies in the backward pass, allocator slack), on CUDA
15 % plus 512 MiB (the caching allocator's fragmentation, cuDNN workspaces). ``device.memory_check: false`` turns
the check off.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..engine import make_scalers, train_step
from ..errors import ConfigError, OutOfMemory
from ..memory import MIB, available_bytes, estimate_peak_bytes, stage_modules, with_margin
from ..runtime import Runtime, resolve_precision
from ..settings import Settings

# batch tensors up to this many elements (labels, covariates) stay real in the estimate
_REAL_INPUT_NUMEL = 4096
_SECTIONS = {"autoencoder": "autoencoder.training", "diffusion": "diffusion.training"}


def step_tensors(stage: Any, batch: dict[str, Any]) -> list[torch.Tensor]:
    """Every tensor a stage holds between steps: parameters, buffers and gradients of its networks (and of the
    stage's other modules, such as a frozen autoencoder or a loss network), optimizer states, and the batch."""
    out: list[torch.Tensor] = []
    for module in stage_modules(stage):
        for tensor in [*module.parameters(), *module.buffers()]:
            out.append(tensor)
            if tensor.grad is not None:
                out.append(tensor.grad)
    for opt in stage.optimizers.values():
        out += [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    out += [v for v in batch.values() if isinstance(v, torch.Tensor)]
    return out


def estimate_step(settings: Settings, stage_name: str, device: torch.device, batch_size: int) -> dict[str, Any]:
    """Estimate one training step of ``stage_name`` at ``batch_size`` on ``device`` (see the module docstring).

    Returns ``peak_mib`` (live tensors at the step's worst moment), ``need_mib`` (with the margin), ``precision``,
    ``batch_size`` and ``seconds`` (how long the estimate took).
    """
    from .measure import build_stage  # the stage exactly as plan measures it

    t0 = time.perf_counter()
    amp = resolve_precision(settings.device.mixed_precision, device)
    runtime = Runtime(device, amp)  # one process: the estimate is per device
    stage, batch, epoch, _notes = build_stage(stage_name, settings, runtime, batch_size)
    scalers = make_scalers(stage, runtime)
    clip = getattr(settings, stage_name).training.grad_clip_norm
    fake_batch: dict[str, Any] = {}

    def step() -> None:
        if not fake_batch:  # inside the fake mode: volumes become fake; labels and covariates stay real (and small)
            fake_batch.update({k: torch.empty(v.shape, dtype=v.dtype, device=device)
                               if isinstance(v, torch.Tensor) and v.numel() > _REAL_INPUT_NUMEL else v
                               for k, v in batch.items()})
        train_step(stage, fake_batch, epoch, scalers, runtime, grad_clip_norm=clip, global_step=0,
                   where="memory check")

    peak = estimate_peak_bytes(step, lambda: step_tensors(stage, fake_batch)) / MIB
    name = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[amp]
    return {"peak_mib": peak, "need_mib": with_margin(peak, device), "precision": name, "batch_size": batch_size,
            "seconds": time.perf_counter() - t0}


def _advice(settings: Settings, stage_name: str, device: torch.device, need_mib: float,
            available_mib: float) -> list[str]:
    """``plan``'s ``--set`` changes for this stage at this budget, most effective first (at most four)."""
    from . import make_plan

    plan = make_plan(settings, measure=False, device=str(device),
                     batch_size=getattr(settings, stage_name).training.batch_size)
    plan[stage_name]["measurement"] = {"ok": True, "peak_mib": need_mib}
    from .advice import apply_budget

    apply_budget(plan, settings, available_mib / 1024)
    sets = [" ".join(f"--set {s}" for s in entry["set"]) for entry in plan["advice"]
            if entry["stage"] == stage_name and entry["kind"] == "knob" and entry["set"]]
    return sets[:4]


def _estimable(settings: Settings, stage_name: str) -> bool:
    """Whether ``plan`` builds this stage (the KL autoencoder and the latent UNet; not a VQ-VAE or a pixel UNet)."""
    return settings.autoencoder.type == "kl" and not (stage_name == "diffusion" and settings.diffusion.space == "pixel")


def _device(settings: Settings) -> torch.device:
    from ..runtime import choose_device

    local_rank = os.environ.get("LOCAL_RANK")  # under torchrun each process checks its own GPU
    return choose_device(settings.device.use_cuda, settings.device.gpu_id,
                         int(local_rank) if local_rank is not None else None)


def _with_batch(settings: Settings, stage_name: str, batch: int, accumulation: int) -> Settings:
    """``settings`` with ``<stage>.training.batch_size`` and ``gradient_accumulation_steps`` replaced."""
    section = getattr(settings, stage_name)
    training = dataclasses.replace(section.training, batch_size=batch, gradient_accumulation_steps=accumulation)
    return dataclasses.replace(settings, **{stage_name: dataclasses.replace(section, training=training)})


def _saved_batch(settings: Settings, stage_name: str) -> tuple[int, int] | None:
    """A resumed run's batch size and accumulation, from the ``config.yaml`` its first start wrote."""
    import yaml

    section = getattr(settings, stage_name)
    if section.checkpoints.resume_from is None:
        return None
    record = Path(section.checkpoints.output_dir) / "config.yaml"
    if not record.is_file():
        return None
    saved = (yaml.safe_load(record.read_text(encoding="utf-8")) or {}).get(stage_name, {}).get("training", {})
    batch, accumulation = saved.get("batch_size"), saved.get("gradient_accumulation_steps")
    if isinstance(batch, int) and isinstance(accumulation, int):
        return batch, accumulation
    return None


def resolve_auto_batch(settings: Settings, stage_name: str, print_fn: Any = print) -> tuple[Settings, dict | None]:
    """``<stage>.training.batch_size: auto``: the largest power-of-two batch (up to ``effective_batch_size``) whose
    estimated step fits the device, and ``gradient_accumulation_steps = ceil(effective_batch_size / batch)``, so that
    each optimizer step sees at least ``effective_batch_size`` volumes (fewer than one batch more). A resumed run
    takes the values its ``config.yaml`` recorded. Returns the settings with both replaced (unchanged without auto)
    and the estimate of the chosen batch.

    Raises:
        OutOfMemory: not even a batch of one fits.
    """
    t = getattr(settings, stage_name).training
    if t.batch_size != "auto":
        return settings, None
    if not _estimable(settings, stage_name):
        raise ConfigError(f"{stage_name}.training.batch_size: auto needs the memory estimate, which covers the KL "
                          "autoencoder and the latent UNet, not a VQ-VAE or a pixel-space UNet; give a number",
                          key=f"{stage_name}.training.batch_size")
    target = int(t.effective_batch_size)
    saved = _saved_batch(settings, stage_name)
    if saved is not None:
        print_fn(f"{stage_name}.training.batch_size auto: resuming with the run's batch_size {saved[0]} and "
                 f"gradient_accumulation_steps {saved[1]} (its config.yaml)")
        return _with_batch(settings, stage_name, *saved), None
    device = _device(settings)
    available, source = available_bytes(device)
    candidates = [b for b in (2 ** i for i in range(12)) if b < target] + [target]
    chosen, est = None, None
    for batch in reversed(candidates):  # largest first: most configs fit at once or after a halving or two
        trial = estimate_step(settings, stage_name, device, batch)
        if available is None or trial["need_mib"] <= available / MIB:
            chosen, est = batch, trial
            break
        est = trial
    if chosen is None:
        resolved = _with_batch(settings, stage_name, 1, target)
        assert est is not None
        raise _too_large(resolved, stage_name, device, est, available / MIB, source)
    accumulation = -(-target // chosen)
    room = "available memory unknown" if available is None else f"{available / 2**30:.1f} GiB available"
    print_fn(f"{stage_name}.training.batch_size auto: {chosen} (one step ~{est['need_mib'] / 1024:.1f} GiB, {room} "
             f"on {device.type}), gradient_accumulation_steps {accumulation}: {chosen * accumulation} volumes per "
             f"optimizer step (effective_batch_size {target})")
    est["available_mib"] = None if available is None else available / MIB
    return _with_batch(settings, stage_name, chosen, accumulation), est


def prepare_training(settings: Settings, stage_name: str, print_fn: Any = print) -> Settings:
    """What the command line does before a stage trains: resolve ``batch_size: auto``, then the memory check.
    Returns the settings to train with (integers for the batch size and accumulation)."""
    if not settings.device.memory_check and getattr(settings, stage_name).training.batch_size == "auto":
        raise ConfigError(f"{stage_name}.training.batch_size: auto finds the batch with the memory estimate, which "
                          "device.memory_check: false turns off; give a number", key=f"{stage_name}.training.batch_size")
    settings, est = resolve_auto_batch(settings, stage_name, print_fn)
    if est is None:
        check_training_memory(settings, stage_name, print_fn)
    return settings


def check_training_memory(settings: Settings, stage_name: str, print_fn: Any = print) -> dict[str, Any] | None:
    """Before ``stage_name`` ("autoencoder" or "diffusion") trains: estimate a step at the configured batch size, print
    one line about it, and raise :class:`~monai_diffusion.errors.OutOfMemory` when it needs more than the device can
    give. Returns the estimate (None when the check is off or does not apply: ``device.memory_check: false``, a
    VQ-VAE stage 1, a pixel-space stage 2, whose stages ``plan`` does not build)."""
    if not settings.device.memory_check or not _estimable(settings, stage_name):
        return None
    device = _device(settings)
    batch = getattr(settings, stage_name).training.batch_size
    try:
        est = estimate_step(settings, stage_name, device, batch)
    except Exception as exc:  # noqa: BLE001 - an estimate that cannot be made must not stop a run that may fit
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print_fn(f"memory: the estimate of one {stage_name} training step failed ({type(exc).__name__}: "
                 f"{first[:200]}); training without the check")
        return None
    available, source = available_bytes(device)
    what = f"{stage_name} training step (batch {batch}, {est['precision']})"
    if available is None:
        print_fn(f"memory: ~{est['need_mib'] / 1024:.1f} GiB estimated for one {what}; available memory unknown "
                 f"({source})")
        return est
    avail_mib = available / MIB
    est["available_mib"] = avail_mib
    if est["need_mib"] <= avail_mib:
        print_fn(f"memory: ~{est['need_mib'] / 1024:.1f} GiB estimated for one {what}, {avail_mib / 1024:.1f} GiB "
                 f"available on {device.type}")
        return est
    raise _too_large(settings, stage_name, device, est, avail_mib, source)


def _too_large(settings: Settings, stage_name: str, device: torch.device, est: dict[str, Any], avail_mib: float,
               source: str) -> OutOfMemory:
    """The one-line error of a step that will not fit, with plan's ``--set`` changes."""
    what = f"{stage_name} training step (batch {est['batch_size']}, {est['precision']})"
    sets = _advice(settings, stage_name, device, est["need_mib"], avail_mib)
    fix = ("; to fit, try (most effective first): " + " | ".join(sets)) if sets else ""
    return OutOfMemory(
        f"{what} needs about {est['need_mib'] / 1024:.1f} GiB (estimated: {est['peak_mib'] / 1024:.1f} GiB of tensors "
        f"plus margin) but {device.type} has {avail_mib / 1024:.1f} GiB available ({source}){fix}; "
        f"monai-diffusion-plan --budget-gb {avail_mib / 1024:.0f} explains, and --set device.memory_check=false runs "
        "anyway", section=_SECTIONS[stage_name])
