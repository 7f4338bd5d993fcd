"""The memory check before a stage trains: estimate one training step's peak, compare it with what the device can
still give, and stop before any work with one line (the need, what is available, and ``plan``'s ``--set`` changes,
most effective first) when it will not fit.

How the estimate is made: the stage is built from the settings exactly as ``plan`` builds it (the real networks,
losses and optimizers, random weights), and ``engine.train_step`` runs twice on PyTorch's fake tensors
(``memory.estimate_peak_bytes``): shapes and dtypes flow through every operation, nothing is computed or allocated.
The peak of live tensors in the second step (weights, gradients, optimizer states, activations, temporaries) is what
``torch.cuda.max_memory_allocated`` would report. The need adds a margin for what tensors do not show: on the CPU
10 % plus 256 MiB (allocator slack, oneDNN workspaces), on CUDA 15 % plus 512 MiB (the caching allocator's
fragmentation, cuDNN workspaces). ``device.memory_check: false`` turns the check off.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from ..engine import make_scalers, train_step
from ..errors import OutOfMemory
from ..memory import MIB, available_bytes, estimate_peak_bytes
from ..runtime import Runtime, resolve_precision
from ..settings import Settings

# what the estimate of live tensors leaves out, by device type: (factor, MiB added)
MARGIN = {"cpu": (1.10, 256.0), "cuda": (1.15, 512.0)}
# batch tensors up to this many elements (labels, covariates) stay real in the estimate
_REAL_INPUT_NUMEL = 4096
_SECTIONS = {"autoencoder": "autoencoder.training", "diffusion": "diffusion.training"}


def step_tensors(stage: Any, batch: dict[str, Any]) -> list[torch.Tensor]:
    """Every tensor a stage holds between steps: parameters, buffers and gradients of its networks (and of the
    stage's other modules, such as a frozen autoencoder or a loss network), optimizer states, and the batch."""
    modules = {id(m): m for m in stage.modules.values()}
    modules.update({id(v): v for v in vars(stage).values() if isinstance(v, torch.nn.Module)})
    out: list[torch.Tensor] = []
    for module in modules.values():
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
    del stage, batch, fake_batch, scalers
    factor, extra = MARGIN["cuda" if device.type == "cuda" else "cpu"]
    name = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[amp]
    return {"peak_mib": peak, "need_mib": peak * factor + extra, "precision": name, "batch_size": batch_size,
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


def check_training_memory(settings: Settings, stage_name: str, print_fn: Any = print) -> dict[str, Any] | None:
    """Before ``stage_name`` ("autoencoder" or "diffusion") trains: estimate a step at the configured batch size, print
    one line about it, and raise :class:`~monai_diffusion.errors.OutOfMemory` when it needs more than the device can
    give. Returns the estimate (None when the check is off or does not apply: ``device.memory_check: false``, a
    VQ-VAE stage 1, a pixel-space stage 2, whose stages ``plan`` does not build)."""
    from ..runtime import choose_device

    if not settings.device.memory_check:
        return None
    if settings.autoencoder.type != "kl" or (stage_name == "diffusion" and settings.diffusion.space == "pixel"):
        return None
    local_rank = os.environ.get("LOCAL_RANK")  # under torchrun each process checks its own GPU
    device = choose_device(settings.device.use_cuda, settings.device.gpu_id,
                           int(local_rank) if local_rank is not None else None)
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
    sets = _advice(settings, stage_name, device, est["need_mib"], avail_mib)
    fix = ("; to fit, try (most effective first): " + " | ".join(sets)) if sets else ""
    raise OutOfMemory(
        f"{what} needs about {est['need_mib'] / 1024:.1f} GiB (estimated: {est['peak_mib'] / 1024:.1f} GiB of tensors "
        f"plus margin) but {device.type} has {avail_mib / 1024:.1f} GiB available ({source}){fix}; "
        f"monai-diffusion-plan --budget-gb {avail_mib / 1024:.0f} explains, and --set device.memory_check=false runs "
        "anyway", section=_SECTIONS[stage_name])
