"""Measure one training step of each stage: the real stage objects driven through ``engine.train_step``.

Each stage is measured in a fresh process (``python -m monai_diffusion.plan --worker REQUEST RESULT``) whose
environment adds :data:`monai_diffusion.memory.CLEAN_MALLOC_ENV`, so that neither the planning process nor the other
stage leaves memory behind that a peak could hide in. In that process:

* stage 1 is :func:`monai_diffusion.stage1.build_autoencoder_stage` (networks, optimizers; the perceptual loss when
  it is on and its weights file exists), at the first epoch with the adversarial loss on when ``adv_weight > 0``;
* stage 2 is :func:`monai_diffusion.stage2.build_diffusion_stage` (UNet, EMA copy, optimizer, learning-rate
  schedule) around a frozen autoencoder built from the ``autoencoder`` settings, as training rebuilds it from its
  checkpoint;
* the batch is random and shaped like the loader's: ``{"image": ...}``, or ``{"z_mu": ..., "z_sigma": ...}`` with
  ``diffusion.training.cache_latents``, plus class labels and covariates when conditioning is configured;
* one unmeasured warm-up step (it allocates the optimizer states, pages in kernels, tunes cuDNN), then ``steps``
  measured steps, each exactly as ``fast_dev_run`` measures its last step:
  ``PeakMeter.start(stage_tensor_bytes(stage, batch))``, ``train_step``, ``PeakMeter.peak_mib()``;
* stage 2 without cached latents also measures encoding the batch alone (``DiffusionStage.encode``), so that the
  advice can tell when encoding is the peak.

Inference (``"inference"``, :func:`measure_inference`) is measured the same way, in its own process: one volume
encoded as latent caching and evaluate encode it, and a batch of ``sampling.batch_size`` latents decoded as sampling
decodes them, each in exact tiles when ``autoencoder.tile_size`` / ``sampling.tile_size`` say so; the peak is the
larger of the two.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..settings import Settings

# ------------------------------------------------------------------------------------------------ parent side
def worker_env() -> dict[str, str]:
    """The environment of a measurement process: this one, with the folders this process imported both packages
    from first on ``PYTHONPATH``, and :data:`~monai_diffusion.memory.CLEAN_MALLOC_ENV`."""
    import generative

    from ..memory import CLEAN_MALLOC_ENV

    roots = [str(Path(__file__).resolve().parents[2]), str(Path(generative.__file__).resolve().parents[1])]
    env = dict(os.environ)
    given = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*roots, *given]))
    env.update(CLEAN_MALLOC_ENV)
    return env


class _Worker:
    """One stage's measurement in a fresh process.

    The process starts at once and imports torch, MONAI and the stages, then waits for a line on its stdin; so the
    imports of both stages overlap while the measurements themselves run one at a time.
    """

    def __init__(self, stage: str, s: Settings, device: str, precision: str, batch: int, steps: int) -> None:
        self.stage = stage
        self.tmp = Path(tempfile.mkdtemp(prefix="monai-diffusion-plan-"))
        self.out = self.tmp / "result.json"
        request = {"settings": s, "stage": stage, "device": device, "precision": precision, "batch": batch,
                   "steps": steps}
        (self.tmp / "request.pkl").write_bytes(pickle.dumps(request))
        cmd = [sys.executable, "-m", "monai_diffusion.plan", "--worker", str(self.tmp / "request.pkl"), str(self.out)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=worker_env())

    def wait_ready(self, limit: float = 300.0) -> None:
        """Wait until the worker has done its imports (or exited, or ``limit`` seconds passed)."""
        t0 = time.perf_counter()
        while not (self.tmp / "ready").exists() and self.proc.poll() is None and time.perf_counter() - t0 < limit:
            time.sleep(0.05)

    def run(self, timeout: float | None) -> dict[str, Any]:
        """Let the worker measure; its result, or why there is none."""
        t0 = time.perf_counter()
        try:
            stdout, stderr = self.proc.communicate("go\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cancel()
            return {"ok": False, "error": f"the measurement did not finish within {timeout:g} s (--timeout)"}
        except BaseException:
            self.cancel()
            raise
        wall = time.perf_counter() - t0
        try:
            if self.out.is_file():
                result = json.loads(self.out.read_text())
                result["worker_seconds"] = wall
                return result
            lines = [line.strip() for line in (stderr or stdout or "").splitlines() if line.strip()]
            why = f"exit code {self.proc.returncode}"
            if self.proc.returncode in (-9, 137):
                why += " (killed: most likely out of memory)"
            last = lines[-1][:400] if lines else ""
            return {"ok": False, "error": f"measurement process failed, {why}" + (f": {last}" if last else ""),
                    "stderr_tail": lines[-20:]}
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def cancel(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.communicate(timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)


def measure_stages(stages: Sequence[str], s: Settings, device: str, precision: str, batch: int, steps: int,
                   timeout: float | None) -> dict[str, dict[str, Any]]:
    """Measure ``stages`` ("autoencoder", "diffusion"), each in its own fresh process, one after the other.

    Args:
        stages: which stages to measure.
        s: validated settings.
        device: "cpu" or "cuda:N".
        precision: "fp32", "fp16" or "bf16" (autocast dtype of the step).
        batch: batch size of the measured steps.
        steps: measured steps after the warm-up step.
        timeout: seconds allowed per measurement process (None = no limit).

    Returns:
        ``{stage: result}``; a result has ``ok`` and either the figures (see :func:`measure_stage`) or ``error``.
    """
    workers = [_Worker(stage, s, device, precision, batch, steps) for stage in stages]
    results: dict[str, dict[str, Any]] = {}
    try:
        for w in workers:  # all imports done first, so that no import runs beside a measurement
            w.wait_ready()
        for w in workers:
            results[w.stage] = w.run(timeout)
    finally:
        for w in workers:
            if w.stage not in results:
                w.cancel()
    return results


# ------------------------------------------------------------------------------------------------ stages and batches
def build_stage(name: str, s: Settings, runtime: Any, batch: int) -> tuple[Any, dict[str, Any], int, list[str]]:
    """The real stage object of ``name`` from the settings, a random batch shaped like its loader's, the epoch to
    train it at, and notes on what the step includes.

    Args:
        name: "autoencoder" or "diffusion".
        s: validated settings.
        runtime: the ``runtime.Runtime`` to build on.
        batch: batch size.
    """
    if name == "autoencoder":
        return _autoencoder_stage(s, runtime, batch)
    if name == "diffusion":
        return _diffusion_stage(s, runtime, batch)
    raise ValueError(f"stage must be 'autoencoder' or 'diffusion', got {name!r}")


def measure_inference(s: Settings, runtime: Any) -> dict[str, Any]:
    """Peak memory and time of the autoencoder outside training: encoding one ``data.voxel_size`` volume (latent
    caching, stage 2's encoding, evaluate) and decoding ``sampling.batch_size`` latents (sampling), with the
    configured tiles, under
    ``torch.no_grad()`` and the stage's autocast; random weights (memory does not depend on them).

    Returns:
        ``peak_mib`` (the larger phase), ``static_mib`` (the network's weights), ``step_mib``, ``phases``
        (``{"encode": ..., "decode": ...}``), ``seconds`` per phase, ``encode_tile`` / ``decode_tile``, ``method``.
    """
    import torch

    from ..memory import MIB, PeakMeter
    from ..models import autoencoder_args, autoencoder_from_args, decode_latent, encode_to_latent
    from .geometry import inference_info, latent_spatial

    ae = s.autoencoder
    device = runtime.device
    net = autoencoder_from_args(autoencoder_args(ae), use_flash_attention=ae.use_flash_attention)
    net = net.eval().to(device).requires_grad_(False)
    static = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    info = inference_info(s)
    enc_tile, dec_tile = info["encode_tile"], info["decode_tile"]
    meter = PeakMeter(device)
    phases: dict[str, float] = {}
    seconds: dict[str, float] = {}

    image = torch.rand(1, ae.in_channels, *s.data.voxel_size, device=device)
    latent = torch.randn(s.sampling.batch_size, ae.latent_channels, *latent_spatial(s), device=device)
    for name, fn, inp in (("encode", lambda x: encode_to_latent(net, x, enc_tile)[0], image),
                          ("decode", lambda z: decode_latent(net, z, dec_tile), latent)):
        meter.start(static + inp.numel() * inp.element_size())
        t0 = time.perf_counter()
        with torch.no_grad(), runtime.autocast():
            out = fn(inp)
        _sync(device)
        seconds[name] = time.perf_counter() - t0
        phases[name] = meter.peak_mib()
        del out
    peak = max(phases.values())
    result = {"method": meter.method, "peak_mib": peak, "static_mib": static / MIB,
              "step_mib": max(0.0, peak - static / MIB), "phases": phases, "seconds": seconds,
              "encode_tile": enc_tile, "decode_tile": dec_tile}
    if meter.cuda:
        result["reserved_mib"] = meter.reserved_mib
    return result


def _autoencoder_stage(s: Settings, runtime: Any, batch: int) -> tuple[Any, dict[str, Any], int, list[str]]:
    import torch

    from ..errors import RunError
    from ..stage1 import build_autoencoder_stage, build_perceptual_loss

    ae, t = s.autoencoder, s.autoencoder.training
    notes: list[str] = []
    perceptual = None
    if t.use_perceptual_loss:
        path = t.perceptual_weights_path
        if path and Path(path).expanduser().is_file():
            try:
                perceptual = build_perceptual_loss(t, ae.spatial_dims)
                notes.append(f"includes the perceptual loss ({t.perceptual_network})")
            except RunError as exc:
                notes.append(f"perceptual loss left out: {exc}")
        else:
            notes.append(f"perceptual loss left out: weights file {path!r} not found")
    stage = build_autoencoder_stage(s, runtime, perceptual=perceptual)
    if t.adv_weight > 0:
        notes.append("generator + discriminator step after warm-up (adversarial loss on)")
    else:
        notes.append("no adversarial loss (adv_weight 0)")
    images = torch.rand(batch, ae.in_channels, *s.data.voxel_size)
    # the first epoch with the adversarial loss on (when there is one)
    return stage, {"image": images}, t.autoencoder_warm_up_n_epochs, notes


def _diffusion_stage(s: Settings, runtime: Any, batch: int) -> tuple[Any, dict[str, Any], int, list[str]]:
    import torch

    from ..models import autoencoder_args, autoencoder_from_args
    from ..conditioning import Conditioner
    from ..stage2 import build_diffusion_stage
    from .geometry import latent_spatial

    ae, df, t = s.autoencoder, s.diffusion, s.diffusion.training
    cond = df.conditioning
    notes: list[str] = []
    # as stage 2 rebuilds it from its checkpoint: architecture from the settings, frozen, in eval mode
    autoencoder = autoencoder_from_args(autoencoder_args(ae), use_flash_attention=ae.use_flash_attention)
    autoencoder = autoencoder.eval().to(runtime.device).requires_grad_(False)
    conditioner = Conditioner(cond.class_key, cond.num_classes, cond.covariate_keys,
                              {k: (0.0, 1.0) for k in cond.covariate_keys})
    stage = build_diffusion_stage(s, runtime, autoencoder, conditioner, steps_per_epoch=1)
    if t.cache_latents:
        shape = (batch, ae.latent_channels, *latent_spatial(s))
        data: dict[str, Any] = {"z_mu": torch.randn(shape), "z_sigma": torch.rand(shape) + 0.1}
        notes.append("cached latents (diffusion.training.cache_latents): no encoding in the step")
    else:
        data = {"image": torch.rand(batch, ae.in_channels, *s.data.voxel_size)}
        notes.append("includes encoding the volume with the frozen autoencoder (no gradients)")
    if cond.class_key is not None:
        data[cond.class_key] = torch.randint(0, cond.num_classes, (batch,))
        notes.append(f"class-conditioned ({cond.num_classes} classes)")
    for key in cond.covariate_keys:
        data[key] = torch.randn(batch, dtype=torch.float64)
    if cond.covariate_keys:
        notes.append(f"{len(cond.covariate_keys)} covariate(s) as cross-attention context")
    if t.ema_decay is not None:
        notes.append("includes the EMA update of the UNet's copy")
    return stage, data, 0, notes


# ------------------------------------------------------------------------------------------------ the measurement
def _sync(device: Any) -> None:
    """Wait for the device's queued work (CUDA), so that times and peaks cover it."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def measure_stage(stage: Any, batch: dict[str, Any], epoch: int, runtime: Any, steps: int = 1,
                  grad_clip_norm: float | None = None) -> dict[str, Any]:
    """Peak memory and time of ``steps`` training steps of ``stage`` after one warm-up step, each measured as
    ``engine.run_loop``'s ``fast_dev_run`` measures its last step.

    Args:
        stage: a built stage (see :func:`build_stage`).
        batch: a batch as its loader gives it.
        epoch: the epoch the steps belong to.
        runtime: the ``runtime.Runtime`` the stage was built on.
        steps: measured steps (>= 1).
        grad_clip_norm: gradient clipping of the stage's training settings.

    Returns:
        ``peak_mib`` (largest over the steps), ``static_mib`` (tensors held before the step), ``step_mib``,
        ``phases`` (``{"train step": peak}``, plus ``"encode"`` when a stage-2 step encodes images),
        ``step_seconds`` (fastest), ``step_seconds_each`` (every measured step, in order), ``step_cpu_seconds_each``
        (the process's CPU time of each, all threads), ``first_step_seconds`` (warm-up), ``method``, and on CUDA
        ``reserved_mib``.
    """
    from ..engine import make_scalers, stage_tensor_bytes, train_step
    from ..memory import MIB, PeakMeter

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = runtime.device
    scalers = make_scalers(stage, runtime)

    def step(global_step: int) -> None:
        train_step(stage, batch, epoch, scalers, runtime, grad_clip_norm=grad_clip_norm, global_step=global_step,
                   where="plan")

    _sync(device)
    t0 = time.perf_counter()
    step(0)  # warm-up: allocates the optimizer states, pages in kernels and libraries; not measured
    _sync(device)
    first = time.perf_counter() - t0
    meter = PeakMeter(device)
    peaks: list[float] = []
    times: list[float] = []
    cpu_times: list[float] = []
    static = 0.0
    for i in range(steps):
        static_bytes = stage_tensor_bytes(stage, batch)
        static = static_bytes / MIB
        meter.start(static_bytes)
        t0, c0 = time.perf_counter(), time.process_time()
        step(i + 1)
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        peaks.append(meter.peak_mib())
    phases = {"train step": max(peaks)}
    # stage 2 encoding in every step: how much is encoding alone (a pixel-space stage 2 has no autoencoder)
    if "image" in batch and hasattr(stage, "encode") and getattr(stage, "autoencoder", None) is not None:
        meter.start(stage_tensor_bytes(stage, batch))
        stage.encode(batch)
        _sync(device)
        phases["encode"] = meter.peak_mib()
    peak = max(peaks)
    result = {
        "method": meter.method,
        "peak_mib": peak,
        "static_mib": static,
        "step_mib": max(0.0, peak - static),
        "phases": phases,
        "step_seconds": min(times),
        "step_seconds_each": times,
        "step_cpu_seconds_each": cpu_times,
        "first_step_seconds": first,
    }
    if meter.cuda:
        result["reserved_mib"] = meter.reserved_mib
    return result


def worker_main(request_path: str, out_path: str) -> int:
    """The measurement process: import everything, say ``ready``, wait for the planner's go on stdin, measure the
    requested stage and write the result JSON to ``out_path``."""
    import torch

    from .. import stage1, stage2  # noqa: F401 - imported before waiting, see _Worker
    from ..runtime import Runtime

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # the first optimizer imports torch._dynamo (seconds)
    Path(out_path).with_name("ready").touch()
    if not sys.stdin.readline():  # the planner went away before this stage's turn
        return 0
    request = pickle.loads(Path(request_path).read_bytes())
    s: Settings = request["settings"]
    device = torch.device(request["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    amp = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[request["precision"]]
    runtime = Runtime(device, amp)
    name, batch = request["stage"], int(request["batch"])
    if name == "inference":
        result = measure_inference(s, runtime)
        result.update({"ok": True, "stage": name, "device": str(device), "precision": request["precision"],
                       "batch": s.sampling.batch_size, "torch_threads": torch.get_num_threads()})
        Path(out_path).write_text(json.dumps(result))
        return 0
    stage, data, epoch, notes = build_stage(name, s, runtime, batch)
    clip = getattr(s, name).training.grad_clip_norm
    result = measure_stage(stage, data, epoch, runtime, steps=int(request["steps"]), grad_clip_norm=clip)
    result.update({"ok": True, "stage": name, "device": str(device), "precision": request["precision"],
                   "batch": batch, "steps": int(request["steps"]), "notes": notes,
                   "torch_threads": torch.get_num_threads()})
    Path(out_path).write_text(json.dumps(result))
    return 0
