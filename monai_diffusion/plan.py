"""Plan a run without training: shapes, factors, parameter counts, UNet fit, measured memory, and what to change.

For a config (YAML + ``--set`` overrides) this reports, without reading any data:

* stage 1: input and latent shape, total downsample factor per axis, compression ratio, the resolution and channels of
  every level, attention blocks (tokens, size of the attention matrix when it is materialised), parameter counts of
  the autoencoder and the patch discriminator;
* stage 2: whether the diffusion UNet fits the latent (channels, spatial dims, latent size divisible by
  ``2**(levels - 1)``) and, when it does not, exactly why and what to change; UNet parameters;
* the peak memory and the time of ONE training step of each stage at batch 1 on the current device, each stage in
  a fresh subprocess (``python -m monai_diffusion.plan --worker ...``) so that the numbers are not polluted by the
  planning process; an unmeasured warm-up step runs first (it allocates the optimizer states, pages in kernels and
  libraries, tunes cuDNN), then the measured one:

  - stage 1: AutoencoderKL forward + L1 + KL (+ the adversarial terms through the patch discriminator when
    ``adv_weight > 0``, as after warm-up; + the perceptual loss when enabled and its weights file exists), backward,
    Adam steps, under the config's mixed precision, gradient checkpointing and flash attention; this is
    ``stage1.AutoencoderStage.training_step`` driven like ``engine.run_loop`` drives it;
  - stage 2: encoding a random volume with the frozen autoencoder (no gradients; skipped with
    ``diffusion.training.cache_latents``), then the UNet on a noised latent of the latent shape + MSE, backward,
    AdamW step (+ EMA update when ``ema_decay`` is set);
  - on CUDA the peak is ``torch.cuda.max_memory_allocated`` (models, optimizer states, activations; the CUDA context
    and the caching allocator's slack come on top, ``max_memory_reserved`` is reported too);
  - on CPU the peak is the process's peak resident memory during the step above its resident memory just before it
    (after the models, optimizer and input were built and the warm-up step ran), plus the bytes of those models,
    optimizer states and inputs, so that the number compares with a memory budget. The peak is Linux ``VmHWM``, reset
    through ``/proc/self/clear_refs`` right before the step: ``getrusage().ru_maxrss`` cannot be reset and, in a
    process started by ``fork``/``exec``, begins at the parent's peak (so a worker started from a big process would
    report nothing). Where ``/proc`` is missing, the growth of ``ru_maxrss`` is used (a lower bound, said so);

* with ``--budget-gb``: for each stage whether it fits and with how much headroom, or which config keys to turn, most
  effective first, skipping knobs that are already set.

Public API: :func:`make_plan`, :func:`format_plan`, :func:`apply_budget`, :func:`plan_main`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import math
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from .settings import (
    ConfigError,
    Settings,
    add_config_args,
    settings_from_args,
    total_downsample_factor,
)

__all__ = ["make_plan", "format_plan", "apply_budget", "plan_main"]

MIB = 2**20
# attention advice goes first when its matrices are estimated at >= this share of the measured peak
_ATTENTION_SHARE_FIRST = 0.25


# ================================================================================================= small helpers
def _shape(sizes: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in sizes)


def _mib(x: float) -> str:
    if x >= 10 * 1024:
        return f"{x / 1024:,.1f} GiB"
    if x >= 100:
        return f"{x:,.0f} MiB"
    return f"{x:,.1f} MiB"


def _per_level_factors(ae: Any) -> list[list[int]]:
    """Downsample factor of every level, one int per axis (None in the config = 2 per level)."""
    dims, levels = ae.spatial_dims, len(ae.num_channels) - 1
    if ae.downsample_factors is None:
        return [[2] * dims for _ in range(levels)]
    return [[f] * dims if isinstance(f, int) else list(f) for f in ae.downsample_factors]


def _per_level(value: Any, levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _yaml_value(value: Any) -> str:
    """A value as it would be written after ``--set key=``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return str(value)


def _compact_factors(factors: Sequence[Sequence[int]]) -> list[Any]:
    """[[4, 4, 4], [2, 2, 1]] -> [4, [2, 2, 1]]: isotropic levels as one int, as a user writes them."""
    return [f[0] if len(set(f)) == 1 else list(f) for f in factors]


def _attention_entry(where: str, spatial: Sequence[int], heads: int, blocks: int, flash: bool, batch: int) -> dict:
    tokens = math.prod(spatial)
    matrix_mib = batch * heads * tokens * tokens * 4 / MIB  # one fp32 attention matrix (softmax runs in fp32)
    return {
        "where": where,
        "spatial": list(spatial),
        "tokens": tokens,
        "heads": heads,
        "blocks": blocks,
        "flash": flash,
        "matrix_mib": matrix_mib,
        # materialised attention keeps ~2 N x N matrices per head for backward (scores and softmax); flash keeps none
        "estimate_mib": 0.0 if flash else 2 * blocks * matrix_mib,
    }


# ================================================================================================= stage 1 geometry
def _stage1_info(s: Settings, batch: int) -> dict[str, Any]:
    ae, t = s.autoencoder, s.autoencoder.training
    dims = ae.spatial_dims
    factors = _per_level_factors(ae)
    total = list(total_downsample_factor(ae))
    voxel = list(s.data.voxel_size)
    problems = []
    for axis, (v, f) in enumerate(zip(voxel, total)):
        if v % f:
            lo, hi = (v // f) * f, (v // f + 1) * f
            problems.append(
                f"data.voxel_size axis {axis} is {v}, not divisible by the total downsample factor {f}; "
                f"use {hi if lo < 1 else f'{lo} or {hi}'}"
            )
    latent_spatial = [v // f for v, f in zip(voxel, total)]
    levels = []
    spatial = list(voxel)
    res_blocks = _per_level(ae.num_res_blocks, len(ae.num_channels))
    for i, ch in enumerate(ae.num_channels):
        levels.append({"level": i, "spatial": list(spatial), "channels": ch, "res_blocks": res_blocks[i],
                       "attention": bool(ae.attention_levels[i]) if i < len(ae.attention_levels) else False})
        if i < len(factors):
            spatial = [x // f for x, f in zip(spatial, factors[i])]
    attention = []
    for lv in levels:
        if lv["attention"]:
            # encoder: one block per res block; decoder: one per res block of the mirrored level
            attention.append(_attention_entry(f"encoder+decoder level {lv['level']}", lv["spatial"], 1,
                                              2 * lv["res_blocks"], ae.use_flash_attention, batch))
    nonlocal_blocks = int(ae.with_encoder_nonlocal_attn) + int(ae.with_decoder_nonlocal_attn)
    if nonlocal_blocks:
        attention.append(_attention_entry("non-local (latent level)", levels[-1]["spatial"], 1, nonlocal_blocks,
                                          ae.use_flash_attention, batch))
    n_in = ae.in_channels * math.prod(voxel)
    n_lat = ae.latent_channels * math.prod(latent_spatial)
    return {
        "input_shape": [batch, ae.in_channels, *voxel],
        "latent_shape": [batch, ae.latent_channels, *latent_spatial],
        "total_factor": total,
        "downsample_factors": factors,
        "custom_upsample_factors": ae.upsample_factors is not None,
        "compression_ratio": n_in / n_lat if n_lat else None,
        "levels": levels,
        "attention": attention,
        "spatial_dims": dims,
        "gradient_checkpointing": t.use_gradient_checkpointing,
        "flash_attention": ae.use_flash_attention,
        "adversarial": t.adv_weight > 0,
        "perceptual": t.use_perceptual_loss,
        "training_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "crop_mode": s.data.crop_mode,
        "problems": problems,
    }


# ================================================================================================= stage 2 geometry
def _two_adic(n: int) -> int:
    """Largest k with 2**k dividing n (n > 0)."""
    k = 0
    while n > 0 and n % 2 == 0:
        n //= 2
        k += 1
    return k


def _stage2_info(s: Settings, batch: int) -> dict[str, Any]:
    ae, df = s.autoencoder, s.diffusion
    total = list(total_downsample_factor(ae))
    voxel = list(s.data.voxel_size)
    latent = [v // f for v, f in zip(voxel, total)]
    levels = len(df.num_channels)
    need = 2 ** max(levels - 1, 0)
    problems: list[str] = []
    fixes: list[str] = []
    if df.spatial_dims != ae.spatial_dims:
        problems.append(f"diffusion.spatial_dims is {df.spatial_dims} but autoencoder.spatial_dims is "
                        f"{ae.spatial_dims}")
        fixes.append(f"--set diffusion.spatial_dims={ae.spatial_dims}")
    for name in ("in_channels", "out_channels"):
        if getattr(df, name) != ae.latent_channels:
            problems.append(f"diffusion.{name} is {getattr(df, name)} but the latent has autoencoder.latent_channels="
                            f"{ae.latent_channels} channels")
            fixes.append(f"--set diffusion.{name}={ae.latent_channels}")
    if any(v % f for v, f in zip(voxel, total)):
        problems.append("data.voxel_size is not divisible by the autoencoder's total downsample factor "
                        f"{_shape(total)}, so the latent size is not defined")
    bad = [(a, n) for a, n in enumerate(latent) if n < 1 or n % need]
    if bad and levels:
        for axis, size in bad:
            problems.append(
                f"latent axis {axis} is {size} (data.voxel_size {voxel[axis]} / total factor {total[axis]}), not "
                f"divisible by {need}: the UNet's {levels} levels (diffusion.num_channels) halve the latent "
                f"{levels - 1} times"
            )
        max_levels = 1 + min(_two_adic(n) if n > 0 else 0 for n in latent)
        if 1 <= max_levels < levels:
            keep = max_levels
            channels = list(df.num_channels[:keep])
            sets = [f"--set diffusion.num_channels={_yaml_value(channels)}",
                    f"--set diffusion.attention_levels={_yaml_value([bool(a) for a in df.attention_levels[:keep]])}"]
            if isinstance(df.num_head_channels, tuple):
                new_heads = list(df.num_head_channels[:keep])
                # the last level always has attention (middle block): it needs a head size dividing its channels
                if new_heads[-1] < 1 or channels[-1] % new_heads[-1]:
                    last = df.num_head_channels[-1]
                    new_heads[-1] = last if last >= 1 and channels[-1] % last == 0 else channels[-1]
                sets.append(f"--set diffusion.num_head_channels={_yaml_value(new_heads)}")
            if isinstance(df.num_res_blocks, tuple):
                sets.append(f"--set diffusion.num_res_blocks={_yaml_value(list(df.num_res_blocks[:keep]))}")
            fixes.append(f"use at most {keep} UNet level(s): " + " ".join(sets))
        step = [t * need for t in total]
        sizes = []
        for v, m in zip(voxel, step):
            lo, hi = (v // m) * m, (v // m + 1) * m
            sizes.append(lo if lo >= 1 and v - lo <= hi - v else hi)
        fixes.append(f"or make every latent axis a multiple of {need}: data.voxel_size a multiple of "
                     f"{_shape(step)} per axis, e.g. --set data.voxel_size={_yaml_value(sizes)}")
    heads = _per_level(df.num_head_channels, levels)
    res_blocks = _per_level(df.num_res_blocks, levels)
    level_info = []
    attention = []
    spatial = list(latent)
    for i, ch in enumerate(df.num_channels):
        att = bool(df.attention_levels[i]) if i < len(df.attention_levels) else False
        h = heads[i] if i < len(heads) and heads[i] > 0 else ch
        n_heads = max(1, ch // h) if h else 1
        level_info.append({"level": i, "spatial": list(spatial), "channels": ch, "attention": att,
                           "heads": n_heads if att or i == levels - 1 else 0})
        if att and i < len(res_blocks) and math.prod(spatial) > 0:
            # down block: one per res block; up block: one per (res blocks + 1)
            attention.append(_attention_entry(f"level {i}", spatial, n_heads, 2 * res_blocks[i] + 1,
                                              df.use_flash_attention, batch))
        if i == levels - 1 and math.prod(spatial) > 0:
            attention.append(_attention_entry("middle block", spatial, n_heads, 1, df.use_flash_attention, batch))
        if i < levels - 1:
            spatial = [max(x // 2, 0) for x in spatial]
    cond = df.conditioning
    return {
        "latent_shape": [batch, ae.latent_channels, *latent],
        "latent_channels": ae.latent_channels,
        "in_channels": df.in_channels,
        "out_channels": df.out_channels,
        "num_levels": levels,
        "required_divisor": need,
        "levels": level_info,
        "attention": attention,
        "fits": not problems,
        "problems": problems,
        "fixes": fixes,
        "flash_attention": df.use_flash_attention,
        "encodes_images": not df.training.cache_latents,
        "conditioning": {"num_classes": cond.num_classes if cond.class_key is not None else None,
                         "num_covariates": len(cond.covariate_keys)},
        "training_batch_size": df.training.batch_size,
        "ema": df.training.ema_decay is not None,
    }


# ================================================================================================= parameters
def _parameter_counts(s: Settings) -> tuple[dict[str, int], dict[str, int]]:
    """Parameter counts of the networks, built on the CPU."""
    from .engine import count_parameters
    from .models import build_autoencoder, build_unet, unet_args
    from .stage1 import build_discriminator

    def trainable(m: Any) -> int:
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    ae_cfg, t = s.autoencoder, s.autoencoder.training
    # built on the CPU: the meta device would save the memory, but its init ops import torch._dynamo (seconds)
    ae = build_autoencoder(ae_cfg)
    disc = build_discriminator(ae_cfg.spatial_dims, ae_cfg.out_channels, t.discriminator.num_layers_d,
                               t.discriminator.num_channels)
    p1 = {"autoencoder": count_parameters(ae), "discriminator": count_parameters(disc),
          "trainable": trainable(ae) + trainable(disc)}
    p2: dict[str, int] = {}
    cond = s.diffusion.conditioning
    try:
        unet = build_unet(unet_args(s.diffusion, cond.num_classes if cond.class_key else None,
                                    len(cond.covariate_keys)))
        p2 = {"unet": count_parameters(unet), "trainable": trainable(unet)}
    except Exception as exc:  # noqa: BLE001 - a UNet that cannot even be built is reported, not raised
        p2 = {"error": f"{type(exc).__name__}: {exc}"}  # type: ignore[dict-item]
    p2["frozen_autoencoder"] = p1["autoencoder"] if not s.diffusion.training.cache_latents else 0
    return p1, p2


# ================================================================================================= device / precision
def _resolve_device(device: str | None, s: Settings) -> tuple[str, str]:
    """(torch device string, human name). ``device`` None: CUDA when the config allows it and one is visible."""
    import torch

    from .engine import RunError

    if device is None:
        device = "cuda" if s.device.use_cuda and torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise RunError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RunError("--device cuda was asked for but no CUDA GPU is visible to PyTorch; use --device cpu")
        index = int(device.split(":", 1)[1]) if ":" in device else s.device.gpu_id
        if index >= torch.cuda.device_count():
            raise RunError(f"CUDA device {index} (device.gpu_id or --device cuda:N) does not exist: "
                           f"{torch.cuda.device_count()} CUDA device(s) are visible")
        name = torch.cuda.get_device_name(index)
        total = torch.cuda.get_device_properties(index).total_memory / MIB
        return f"cuda:{index}", f"cuda:{index} ({name}, {total / 1024:.1f} GiB)"
    return "cpu", f"cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def _resolve_precision(s: Settings, device: str) -> tuple[str, str | None]:
    """('fp32' | 'fp16' | 'bf16', note) for device.mixed_precision on this device (engine.resolve_precision)."""
    import torch

    from .engine import resolve_precision

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dtype = resolve_precision(s.device.mixed_precision, torch.device(device))
    name = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    note = str(caught[0].message) if caught else None
    return name, note


# ================================================================================================= measurement (parent)
def _worker_env() -> dict[str, str]:
    """The environment of a worker: this one, with the folders this process imported both packages from first."""
    import generative

    roots = [str(Path(__file__).resolve().parents[1]), str(Path(generative.__file__).resolve().parents[1])]
    env = dict(os.environ)
    given = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*roots, *given]))
    return env


class _Worker:
    """One stage's measurement in a fresh ``python -m monai_diffusion.plan --worker REQUEST RESULT`` process.

    The process starts at once and imports torch, MONAI and the networks, then waits for a line on its stdin; so the
    imports of all stages overlap while the measurements themselves run one at a time.
    """

    def __init__(self, stage: str, s: Settings, device: str, precision: str, batch: int, steps: int) -> None:
        self.stage = stage
        self.tmp = Path(tempfile.mkdtemp(prefix="monai-diffusion-plan-"))
        self.out = self.tmp / "result.json"
        # the settings travel pickled, not as a dict to validate again: a stage is measured even when the other one
        # is invalid (e.g. built with dataclasses.replace)
        request = {"settings": s, "stage": stage, "device": device, "precision": precision, "batch": batch,
                   "steps": steps}
        (self.tmp / "request.pkl").write_bytes(pickle.dumps(request))
        cmd = [sys.executable, "-m", "monai_diffusion.plan", "--worker", str(self.tmp / "request.pkl"), str(self.out)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=_worker_env())

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


def _measure_stages(stages: Sequence[str], s: Settings, device: str, precision: str, batch: int, steps: int,
                    timeout: float | None) -> dict[str, dict[str, Any]]:
    """Measure ``stages`` ("autoencoder", "diffusion"), each in its own process, one after the other."""
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


# ================================================================================================= measurement (worker)
def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class _CpuMeter:
    """Peak resident memory above a baseline, via VmHWM reset through /proc/self/clear_refs (Linux)."""

    def __init__(self) -> None:
        self.resettable = self._reset()
        self.method = ("peak RSS (VmHWM, reset before the step) above RSS after building models/optimizer/input"
                       if self.resettable else
                       "growth of getrusage ru_maxrss during the step (VmHWM not resettable here: a lower bound)")
        self.baseline_kib = 0

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _status_kib("VmHWM") is not None
        except OSError:
            return False

    @staticmethod
    def _trim() -> None:
        gc.collect()
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6").malloc_trim(0)

    @staticmethod
    def _maxrss_kib() -> int:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r // 1024 if sys.platform == "darwin" else r

    def start(self) -> None:
        self._trim()
        if self.resettable:
            self._reset()
            self.baseline_kib = _status_kib("VmRSS") or 0
        else:
            self.baseline_kib = self._maxrss_kib()

    def rise_mib(self) -> float:
        peak = (_status_kib("VmHWM") or 0) if self.resettable else self._maxrss_kib()
        return max(0, peak - self.baseline_kib) / 1024

    def rss_mib(self) -> float:
        return (_status_kib("VmRSS") or self._maxrss_kib()) / 1024


def _tensor_bytes(modules: Sequence[Any], optimizers: Sequence[Any], tensors: Sequence[Any]) -> int:
    """Bytes of the parameters and buffers of ``modules``, the states of ``optimizers`` and ``tensors``."""
    import torch

    everything = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    everything += [v for opt in optimizers for state in opt.state.values() for v in state.values()
                   if isinstance(v, torch.Tensor)]
    everything += list(tensors)
    seen: set[int] = set()
    total = 0
    for t in everything:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _stage1_worker(s: Settings, device: Any, amp: Any, batch: int) -> tuple[list, list, list, list, list[str]]:
    """Models, inputs and the phases of one stage-1 training step (as engine.run_loop runs AutoencoderStage)."""
    import torch

    from .engine import Runtime
    from .models import build_autoencoder
    from .stage1 import AutoencoderStage, build_discriminator, build_perceptual_loss

    ae_cfg, t = s.autoencoder, s.autoencoder.training
    notes: list[str] = []
    autoencoder = build_autoencoder(ae_cfg).to(device)
    discriminator = build_discriminator(ae_cfg.spatial_dims, ae_cfg.out_channels, t.discriminator.num_layers_d,
                                        t.discriminator.num_channels).to(device)
    perceptual = None
    if t.use_perceptual_loss:
        path = t.perceptual_weights_path
        if path and Path(path).expanduser().is_file():
            try:
                perceptual = build_perceptual_loss(t, ae_cfg.spatial_dims).to(device)
                notes.append(f"includes the perceptual loss ({t.perceptual_network})")
            except Exception as exc:  # noqa: BLE001
                notes.append(f"perceptual loss left out: {exc}")
        else:
            notes.append(f"perceptual loss left out: weights file {path!r} not found")
    opt_g = torch.optim.Adam(autoencoder.parameters(), lr=t.learning_rate)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=t.discriminator.learning_rate or t.learning_rate)
    runtime = Runtime(device, amp)
    stage = AutoencoderStage(autoencoder, discriminator, opt_g, opt_d, t, runtime, perceptual_loss=perceptual)
    images = torch.rand(batch, ae_cfg.in_channels, *s.data.voxel_size, device=device)
    scalers = {n: torch.amp.GradScaler(device.type, enabled=amp == torch.float16) for n in stage.optimizers}
    epoch = t.autoencoder_warm_up_n_epochs  # first epoch with the adversarial loss on
    if t.adv_weight > 0:
        notes.append("generator + discriminator step after warm-up (adversarial loss on)")
    else:
        notes.append("no adversarial loss (adv_weight 0)")

    def train_step() -> None:
        with runtime.autocast():
            losses, _ = stage.training_step(images, epoch)
        for name, loss in losses.items():
            scalers[name].scale(loss).backward()
        for name, opt in stage.optimizers.items():
            if name not in losses:
                continue
            if t.grad_clip_norm:
                scalers[name].unscale_(opt)
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], t.grad_clip_norm)
            scalers[name].step(opt)
            scalers[name].update()
        for opt in stage.optimizers.values():
            opt.zero_grad(set_to_none=True)

    modules = [autoencoder, discriminator] + ([perceptual] if perceptual is not None else [])
    return modules, [opt_g, opt_d], [images], [("train step", train_step)], notes


def _stage2_worker(s: Settings, device: Any, amp: Any, batch: int) -> tuple[list, list, list, list, list[str]]:
    """Models, inputs and the phases of one stage-2 training step: (encode,) UNet + MSE, backward, AdamW, EMA."""
    import torch
    import torch.nn.functional as F
    from monai.networks.schedulers import DDPMScheduler

    from .engine import Runtime
    from .models import build_autoencoder, build_unet, unet_args

    ae_cfg, df, t = s.autoencoder, s.diffusion, s.diffusion.training
    cond = df.conditioning
    num_classes = cond.num_classes if cond.class_key is not None else None
    n_cov = len(cond.covariate_keys)
    runtime = Runtime(device, amp)
    notes: list[str] = []
    unet = build_unet(unet_args(df, num_classes, n_cov)).to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=t.learning_rate)
    ema = copy.deepcopy(unet).requires_grad_(False) if t.ema_decay is not None else None
    sch = df.scheduler
    sched_args: dict[str, Any] = {"num_train_timesteps": sch.num_train_timesteps, "schedule": sch.schedule,
                                  "prediction_type": sch.prediction_type}
    if sch.schedule != "cosine":
        sched_args.update(beta_start=sch.beta_start, beta_end=sch.beta_end)
    scheduler = DDPMScheduler(**sched_args)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    latent_spatial = [v // f for v, f in zip(s.data.voxel_size, total_downsample_factor(ae_cfg))]
    modules: list[Any] = [unet] + ([ema] if ema is not None else [])
    inputs: list[Any] = []
    state: dict[str, Any] = {}
    phases: list[tuple[str, Callable[[], None]]] = []
    if t.cache_latents:
        mu = torch.randn(batch, ae_cfg.latent_channels, *latent_spatial, device=device)
        sigma = torch.rand_like(mu)
        inputs += [mu, sigma]
        notes.append("cached latents (diffusion.training.cache_latents): no encoding in the step")

        def use_cached() -> None:
            state["z"] = (mu, sigma)

        use_cached()
    else:
        autoencoder = build_autoencoder(ae_cfg).to(device).eval().requires_grad_(False)
        modules.append(autoencoder)
        images = torch.rand(batch, ae_cfg.in_channels, *s.data.voxel_size, device=device)
        inputs.append(images)
        notes.append("includes encoding the volume with the frozen autoencoder (no gradients)")

        def encode() -> None:
            with torch.no_grad(), runtime.autocast():
                z_mu, z_sigma = autoencoder.encode(images)
            state["z"] = (z_mu.float(), z_sigma.float())

        phases.append(("encode", encode))

    def unet_step() -> None:
        z_mu, z_sigma = state["z"]
        z = z_mu + torch.randn_like(z_sigma) * z_sigma if t.latent_sampling == "sample" else z_mu
        noise = torch.randn_like(z)
        timesteps = torch.randint(0, sch.num_train_timesteps, (z.shape[0],), device=device)
        noisy = scheduler.add_noise(original_samples=z, noise=noise, timesteps=timesteps)
        kwargs: dict[str, Any] = {}
        if num_classes is not None:
            kwargs["class_labels"] = torch.randint(0, num_classes + 1, (z.shape[0],), device=device)
        if n_cov:
            kwargs["context"] = torch.rand(z.shape[0], 1, n_cov + 1, device=device)
        with runtime.autocast():
            prediction = unet(noisy, timesteps, **kwargs)
        if sch.prediction_type == "epsilon":
            target = noise
        elif sch.prediction_type == "v_prediction":
            target = scheduler.get_velocity(z, noise, timesteps)
        else:
            target = z
        loss = F.mse_loss(prediction.float(), target.float())
        scaler.scale(loss).backward()
        if t.grad_clip_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(unet.parameters(), t.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), unet.parameters()):
                    pe.lerp_(p, 1 - t.ema_decay)

    phases.append(("UNet train step", unet_step))
    if ema is not None:
        notes.append("includes the EMA copy of the UNet")
    return modules, [optimizer], inputs, phases, notes


def _worker(request_path: str, out_path: str) -> int:
    """Measure one stage (pickled request written by :func:`_measure`), write the result JSON to ``out_path``."""
    import torch
    from monai.networks.schedulers import DDPMScheduler  # noqa: F401 - imported before waiting, see _Worker

    from . import models, stage1  # noqa: F401

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # the first optimizer imports torch._dynamo (seconds)
    Path(out_path).with_name("ready").touch()
    if not sys.stdin.readline():  # the planner went away before this stage's turn
        return 0
    request = pickle.loads(Path(request_path).read_bytes())
    s = request["settings"]
    device = torch.device(request["device"])
    amp = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[request["precision"]]
    batch, steps = int(request["batch"]), max(1, int(request["steps"]))
    if s.seed is not None:
        torch.manual_seed(s.seed)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    build = _stage1_worker if request["stage"] == "autoencoder" else _stage2_worker
    modules, optimizers, inputs, phases, notes = build(s, device, amp, batch)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    # warm-up step: allocates the optimizer states, pages in kernels and libraries, tunes cuDNN; not measured
    sync()
    t0 = time.perf_counter()
    for _, fn in phases:
        fn()
    sync()
    first = time.perf_counter() - t0
    meter = None if cuda else _CpuMeter()
    if cuda:
        static = torch.cuda.memory_allocated(device) / MIB
        method = "torch.cuda.max_memory_allocated (models, optimizer states, activations; excludes CUDA context)"
    else:
        static = _tensor_bytes(modules, optimizers, inputs) / MIB
        method = meter.method + ", plus the bytes of the models, optimizer states and inputs"
    phase_peak: dict[str, float] = {}
    times: list[float] = []
    reserved = 0.0
    baseline_rss = None
    for _ in range(steps):
        elapsed = 0.0
        for name, fn in phases:
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            else:
                meter.start()
                baseline_rss = meter.baseline_kib / 1024 if baseline_rss is None else baseline_rss
            t0 = time.perf_counter()
            fn()
            sync()
            elapsed += time.perf_counter() - t0
            if cuda:
                peak = torch.cuda.max_memory_allocated(device) / MIB
                reserved = max(reserved, torch.cuda.max_memory_reserved(device) / MIB)
            else:
                peak = static + meter.rise_mib()
            phase_peak[name] = max(phase_peak.get(name, 0.0), peak)
        times.append(elapsed)
    peak = max(phase_peak.values())
    result = {
        "ok": True,
        "stage": request["stage"],
        "device": str(device),
        "precision": request["precision"],
        "batch": batch,
        "steps": steps,
        "method": method,
        "peak_mib": peak,
        "static_mib": static,
        "step_mib": peak - static,
        "phases": phase_peak,
        "step_seconds": min(times),
        "first_step_seconds": first,
        "notes": notes,
    }
    if cuda:
        result["reserved_mib"] = reserved
    else:
        result["baseline_rss_mib"] = baseline_rss
        result["torch_threads"] = torch.get_num_threads()
    Path(out_path).write_text(json.dumps(result))
    return 0


# ================================================================================================= advice
def _advice_entry(stage: str, key: str, text: str, sets: dict[str, Any] | None = None,
                  kind: str = "knob") -> dict[str, Any]:
    """One piece of advice about config ``key``: a knob to turn (``kind`` "knob") or a ``note``.

    ``sets`` maps every key that must change together to its new value; ``set`` has them as ``--set`` arguments
    (``KEY=VALUE``, YAML values), ready for ``load_settings(path, overrides=entry["set"])``.
    """
    sets = dict(sets or {})
    return {"stage": stage, "kind": kind, "key": key, "values": sets,
            "set": [f"{k}={_yaml_value(v)}" for k, v in sets.items()], "text": text}


def _first_level_suggestion(s: Settings) -> tuple[list[Any], str] | None:
    """A first-level downsample factor of 4 with the same total (same latent); None where it is already >= 4."""
    ae = s.autoencoder
    factors = _per_level_factors(ae)
    if len(factors) < 2:
        return None
    new = [list(f) for f in factors]
    changed = False
    for axis in range(ae.spatial_dims):
        first = factors[0][axis]
        total = math.prod(f[axis] for f in factors)
        if first >= 4 or total % 4 or 4 % first:
            continue
        k = 4 // first
        rest = [f[axis] for f in factors[1:]]
        for j in range(len(rest) - 1, -1, -1):  # take the extra factor from the lowest-resolution levels first
            g = math.gcd(rest[j], k)
            rest[j] //= g
            k //= g
        if k != 1:
            continue
        new[0][axis] = 4
        for j, r in enumerate(rest):
            new[j + 1][axis] = r
        changed = True
    if not changed:
        return None
    voxel = s.data.voxel_size
    shrink = math.prod(n // f for n, f in zip(new[0], factors[0]))
    text = (f"a larger first-level factor ({_yaml_value(_compact_factors(factors))} now): same total factor and "
            f"latent, level 1 runs at {_shape([v // f for v, f in zip(voxel, new[0])])} instead of "
            f"{_shape([v // f for v, f in zip(voxel, factors[0])])} ({shrink}x fewer voxels); retrains the "
            f"autoencoder")
    return _compact_factors(new), text


def _patch_size(s: Settings, multiple: Sequence[int]) -> list[int]:
    """About half of data.voxel_size per axis, a multiple of ``multiple``."""
    return [max(m, (v // 2) // m * m) for v, m in zip(s.data.voxel_size, multiple)]


def _halved_channels(channels: Sequence[int], groups: int, prefix: str) -> dict[str, Any] | None:
    new = [c // 2 for c in channels]
    if min(new) < 1:
        return None
    sets: dict[str, Any] = {f"{prefix}.num_channels": new}
    g = math.gcd(groups, *new)
    if g != groups:
        sets[f"{prefix}.norm_num_groups"] = g
    return sets


def _stage1_knobs(s: Settings, plan: dict[str, Any]) -> list[dict[str, Any]]:
    ae, t = s.autoencoder, s.autoencoder.training
    st = plan["autoencoder"]
    peak = (st.get("measurement") or {}).get("peak_mib")
    knobs: list[dict[str, Any]] = []
    att_mib = sum(a["estimate_mib"] for a in st["attention"])
    attention_knob = None
    if not ae.use_flash_attention and st["attention"]:
        attention_knob = _advice_entry(
            "autoencoder", "autoencoder.use_flash_attention",
            f"attention via scaled_dot_product_attention: no N x N matrix in memory (now ~{_mib(att_mib)} of "
            f"attention matrices at batch {plan['batch_size']}, {max(a['tokens'] for a in st['attention']):,} "
            f"tokens in the largest)", {"autoencoder.use_flash_attention": True})
    first = _first_level_suggestion(s)
    if first is not None:
        knobs.append(_advice_entry("autoencoder", "autoencoder.downsample_factors", first[1],
                                   {"autoencoder.downsample_factors": first[0]}))
    if plan["precision"] == "fp32":
        knobs.append(_advice_entry("autoencoder", "device.mixed_precision",
                                   "bf16 autocast: about half the activation memory (fp16 on GPUs without bf16)",
                                   {"device.mixed_precision": "bf16"}))
    if not t.use_gradient_checkpointing:
        knobs.append(_advice_entry("autoencoder", "autoencoder.training.use_gradient_checkpointing",
                                   "recompute each encoder/decoder block in backward instead of storing its "
                                   "activations (several times less activation memory, ~30% slower)",
                                   {"autoencoder.training.use_gradient_checkpointing": True}))
    if attention_knob is not None:
        if peak and att_mib >= _ATTENTION_SHARE_FIRST * peak:
            knobs.insert(0, attention_knob)
        else:
            knobs.append(attention_knob)
    high = [lv["level"] for lv in st["levels"][:-1] if lv["attention"]]
    if high:
        value = [bool(a) and i not in high for i, a in enumerate(ae.attention_levels)]
        knobs.append(_advice_entry("autoencoder", "autoencoder.attention_levels",
                                   f"no attention at the high-resolution level(s) {high} (keep it at the lowest one)",
                                   {"autoencoder.attention_levels": value}))
    total = total_downsample_factor(ae)
    multiple = [f * plan["diffusion"]["required_divisor"] for f in total]
    patch = _patch_size(s, multiple)
    fewer = math.prod(s.data.voxel_size) // max(1, math.prod(patch))
    if patch != list(s.data.voxel_size):
        if s.data.crop_mode != "random_patch":
            knobs.append(_advice_entry(
                "autoencoder", "data.crop_mode",
                f"train on random {_shape(patch)} patches ({fewer}x fewer voxels per step; multiples of "
                f"{_shape(multiple)} so that stage 2's latents still fit the UNet; validation reconstructs whole "
                f"volumes tile by tile)", {"data.crop_mode": "random_patch", "data.voxel_size": patch}))
        else:
            knobs.append(_advice_entry("autoencoder", "data.voxel_size",
                                       f"smaller random patches ({fewer}x fewer voxels per step)",
                                       {"data.voxel_size": patch}))
    sets = _halved_channels(ae.num_channels, ae.norm_num_groups, "autoencoder")
    if sets is not None:
        knobs.append(_advice_entry("autoencoder", "autoencoder.num_channels",
                                   "half the channels (the full-resolution level's activations dominate; about 4x "
                                   "fewer parameters)", sets))
    return knobs


def _stage2_knobs(s: Settings, plan: dict[str, Any]) -> list[dict[str, Any]]:
    df, t = s.diffusion, s.diffusion.training
    st = plan["diffusion"]
    m = st.get("measurement") or {}
    peak = m.get("peak_mib")
    phases = m.get("phases") or {}
    knobs: list[dict[str, Any]] = []
    if not t.cache_latents and phases.get("encode", 0) >= phases.get("UNet train step", math.inf):
        knobs.append(_advice_entry(
            "diffusion", "diffusion.training.cache_latents",
            f"encoding the volume ({_mib(phases['encode'])}) is the peak: encode the training set once and train on "
            f"stored latents (no augmentation in stage 2)", {"diffusion.training.cache_latents": True}))
    att_mib = sum(a["estimate_mib"] for a in st["attention"])
    attention_knob = None
    if not df.use_flash_attention and st["attention"]:
        attention_knob = _advice_entry(
            "diffusion", "diffusion.use_flash_attention",
            f"attention via scaled_dot_product_attention (now ~{_mib(att_mib)} of attention matrices at batch "
            f"{plan['batch_size']})", {"diffusion.use_flash_attention": True})
        if peak and att_mib >= _ATTENTION_SHARE_FIRST * peak:
            knobs.append(attention_knob)
            attention_knob = None
    if plan["precision"] == "fp32":
        knobs.append(_advice_entry("diffusion", "device.mixed_precision",
                                   "bf16 autocast: about half the activation memory (fp16 on GPUs without bf16)",
                                   {"device.mixed_precision": "bf16"}))
    if attention_knob is not None:
        knobs.append(attention_knob)
    if len(df.attention_levels) > 1 and df.attention_levels[0]:
        knobs.append(_advice_entry("diffusion", "diffusion.attention_levels",
                                   "no attention at the highest-resolution UNet level",
                                   {"diffusion.attention_levels": [False, *map(bool, df.attention_levels[1:])]}))
    sets = _halved_channels(df.num_channels, df.norm_num_groups, "diffusion")
    if sets is not None:
        new = sets["diffusion.num_channels"]
        heads = _per_level(df.num_head_channels, len(new))
        new_heads = [math.gcd(h, c) if h > 0 else 0 for h, c in zip(heads, new)]
        if new_heads != heads:
            sets["diffusion.num_head_channels"] = new_heads
        knobs.append(_advice_entry("diffusion", "diffusion.num_channels",
                                   "half the UNet channels (about 4x fewer parameters, less activation memory)", sets))
    if any(r > 1 for r in _per_level(df.num_res_blocks, len(df.num_channels))):
        knobs.append(_advice_entry("diffusion", "diffusion.num_res_blocks", "one residual block per level",
                                   {"diffusion.num_res_blocks": 1}))
    knobs.append(_advice_entry(
        "diffusion", "data.voxel_size",
        f"a smaller latent (UNet memory scales with its {math.prod(st['latent_shape'][2:]):,} voxels): a smaller "
        f"data.voxel_size or larger autoencoder.downsample_factors (retrains the autoencoder)"))
    return knobs


def _batch_note(stage: str, key: str, batch: int, measured: int) -> dict[str, Any] | None:
    if batch <= measured:
        return None
    section = key.rsplit(".", 1)[0]
    return _advice_entry(
        stage, key,
        f"measured at batch {measured} but {key} is {batch}: activations grow about {batch / measured:g}x; if that "
        f"does not fit, use {key}=1 with {section}.gradient_accumulation_steps={batch} (same effective batch)",
        kind="note")


def apply_budget(plan: dict[str, Any], settings: Settings, budget_gb: float | None) -> dict[str, Any]:
    """(Re)compute ``plan["verdicts"]`` and ``plan["advice"]`` for a memory budget in GiB, without measuring again.

    A stage fits when its measured peak is at most the budget. Without a measurement nothing is claimed, except
    "does not fit" when the weights, gradients and Adam states alone (16 bytes per trainable parameter, 4 per frozen
    one) exceed the budget. Returns ``plan`` (changed in place).
    """
    plan["budget_gb"] = budget_gb
    plan["budget_mib"] = budget = None if budget_gb is None else budget_gb * 1024
    verdicts: dict[str, Any] = {}
    advice: list[dict[str, Any]] = []
    for stage, knobs_fn, batch_key in (("autoencoder", _stage1_knobs, "autoencoder.training.batch_size"),
                                      ("diffusion", _stage2_knobs, "diffusion.training.batch_size")):
        st = plan[stage]
        m = st.get("measurement")
        if budget is None:
            verdicts[stage] = None
            continue
        if m and m.get("ok"):
            peak = m["peak_mib"]
            fits = peak <= budget
            verdicts[stage] = {"fits": fits, "peak_mib": peak, "budget_mib": budget, "headroom_mib": budget - peak,
                               "basis": "measured"}
            if not fits:
                advice += knobs_fn(settings, plan)
        else:
            p = st["parameters"]
            lower = (16 * p.get("trainable", 0) + 4 * p.get("frozen_autoencoder", 0)) / MIB
            if lower > budget:
                verdicts[stage] = {"fits": False, "peak_mib": None, "lower_bound_mib": lower, "budget_mib": budget,
                                   "basis": "weights, gradients and Adam states alone, 16 bytes per parameter"}
                prefix = "autoencoder" if stage == "autoencoder" else "diffusion"
                group = settings.autoencoder if stage == "autoencoder" else settings.diffusion
                advice.append(_advice_entry(stage, f"{prefix}.num_channels",
                                            "fewer channels: the parameters alone exceed the budget",
                                            _halved_channels(group.num_channels, group.norm_num_groups, prefix)))
            else:
                error = (m or {}).get("error", "")
                basis = error if error.startswith("not measured") else "not measured" + (f" ({error})" if error else "")
                verdicts[stage] = {"fits": None, "peak_mib": None, "lower_bound_mib": lower, "budget_mib": budget,
                                   "basis": basis}
        note = _batch_note(stage, batch_key, st["training_batch_size"], plan["batch_size"])
        if note is not None:
            advice.append(note)
    plan["verdicts"] = verdicts
    plan["advice"] = advice
    return plan


# ================================================================================================= make_plan
def make_plan(
    settings: Settings,
    measure: bool = True,
    budget_gb: float | None = None,
    device: str | None = None,
    *,
    batch_size: int = 1,
    steps: int = 1,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Everything the plan knows about a config, as a JSON-serialisable dict (see the module docstring).

    Args:
        settings: validated settings (``load_settings(..., check_paths=False, require_data=False)``).
        measure: run one training step of each stage in a subprocess and record peak memory and time.
        budget_gb: memory budget in GiB; each stage gets a verdict and, when over, a list of knobs in ``advice``.
        device: "cpu" or "cuda" (``cuda:N``); None = CUDA if ``device.use_cuda`` and one is visible, else CPU.
        batch_size: batch of the measured step (1 by default, whatever the config trains with).
        steps: measured steps per stage, after one unmeasured warm-up step (which allocates the optimizer states and
            pages in kernels); the peak is the largest of them, the time the fastest.
        timeout: seconds allowed per measurement process (None = no limit).
    """
    dev, dev_name = _resolve_device(device, settings)
    precision, precision_note = _resolve_precision(settings, dev)
    s1 = _stage1_info(settings, batch_size)
    s2 = _stage2_info(settings, batch_size)
    s1["parameters"], s2["parameters"] = _parameter_counts(settings)
    plan: dict[str, Any] = {
        "device": dev,
        "device_name": dev_name,
        "precision": precision,
        "precision_setting": settings.device.mixed_precision,
        "precision_note": precision_note,
        "batch_size": batch_size,
        "measured": bool(measure),
        "measure_method": None,
        "budget_gb": budget_gb,
        "budget_mib": None if budget_gb is None else budget_gb * 1024,
        "autoencoder": s1,
        "diffusion": s2,
        "config": None,  # set by plan_main
        "overrides": [],
    }
    s1["measurement"] = s2["measurement"] = None
    if measure:
        stages = []
        if s1["problems"]:
            s1["measurement"] = {"ok": False, "error": "not measured: " + "; ".join(s1["problems"])}
        else:
            stages.append("autoencoder")
        if not s2["fits"]:
            s2["measurement"] = {"ok": False, "error": "not measured: the UNet does not fit the latent"}
        else:
            stages.append("diffusion")
        if stages:
            results = _measure_stages(stages, settings, dev, precision, batch_size, steps, timeout)
            for stage, result in results.items():
                plan[stage]["measurement"] = result
        methods = [m["method"] for m in (s1["measurement"], s2["measurement"]) if m.get("ok")]
        plan["measure_method"] = methods[0] if methods else None
    return apply_budget(plan, settings, budget_gb)


# ================================================================================================= format_plan
def _format_levels(levels: list[dict], attention_key: str = "attention") -> str:
    parts = []
    for lv in levels:
        text = f"{lv['level']}: {_shape(lv['spatial'])} x {lv['channels']} ch"
        if lv.get(attention_key):
            text += " +attn"
        parts.append(text)
    return " | ".join(parts)


def _format_attention(entries: list[dict]) -> list[str]:
    lines = []
    for a in entries:
        kind = "flash (no N x N matrix)" if a["flash"] else f"materialised: ~{_mib(a['estimate_mib'])} for backward"
        lines.append(f"    {a['where']}: {a['tokens']:,} tokens, {a['heads']} head(s), {a['blocks']} block(s), {kind}")
    return lines


def _format_measurement(m: dict | None) -> list[str]:
    if m is None:
        return ["  peak memory      not measured (--no-measure)"]
    if not m.get("ok"):
        return [f"  peak memory      {m.get('error')}"]
    lines = [f"  peak memory      {_mib(m['peak_mib'])}  (models/inputs {_mib(m['static_mib'])} + step "
             f"{_mib(m['step_mib'])}; {m['precision']}, batch {m['batch']})"]
    if len(m.get("phases", {})) > 1:
        lines.append("    phases         " + ", ".join(f"{k} {_mib(v)}" for k, v in m["phases"].items()))
    if "reserved_mib" in m:
        lines.append(f"    CUDA reserved  {_mib(m['reserved_mib'])} (caching allocator; plus the CUDA context)")
    lines.append(f"  step time        {m['step_seconds']:.3f} s (warm-up step {m['first_step_seconds']:.3f} s; "
                 f"{m['steps']} step(s) measured after it)")
    for note in m.get("notes", []):
        lines.append(f"    note: {note}")
    return lines


def _format_verdict(v: dict | None) -> list[str]:
    if v is None:
        return []
    budget = _mib(v["budget_mib"])
    if v["fits"] is True:
        pct = 100 * v["headroom_mib"] / v["budget_mib"] if v["budget_mib"] else 0
        return [f"  budget           FITS: {_mib(v['peak_mib'])} of {budget} ({_mib(v['headroom_mib'])}, "
                f"{pct:.0f}% headroom)"]
    if v["fits"] is False and v.get("peak_mib") is not None:
        return [f"  budget           DOES NOT FIT: {_mib(v['peak_mib'])} > {budget} "
                f"(over by {_mib(-v['headroom_mib'])})"]
    if v["fits"] is False:
        return [f"  budget           DOES NOT FIT: at least {_mib(v['lower_bound_mib'])} > {budget} ({v['basis']})"]
    hint = "; measure (drop --no-measure) to know" if v["basis"] == "not measured" else ""
    return [f"  budget           unknown: {v['basis']}; weights, gradients and Adam states alone need "
            f"{_mib(v['lower_bound_mib'])} of {budget}{hint}"]


def format_plan(plan: dict[str, Any]) -> str:
    """Human-readable report of a :func:`make_plan` dict (also works on the dict read back from ``--json``)."""
    s1, s2 = plan["autoencoder"], plan["diffusion"]
    out: list[str] = []
    title = "monai-diffusion plan" + (f": {plan['config']}" if plan.get("config") else "")
    out.append(title)
    if plan.get("overrides"):
        out.append("  overrides: " + " ".join(plan["overrides"]))
    precision = {"fp32": "fp32 (no autocast)", "fp16": "fp16 autocast", "bf16": "bf16 autocast"}[plan["precision"]]
    out.append(f"device: {plan['device_name']}; precision: {precision} "
               f"(device.mixed_precision={_yaml_value(plan['precision_setting'])})")
    if plan.get("precision_note"):
        out.append(f"  note: {plan['precision_note']}")
    out.append("")

    # ---- stage 1
    p1 = s1["parameters"]
    savers = [name for name, on in (("gradient checkpointing", s1["gradient_checkpointing"]),
                                    ("flash attention", s1["flash_attention"]),
                                    (f"{plan['precision']} autocast", plan["precision"] != "fp32")) if on]
    out.append("Stage 1: autoencoder (AutoencoderKL)")
    out.append(f"  input            {tuple(s1['input_shape'])}   (config trains with batch_size "
               f"{s1['training_batch_size']}, gradient_accumulation_steps {s1['gradient_accumulation_steps']})")
    out.append(f"  latent           {tuple(s1['latent_shape'])}")
    out.append(f"  total factor     {_shape(s1['total_factor'])} per axis (downsample_factors "
               f"{_yaml_value(_compact_factors(s1['downsample_factors']))})")
    if s1["compression_ratio"]:
        out.append(f"  compression      {s1['compression_ratio']:.1f}x fewer values "
                   f"({math.prod(s1['input_shape'][1:]):,} -> {math.prod(s1['latent_shape'][1:]):,} per volume)")
    out.append("  encoder levels   " + _format_levels(s1["levels"])
               + ("" if s1["custom_upsample_factors"] else "  (decoder mirrors)"))
    if s1["attention"]:
        out.append("  attention")
        out += _format_attention(s1["attention"])
    out.append(f"  parameters       autoencoder {p1['autoencoder']:,}; discriminator {p1['discriminator']:,}")
    out.append(f"  memory savers    {', '.join(savers) if savers else 'none'}")
    for problem in s1["problems"]:
        out.append(f"  PROBLEM: {problem}")
    out += _format_measurement(s1["measurement"])
    out += _format_verdict((plan.get("verdicts") or {}).get("autoencoder"))
    out.append("")

    # ---- stage 2
    p2 = s2["parameters"]
    out.append("Stage 2: latent diffusion UNet (DiffusionModelUNet)")
    ch_ok = s2["in_channels"] == s2["latent_channels"] == s2["out_channels"]
    out.append(f"  channels         in {s2['in_channels']} / out {s2['out_channels']} vs latent_channels "
               f"{s2['latent_channels']}: {'ok' if ch_ok else 'MISMATCH'}")
    latent = _shape(s2["latent_shape"][2:])
    need = s2["required_divisor"]
    out.append(f"  latent           {latent}; {s2['num_levels']} level(s) halve it {s2['num_levels'] - 1} time(s), "
               f"so each axis must be divisible by {need}")
    if s2["fits"]:
        out.append("  fits             yes: the UNet fits the latent")
    else:
        out.append("  fits             NO")
        for problem in s2["problems"]:
            out.append(f"    why: {problem}")
        for fix in s2["fixes"]:
            out.append(f"    fix: {fix}")
    out.append("  levels           " + _format_levels(s2["levels"]))
    if s2["attention"]:
        out.append("  attention")
        out += _format_attention(s2["attention"])
    if "unet" in p2:
        extra = f"; frozen autoencoder {p2['frozen_autoencoder']:,}" if p2.get("frozen_autoencoder") else ""
        out.append(f"  parameters       UNet {p2['unet']:,}{extra}")
    else:
        out.append(f"  parameters       UNet cannot be built: {p2.get('error')}")
    out.append(f"  latents          {'encoded in every step' if s2['encodes_images'] else 'cached'}"
               f" (diffusion.training.cache_latents={_yaml_value(not s2['encodes_images'])}); "
               f"training batch_size {s2['training_batch_size']}")
    out += _format_measurement(s2["measurement"])
    out += _format_verdict((plan.get("verdicts") or {}).get("diffusion"))
    out.append("")

    # ---- how it was measured, advice
    if plan.get("measure_method"):
        out.append(f"Memory: one training step per stage at batch {plan['batch_size']}, each in a fresh process on "
                   f"{plan['device']}; measure: {plan['measure_method']}.")
    elif not plan["measured"]:
        out.append("Memory: not measured (--no-measure).")
    advice = plan.get("advice") or []
    knobs = [a for a in advice if a.get("kind", "knob") == "knob"]
    notes = [a for a in advice if a.get("kind") == "note"]
    if knobs:
        out.append("Advice (most effective first):")
        n = 0
        for stage in ("autoencoder", "diffusion"):
            items = [a for a in knobs if a["stage"] == stage]
            if not items:
                continue
            out.append(f"  {'stage 1' if stage == 'autoencoder' else 'stage 2'}:")
            for a in items:
                n += 1
                head = " ".join(f"--set {x}" for x in a["set"]) if a["set"] else a["key"]
                out.append(f"    {n}. {head}: {a['text']}")
    verdicts = [v for v in (plan.get("verdicts") or {}).values()]
    if verdicts and all(v and v.get("fits") for v in verdicts):
        out.append(f"Both stages fit the {_mib(plan['budget_mib'])} budget.")
    for a in notes:
        out.append(f"Note: {a['text']}")
    return "\n".join(out).rstrip() + "\n"


# ================================================================================================= CLI
def plan_main(argv: Sequence[str] | None = None) -> int:
    """``monai-diffusion-plan --config FILE [--set k=v ...] [--budget-gb G] [--no-measure] [--device D] [--json P]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker(argv[1], argv[2])
    parser = argparse.ArgumentParser(
        prog="monai-diffusion-plan",
        description="Plan a run without training: input/latent shapes per stage, total downsample factor, parameter "
                    "counts, whether the UNet fits the latent, measured peak memory and time of one training step "
                    "of each stage at batch 1, and what to change to fit a memory budget.",
    )
    add_config_args(parser)
    parser.add_argument("--budget-gb", type=float, default=None, metavar="GIB",
                        help="memory budget in GiB (e.g. the GPU's memory); says per stage whether it fits and, if "
                             "not, which config keys to change")
    parser.add_argument("--no-measure", action="store_true",
                        help="do not run the training steps (shapes, factors and parameters only)")
    parser.add_argument("--device", default=None, metavar="cpu|cuda",
                        help="where to measure (default: CUDA if device.use_cuda and a GPU is visible, else CPU)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch of the measured step (default 1)")
    parser.add_argument("--steps", type=int, default=1,
                        help="measured training steps per stage after one warm-up step (peak over all, fastest time; "
                             "default 1)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="give up a measurement after this many seconds")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON to PATH")
    args = parser.parse_args(argv)
    from .engine import RunError

    if args.budget_gb is not None and not args.budget_gb > 0:
        print(f"error: --budget-gb must be > 0, got {args.budget_gb}", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.steps < 1:
        print("error: --batch-size and --steps must be >= 1", file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args, check_paths=False, require_data=False)
        plan = make_plan(settings, measure=not args.no_measure, budget_gb=args.budget_gb, device=args.device,
                         batch_size=args.batch_size, steps=args.steps, timeout=args.timeout)
    except (ConfigError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plan["config"] = args.config
    plan["overrides"] = list(args.set or [])
    print(format_plan(plan), end="")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
    return 0


main = plan_main

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(plan_main())
