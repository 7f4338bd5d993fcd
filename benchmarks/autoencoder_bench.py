"""The autoencoder measurements shared by ``compression.py``, ``max_volume.py`` and ``quality.py``.

Plain functions: building the autoencoders that are compared (MONAI core's and this fork's), one training step,
peak-memory bookkeeping on CPU and GPU, and running a measurement in a fresh Python process so that each one starts
from a clean memory state. The machine description and result writing live in ``_common.py``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

# the one memory meter; CLEAN_MALLOC_ENV is used through this module by compression.py and max_volume.py
from monai_diffusion.memory import CLEAN_MALLOC_ENV, MIB, PeakMeter  # noqa: F401

from _common import REPO_ROOT

# Architecture shared by every compared model; only the resampling factors (and the implementation) change.
CHANNELS = (32, 64, 64)
ARCH = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "latent_channels": 3,
    "num_res_blocks": 1,
    "norm_num_groups": 32,
    "attention_levels": (False, False, True),
    "with_encoder_nonlocal_attn": True,
    "with_decoder_nonlocal_attn": True,
}

# name -> (implementation, downsample_factors, extra constructor arguments, human label)
# The core baseline is built with include_fc=False so that its attention does exactly what the fork's default
# attention does (monai-generative 0.2.3 never applied the output projection); "core-4x-fc" is core's own default.
FACTOR_SETTINGS: dict[str, tuple[str, Any, dict, str]] = {
    "core-4x": ("core", None, {"include_fc": False}, "MONAI core 4x (include_fc=False)"),
    "core-4x-fc": ("core", None, {"include_fc": True}, "MONAI core 4x (include_fc=True, core default)"),
    "4x": ("fork", None, {}, "fork 4x (None = [2, 2])"),
    "8x": ("fork", [4, 2], {}, "fork 8x [4, 2]"),
    "16x-8-2": ("fork", [8, 2], {}, "fork 16x [8, 2]"),
    "16x-4-4": ("fork", [4, 4], {}, "fork 16x [4, 4]"),
    "aniso": ("fork", [(2, 2, 1), (4, 4, 2)], {}, "fork anisotropic [(2,2,1), (4,4,2)] = (8, 8, 2)"),
}

BASELINE = "core-4x:fp32"

# Variant parts: a precision (fp32 default, bf16, fp16) and optional sdpa / ckpt, joined by "+".
VARIANT_ALIASES = {"recipe": "bf16+sdpa+ckpt"}
PRECISIONS = ("fp32", "bf16", "fp16")


def parse_variant(name: str) -> dict[str, Any]:
    """Turn a variant name such as ``bf16+sdpa`` or ``recipe`` into precision / attention / checkpointing flags."""
    parts = VARIANT_ALIASES.get(name, name).split("+")
    flags = {"precision": "fp32", "sdpa": False, "ckpt": False}
    for part in parts:
        if part in PRECISIONS:
            flags["precision"] = part
        elif part in ("sdpa", "ckpt"):
            flags[part] = True
        else:
            raise ValueError(f"unknown variant part {part!r} in {name!r}; use fp32|bf16|fp16, sdpa, ckpt or 'recipe'")
    return flags


def parse_run(spec: str) -> tuple[str, str]:
    """Split ``setting:variant`` (variant defaults to fp32) and check both names."""
    setting, _, variant = spec.partition(":")
    variant = variant or "fp32"
    if setting not in FACTOR_SETTINGS:
        raise ValueError(f"unknown factor setting {setting!r}; choose from {sorted(FACTOR_SETTINGS)}")
    parse_variant(variant)
    return setting, variant


def total_factor(factors: Any, extra: dict | None = None) -> tuple[int, int, int]:
    """Per-axis total factor of a factor setting: the ``initial_downsample_factor`` among its extra constructor
    arguments (default 1) times the product of its downsample factors (None = one 2 per level), computed by the
    fork's own helpers."""
    from generative.networks.nets.autoencoderkl import normalize_factor, normalize_factors
    from generative.networks.nets.autoencoderkl import total_factor as product

    levels = normalize_factors(factors, len(CHANNELS) - 1, 3)
    initial = normalize_factor((extra or {}).get("initial_downsample_factor", 1), 3, "initial_downsample_factor")
    return product((initial, *levels))


def build_autoencoder(setting: str, variant: str) -> torch.nn.Module:
    """Build the autoencoder of a factor setting with the attention / checkpointing flags of a variant."""
    impl, factors, extra, _ = FACTOR_SETTINGS[setting]
    flags = parse_variant(variant)
    if impl == "core":
        from monai.networks.nets import AutoencoderKL

        return AutoencoderKL(
            channels=CHANNELS,
            use_flash_attention=flags["sdpa"],
            use_checkpoint=flags["ckpt"],
            **ARCH,
            **extra,
        )
    from generative.networks.nets import AutoencoderKL

    return AutoencoderKL(
        num_channels=CHANNELS,
        downsample_factors=factors,
        use_flash_attention=flags["sdpa"],
        use_checkpointing=flags["ckpt"],
        **ARCH,
        **extra,
    )


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)), summed over latent elements and averaged over the batch (as in stage 1)."""
    z_mu, z_sigma = z_mu.float(), z_sigma.float()
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1)
    return kl.flatten(1).sum(dim=1).mean()


def amp_dtype(precision: str) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def train_step(model, optimizer, x, precision: str, scaler=None, kl_weight: float = 1e-6):
    """One autoencoder step: forward, L1 + kl_weight * KL, backward, optimizer step. Returns (loss, z_mu)."""
    dtype = amp_dtype(precision)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        recon, z_mu, z_sigma = model(x)
        loss = (recon.float() - x.float()).abs().mean() + kl_weight * kl_divergence(z_mu, z_sigma)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach(), z_mu.detach()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_activation_breakdown(model, x, precision: str, attention_tokens: int) -> dict[str, float]:
    """MiB of tensors the forward pass keeps for backward, by where they live in the network.

    Runs one forward pass (and the loss) under ``torch.autograd.graph.saved_tensors_hooks`` and adds up the distinct
    storages it saves, in four groups: full-resolution tensors (as many voxels as the input), attention matrices
    (last two dimensions both equal to the number of attention tokens), other activations (the lower-resolution
    levels), and parameters. This is the memory held when backward starts; the measured peak adds gradients and
    temporary buffers on top. Not meaningful with checkpointing (the checkpointed blocks save only their inputs).
    """
    full = math.prod(x.shape[2:])
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_shapes = {tuple(p.shape) for p in model.parameters()}  # also catches autocast's low-precision weight copies
    # with as many tokens as channels, (tokens x channels) tensors look like attention matrices; the attention is
    # negligible at such sizes anyway, so count nothing as attention then
    if attention_tokens == CHANNELS[-1]:
        attention_tokens = 0
    seen: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in params or tuple(t.shape) in param_shapes:
            group = "parameters"
        elif t.dim() >= 2 and attention_tokens > 1 and t.shape[-1] == t.shape[-2] == attention_tokens:
            group = "attention matrices"
        elif t.dim() >= 3 and math.prod(t.shape[2:]) == full:
            group = "full resolution"
        else:
            group = "lower-resolution levels"
        if ptr not in seen or storage.nbytes() > seen[ptr][1]:
            seen[ptr] = (group, storage.nbytes())
        return t

    dtype = amp_dtype(precision)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device_type=x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            recon, z_mu, z_sigma = model(x)
            loss = (recon.float() - x.float()).abs().mean() + 1e-6 * kl_divergence(z_mu, z_sigma)
    del loss, recon, z_mu, z_sigma
    out = {g: 0.0 for g in ("full resolution", "attention matrices", "lower-resolution levels", "parameters")}
    for group, nbytes in seen.values():
        out[group] += nbytes / MIB
    return out


def measure_training(
    setting: str,
    variant: str,
    size: list[int],
    steps: int,
    warmup: int,
    device: str = "cpu",
    seed: int = 0,
    batch: int = 1,
    anatomy: bool = True,
) -> dict[str, Any]:
    """Build one configuration and time ``warmup + steps`` training steps; report memory above the built state.

    Time: wall-clock (CUDA-synchronised) and process CPU time of each step after the warm-up. With ``anatomy``,
    one more forward pass afterwards records what it saves for backward (``saved_activation_breakdown``).

    Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` after the model, optimizer and input exist,
    minus what was allocated at that point; on CPU the process' peak RSS from that point on (``VmHWM``, reset then
    by ``monai_diffusion.memory.PeakMeter``) minus its RSS at that point. Either way the number is what the training
    step adds: activations, gradients, optimizer state and temporary buffers (plus, on CPU, allocator and library
    overhead). Call this in a fresh process.
    """
    flags = parse_variant(variant)
    dev = torch.device(device)
    if flags["precision"] == "fp16" and dev.type != "cuda":
        raise ValueError("fp16 autocast is only measured on CUDA")
    torch.manual_seed(seed)
    model = build_autoencoder(setting, variant).to(dev)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler("cuda") if flags["precision"] == "fp16" else None
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, 1, *size), generator=gen).to(dev)
    sync(dev)
    meter = PeakMeter(dev)
    meter.start()
    base = torch.cuda.memory_allocated(dev) / MIB if meter.cuda else meter.rss_mib()
    times, cpu_times, loss, z_mu = [], [], None, None
    for i in range(warmup + steps):
        sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        loss, z_mu = train_step(model, optimizer, x, flags["precision"], scaler)
        sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    peak_total = meter.peak_mib() if meter.cuda else base + meter.rise_mib()
    breakdown = None
    if anatomy and not flags["ckpt"]:
        f = total_factor(*FACTOR_SETTINGS[setting][1:3])
        breakdown = saved_activation_breakdown(model, x, flags["precision"], math.prod(s // a for s, a in zip(size, f)))
    latent_shape = list(z_mu.shape[1:])
    n_in = 1
    for s in size:
        n_in *= s
    n_latent = 1
    for s in latent_shape:
        n_latent *= s
    return {
        "setting": setting,
        "variant": variant,
        **flags,
        "implementation": FACTOR_SETTINGS[setting][0],
        "label": FACTOR_SETTINGS[setting][3],
        "downsample_factors": FACTOR_SETTINGS[setting][1],
        "total_factor": list(total_factor(*FACTOR_SETTINGS[setting][1:3])),
        "input_shape": [batch, 1, *size],
        "latent_shape": latent_shape,
        "latent_elements": n_latent,
        "compression": n_in / n_latent,
        "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "step_times_s": times,
        "median_step_s": statistics.median(times) if times else None,
        "cpu_times_s": cpu_times,
        "median_cpu_s": statistics.median(cpu_times) if cpu_times else None,
        "base_mib": base,
        "peak_total_mib": peak_total,
        "peak_mib": peak_total - base,
        "final_loss": float(loss),
        "saved_for_backward_mib": breakdown,
        "torch_threads": torch.get_num_threads(),
    }


def adam_state_mib(parameters: int) -> float:
    """Adam's two fp32 moment buffers. They are created at the end of the first step, after its peak, so a
    single-step measurement adds them by hand."""
    return 2 * 4 * parameters / MIB


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the measuring processes.

    ``OMP_WAIT_POLICY=PASSIVE`` (unless already set) makes idle OpenMP threads sleep instead of spinning. On a CPU
    shared with other processes, spinning threads burn CPU time while their partner thread is descheduled, which
    made both wall-clock and CPU-time measurements swing by 2-3x between identical runs; with passive waiting
    the process CPU time per step is stable to about 10-15%.
    """
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(extra or {})
    return env


def run_worker_subprocess(
    script: Path, payload: dict, timeout: float | None = None, extra_env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python script --worker '<json>'`` and return the JSON it prints on its last stdout line.

    A crash, an out-of-memory kill or a timeout comes back as ``{"error": ...}`` instead of an exception, so a
    sweep goes on with the next configuration.
    """
    cmd = [sys.executable, str(script), "--worker", json.dumps(payload)]
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=worker_env(extra_env)
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit code {proc.returncode}: " + " | ".join(tail), "wall_s": wall}
    result = json.loads(lines[-1])
    result["wall_s"] = wall
    result["loadavg_1min_before"] = load_before[0]
    result["loadavg_1min_after"] = os.getloadavg()[0]
    return result
