"""Our autoencoder side by side with MAISI's (issue 26, parts 1-3): training cost, reconstruction at equal budget,
and large-volume decoding.

MAISI's VAE is MONAI core's ``AutoencoderKlMaisi`` configured as MAISI's network config ships it (:data:`MAISI_ARGS`:
4x, 4 latent channels, channels 64/128/256, two residual blocks per level, convolutions split in 4 along the second
spatial axis). It is compared with the fork's ``AutoencoderKL``:

1. **Training cost at equal input.** One training step (forward, L1 + 1e-6 x KL, backward, Adam: the step of
   ``autoencoder_bench.train_step``) of MAISI and of the fork with the same channels, residual blocks and latent
   channels at 4x, 8x ``[4, 2]`` and 16x ``[8, 2]``; the fork at 8x with 32 latent channels (as many latent values as
   MAISI's 4x with 4) with and without gradient checkpointing; and the 8x config's network as the factors guide
   recommends it (``recipe``). fp32 and bf16 autocast; peak memory and the median step time after a warm-up, as
   ratios to MAISI's.
2. **Reconstruction at equal budget.** Each model trains on the built-in ``brain`` data with the same losses, batch,
   learning rate and batch order for the same time, MAISI first; "equal steps" is the number of steps MAISI made in
   that time, and every other model's weights are kept when it reaches it. Both snapshots are measured on the
   validation volumes: PSNR, SSIM, MS-SSIM (``evaluation.reconstruction_metrics``), the classifier two-sample test
   of reconstructions against the real volumes (``evaluation.c2st_accuracy``) and the intensity-histogram W1
   (``evaluation.histogram_w1``). On the CPU every model is built at one reduced width (MAISI's class unchanged).
3. **Large-volume decode.** One latent, decoded by MAISI's decoder whole and the way MAISI's inference decodes
   (MONAI's ``SlidingWindowInferer`` over the latent: roi 96^3 latent voxels, overlap 0.6667, Gaussian blending,
   sw_batch_size 1, output gathered on the CPU), and by the fork's 4x with MAISI's architecture whole and in exact
   tiles: peak memory, time, and the largest and mean deviation from the whole decode as a fraction of its standard
   deviation. Ours must stay <= 1e-4 (the script fails otherwise); MAISI's is reported.

Every measurement runs in its own process (the dry run: one process per part) and the results are rewritten after
each one: ``benchmarks/results/vs_maisi_<device>.{json,md,png}`` (``--out STEM`` elsewhere).

    python benchmarks/vs_maisi.py                                # CPU, about 20 minutes on a shared 2-core machine
    python benchmarks/vs_maisi.py --device cuda                  # GPU sizes: 128^3 steps, shipped widths, 512^3 decode
    python benchmarks/vs_maisi.py --dry-run --out /tmp/vs_maisi  # tiny, every code path, well under a minute
    python benchmarks/vs_maisi.py --parts 3 --decode-sizes 96    # some parts only, other sizes
    python benchmarks/vs_maisi.py --render benchmarks/results/vs_maisi_cpu.json   # rewrite its .md and .png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

# Torch is imported only where it is used (in the measuring processes, whose environment autoencoder_bench.worker_env
# sets: OMP_WAIT_POLICY=PASSIVE, glibc's clean-malloc threshold), so that gpu_suite.py can import MAISI_ARGS from here.

# ------------------------------------------------------------------------------------------------------ MAISI
# MAISI's VAE as its network config ships it (MONAI model zoo maisi_ct_generative, configs/config_network_rflow.json,
# "autoencoder_def"); gpu_suite.py imports it from here. norm_float16 (GroupNorm output in fp16) only works inside
# fp16 autocast, as MAISI infers on a GPU; training rows use the same network with it off.
MAISI_ARGS = dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, num_channels=(64, 128, 256),
                  num_res_blocks=(2, 2, 2), norm_num_groups=32, norm_eps=1e-6,
                  attention_levels=(False, False, False), with_encoder_nonlocal_attn=False,
                  with_decoder_nonlocal_attn=False, use_checkpointing=False, use_convtranspose=False,
                  norm_float16=True, num_splits=4, dim_split=1)
# MAISI's sliding-window decode (its inference config: autoencoder_sliding_window_infer_size [96, 96, 96] latent
# voxels, autoencoder_sliding_window_infer_overlap 0.6667; SlidingWindowInferer with mode "gaussian", sw_batch_size 1,
# the output gathered on the CPU). MAISI decodes whole when the latent is no larger than the window. At sizes where
# 96^3 would cover the whole latent (everything below a 384^3 output), this script keeps the window's fraction of
# the latent that MAISI uses for a 512^3 output (96 of 128 latent voxels per axis, 0.75), so that windows overlap.
MAISI_SW_ROI = 96
MAISI_SW_OVERLAP = 0.6667
MAISI_SW_FRACTION = 96 / 128

# widths: (channels, norm groups). "shipped" is MAISI's; "reduced" trains in minutes on a CPU; "tiny" is the dry run's
WIDTHS = {"shipped": ((64, 128, 256), 32), "reduced": ((16, 32, 32), 8), "tiny": ((4, 8, 8), 4)}
# the 8x config's network (monai_diffusion/config/examples/ldm_config_8x_downsample.yaml) at each width
RECIPE_WIDTHS = {"shipped": ((32, 64, 64), 32), "reduced": ((16, 32, 32), 8), "tiny": ((4, 8, 8), 4)}

# name -> (label, fork constructor overrides; None = MAISI)
MODELS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "maisi": ("MAISI AutoencoderKlMaisi 4x (num_splits 4, dim_split 1)", None),
    "4x": ("fork 4x, MAISI's architecture", {"downsample_factors": None}),
    "8x": ("fork 8x [4, 2], MAISI's architecture", {"downsample_factors": [4, 2]}),
    "16x": ("fork 16x [8, 2], MAISI's architecture", {"downsample_factors": [8, 2]}),
    "8x-lat32": ("fork 8x [4, 2], 32 latent channels (MAISI's latent size)",
                 {"downsample_factors": [4, 2], "latent_channels": 32}),
    "8x-lat32-ckpt": ("fork 8x [4, 2], 32 latent channels, gradient checkpointing",
                      {"downsample_factors": [4, 2], "latent_channels": 32, "use_checkpointing": True}),
    "recipe": ("fork 8x recipe: the 8x config's network (1 res block, 3 latent ch, attention + SDPA, ckpt)", {}),
}
STEP_MODELS = ["maisi", "4x", "8x", "16x", "8x-lat32", "8x-lat32-ckpt", "recipe"]
TRAIN_MODELS = ["maisi", "4x", "8x", "16x", "8x-lat32", "recipe"]
DRY_STEP_MODELS = ["maisi", "8x-lat32"]
DRY_TRAIN_MODELS = ["maisi", "8x-lat32"]
PRECISIONS = ["fp32", "bf16"]
EXACT_BOUND = 1e-4

# sizes and budgets per mode: part 1 input, part 2 data and budget, part 3 output sizes
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(step_size=[32, 64, 32], steps=3, warmup=1, step_width="shipped",
                data_size=[32, 48, 32], num_train=16, num_val=16, train_width="reduced", batch=2, lr=1e-3,
                budget_s=75.0, clock="cpu", c2st_epochs=30, decode_sizes=[64], decode_width="shipped"),
    "full": dict(step_size=[128, 128, 128], steps=3, warmup=1, step_width="shipped",
                 data_size=[48, 64, 48], num_train=8, num_val=8, train_width="shipped", batch=2, lr=1e-4,
                 budget_s=8.0, clock="wall", c2st_epochs=30, decode_sizes=[256, 512], decode_width="shipped"),
    "dry": dict(step_size=[16, 32, 16], steps=1, warmup=0, step_width="tiny",
                data_size=[16, 32, 16], num_train=4, num_val=8, train_width="tiny", batch=2, lr=1e-3,
                budget_s=0.5, clock="wall", c2st_epochs=2, decode_sizes=[32], decode_width="tiny"),
}
PART_TITLES = {1: "Training cost at equal input", 2: "Reconstruction at equal budget (brain)",
               3: "Large-volume decode: MAISI's sliding window vs exact tiles"}
PART_SHARES = {1: 0.30, 2: 0.25, 3: 0.45}  # of --budget-min, when given (the 512^3 decode needs the most)


# ====================================================================================================== models
def build(name: str, width: str, dry: bool = False) -> Any:
    """The model ``name`` of :data:`MODELS` at ``width`` (a key of :data:`WIDTHS`); the dry run uses one residual
    block per level and two splits."""
    channels, groups = WIDTHS[width]
    blocks = (1, 1, 1) if dry else tuple(MAISI_ARGS["num_res_blocks"])
    _, extra = MODELS[name]
    if extra is None:
        from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

        return AutoencoderKlMaisi(**{**MAISI_ARGS, "num_channels": channels, "norm_num_groups": groups,
                                     "num_res_blocks": blocks, "norm_float16": False,
                                     "num_splits": 2 if dry else MAISI_ARGS["num_splits"]})
    from generative.networks.nets import AutoencoderKL

    if name == "recipe":
        channels, groups = RECIPE_WIDTHS[width]
        return AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, num_channels=channels,
                             latent_channels=3, num_res_blocks=1, norm_num_groups=groups,
                             attention_levels=(False, False, True), with_encoder_nonlocal_attn=True,
                             with_decoder_nonlocal_attn=True, downsample_factors=[4, 2], use_flash_attention=True,
                             use_checkpointing=True)
    args = dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=MAISI_ARGS["latent_channels"],
                num_channels=channels, num_res_blocks=blocks, norm_num_groups=groups, norm_eps=MAISI_ARGS["norm_eps"],
                attention_levels=(False, False, False), with_encoder_nonlocal_attn=False,
                with_decoder_nonlocal_attn=False)
    return AutoencoderKL(**{**args, **extra})


def latent_values(model: Any, size: list[int]) -> int:
    """Latent values per volume of ``size`` (MAISI is 4x per axis)."""
    if hasattr(model, "latent_shape"):
        return math.prod(model.latent_shape((1, 1, *size))[1:])
    return MAISI_ARGS["latent_channels"] * math.prod(n // 4 for n in size)


# ====================================================================================================== workers
def _sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"


def job_step(p: dict[str, Any]) -> dict[str, Any]:
    """Part 1: warm-up steps, then ``steps`` timed training steps; peak memory of the timed steps."""
    import torch

    import autoencoder_bench as bench
    from monai_diffusion.memory import PeakMeter, process_peak_mib, tensor_bytes

    dev = torch.device(p["device"])
    torch.manual_seed(0)
    model = build(p["model"], p["width"], p["dry"]).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand((1, 1, *p["size"]), generator=torch.Generator().manual_seed(0)).to(dev)
    for _ in range(p["warmup"]):
        bench.train_step(model, opt, x, p["precision"])
    _sync(dev)
    meter = PeakMeter(dev)
    meter.start(static_bytes=tensor_bytes([model], [opt], [x]))
    walls, cpus, loss = [], [], None
    for _ in range(p["steps"]):
        _sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        loss, _ = bench.train_step(model, opt, x, p["precision"])
        _sync(dev)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    if p["warmup"] == 0 and dev.type != "cuda":
        # no warm-up: Adam's moments were created after the first step's peak; count them as the warm-up would
        meter.static_mib += bench.adam_state_mib(sum(q.numel() for q in model.parameters()))
    return {"peak_mib": meter.peak_mib(), "process_peak_mib": process_peak_mib(dev),
            "memory_method": meter.method, "step_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
            "step_times_s": walls, "loss": float(loss), "parameters": sum(q.numel() for q in model.parameters()),
            "latent_values": latent_values(model, p["size"])}


def job_data(p: dict[str, Any]) -> dict[str, Any]:
    """Part 2's volumes, generated in memory and saved as one ``.npz`` (train, val)."""
    import numpy as np

    from monai_diffusion.synthetic import generate_volume

    t0 = time.perf_counter()
    kind = p["kind"]
    train = [generate_volume(kind, p["size"], seed=0, split="train", index=i) for i in range(p["num_train"])]
    val = [generate_volume(kind, p["size"], seed=0, split="val", index=i) for i in range(p["num_val"])]
    np.savez(p["path"], train=np.stack(train)[:, None], val=np.stack(val)[:, None])
    return {"kind": kind, "size": p["size"], "num_train": len(train), "num_val": len(val),
            "seconds": time.perf_counter() - t0}


def _reconstruct(model: Any, volumes: Any, dev: Any) -> Any:
    import torch

    out = []
    model.eval()
    with torch.no_grad():
        for i in range(volumes.shape[0]):
            z_mu, _ = model.encode(volumes[i:i + 1].to(dev))
            out.append(model.decode(z_mu).float().cpu())
    model.train()
    return torch.cat(out)


def _quality(model: Any, val: Any, dev: Any, c2st_epochs: int) -> dict[str, Any]:
    """Validation PSNR, SSIM, MS-SSIM, and evaluate's C2ST and W1 of the reconstructions against the volumes."""
    from monai_diffusion.evaluation import C2STSettings, c2st_accuracy, histogram_w1, reconstruction_metrics

    recon = _reconstruct(model, val, dev)
    m = reconstruction_metrics(val, recon, data_range=1.0)
    c2st = c2st_accuracy(val, recon, seed=0, settings=C2STSettings(epochs=c2st_epochs),
                         names={"real": "validation volumes", "samples": "reconstructions"})
    return {"psnr": m["psnr"], "ssim": m["ssim"], "ms_ssim": m["ms_ssim"], "l1": m["l1"],
            "c2st_recon_vs_real": c2st["accuracy"], "w1_recon_vs_real": histogram_w1(val, recon)}


def job_train(p: dict[str, Any]) -> dict[str, Any]:
    """Part 2: train until the clock reaches ``budget_s`` and, when given, the step count ``equal_steps`` (at most
    twice the budget); keep the weights at ``equal_steps``; measure both snapshots afterwards (not on the clock)."""
    import copy

    import numpy as np
    import torch

    import autoencoder_bench as bench
    from monai_diffusion.memory import PeakMeter, tensor_bytes

    dev = torch.device(p["device"])
    data = np.load(p["data"])
    train, val = torch.from_numpy(data["train"]).float(), torch.from_numpy(data["val"]).float()
    torch.manual_seed(0)
    model = build(p["model"], p["width"], p["dry"]).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=p["lr"])
    order = torch.Generator().manual_seed(0)
    cpu_clock = p["clock"] == "cpu"

    def clock() -> float:
        _sync(dev)
        return time.process_time() if cpu_clock else time.perf_counter()

    meter = PeakMeter(dev)
    meter.start(static_bytes=tensor_bytes([model], [], [train]))
    budget, target = p["budget_s"], p.get("equal_steps")
    step, snapshot, at_steps_clock, losses, perm = 0, None, None, [], []
    t0, w0 = clock(), time.perf_counter()
    while True:
        used = clock() - t0
        if used >= 2 * budget or (used >= budget and (target is None or step >= target)):
            break
        if len(perm) < p["batch"]:
            perm = torch.randperm(train.shape[0], generator=order).tolist()
        idx, perm = perm[:p["batch"]], perm[p["batch"]:]
        loss, _ = bench.train_step(model, opt, train[idx].to(dev), "fp32")
        losses.append(float(loss))
        step += 1
        if target is not None and step == target:
            snapshot, at_steps_clock = copy.deepcopy(model.state_dict()), clock() - t0
    used, wall = clock() - t0, time.perf_counter() - w0
    result: dict[str, Any] = {"steps": step, "clock": p["clock"], "clock_s": used, "wall_s": wall,
                              "peak_mib": meter.peak_mib(), "first_loss": losses[0] if losses else None,
                              "last_loss": statistics.mean(losses[-5:]) if losses else None,
                              "parameters": sum(q.numel() for q in model.parameters()),
                              "latent_values": latent_values(model, list(train.shape[2:]))}
    result["at_time"] = {"steps": step, "clock_s": used, **_quality(model, val, dev, p["c2st_epochs"])}
    if target is None:
        result["at_steps"] = dict(result["at_time"])  # the reference model: equal steps are its own
    elif snapshot is not None:
        model.load_state_dict(snapshot)
        result["at_steps"] = {"steps": target, "clock_s": at_steps_clock,
                              **_quality(model, val, dev, p["c2st_epochs"])}
    else:
        result["at_steps"] = {"error": f"reached {step} of {target} steps within twice the budget"}
    return result


class _Decoder:
    """What MAISI's inference hands the sliding-window inferer: a module whose call decodes a latent window."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, z: Any) -> Any:
        return self.model.decode_stage_2_outputs(z)


def sliding_window_roi(latent: list[int]) -> list[int]:
    """MAISI's window (96 latent voxels per axis), or where that covers the whole latent, 0.75 of each axis."""
    if all(n > MAISI_SW_ROI for n in latent):
        return [MAISI_SW_ROI] * len(latent)
    return [max(1, round(n * MAISI_SW_FRACTION)) for n in latent]


def _deviation_map(diff: Any, limit: int = 96) -> list[list[float]]:
    """The middle slice (first axis) of a deviation volume, max-pooled to at most ``limit`` per side."""
    import torch

    s = diff[0, 0, diff.shape[2] // 2].float()
    k = max(1, math.ceil(max(s.shape) / limit))
    if k > 1:
        s = torch.nn.functional.max_pool2d(s[None, None], k, ceil_mode=True)[0, 0]
    return [[float(f"{v:.3g}") for v in row] for row in s.tolist()]


def job_decode(p: dict[str, Any]) -> dict[str, Any]:
    """Part 3: one decode of the shared latent; ``whole`` passes save their output, the others compare with it."""
    import torch

    from monai_diffusion.memory import PeakMeter, process_peak_mib

    dev = torch.device(p["device"])
    if dev.type == "cuda":  # the bound is fp32's: no TF32 in either pass
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    name = "maisi" if p["model"] == "maisi" else "4x"
    model = build(name, p["width"], p["dry"]).eval().to(dev)
    latent_size = [n // 4 for n in p["size"]]
    z = torch.randn((1, MAISI_ARGS["latent_channels"], *latent_size), generator=torch.Generator().manual_seed(1))
    z = z.to(dev)
    extra: dict[str, Any] = {}
    if p["mode"] == "whole":
        run = lambda: model.decode(z)  # noqa: E731
    elif p["mode"] == "tiles":
        tile = [max(4, n // 2 // 4 * 4) for n in p["size"]]  # about half of each axis, a multiple of 4
        extra["tile"] = tile
        run = lambda: model.decode_tiled(z, tile_size=tile)  # noqa: E731
    else:
        from monai.inferers import SlidingWindowInferer

        roi = sliding_window_roi(latent_size)
        extra.update(roi_latent=roi, overlap=MAISI_SW_OVERLAP, mode="gaussian")
        inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=1, overlap=MAISI_SW_OVERLAP, mode="gaussian",
                                       sw_device=dev, device=torch.device("cpu"), progress=False)
        run = lambda: inferer(z, _Decoder(model))  # noqa: E731
    meter = PeakMeter(dev)
    meter.start()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = run()
    _sync(dev)
    row = {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "peak_mib": meter.peak_mib(),
           "process_peak_mib": process_peak_mib(dev), "output_shape": list(out.shape), **extra}
    ref_path = Path(p["ref"])
    out = out.float().cpu()
    if p["mode"] == "whole":
        torch.save(out, ref_path)
        row["std"] = float(out.std())
        return row
    ref = torch.load(ref_path, weights_only=True)
    std = ref.std()
    diff = (out - ref).abs() / std
    row.update(max_dev=float(diff.max()), mean_dev=float(diff.mean()), map=_deviation_map(diff))
    if p["model"] != "maisi":
        bound = p.get("exact_bound", EXACT_BOUND)
        row["exact"] = row["max_dev"] <= bound
        if not row["exact"]:
            row["error"] = f"exact tiled decode deviates by {row['max_dev']:.2e} x std (bound {bound:g})"
    return row


JOBS = {"step": job_step, "data": job_data, "train": job_train, "decode": job_decode}


def worker(jobs: list[dict[str, Any]]) -> None:
    """Run jobs in this process, printing one ``VS-ROW`` line each (an exception is that job's row)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    for job in jobs:
        try:
            row = JOBS[job["job"]](job)
        except Exception as exc:  # noqa: BLE001 - an out-of-memory or a kernel error is this row's result
            row = {"error": _error(exc)}
        print("VS-ROW " + json.dumps({"key": job["key"], **row}), flush=True)
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ====================================================================================================== main side
def run_jobs(jobs: list[dict[str, Any]], timeout: float | None) -> list[dict[str, Any]]:
    """``jobs`` in one fresh process (clean allocator, peak measured from there); a kill at ``timeout`` keeps the
    rows printed until then and marks the rest."""
    import autoencoder_bench as bench

    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(jobs)]
    env = bench.worker_env(bench.CLEAN_MALLOC_ENV)
    here = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join([here, str(_common.REPO_ROOT), str(_common.REPO_ROOT / "GenerativeModels"),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("PYTHONWARNINGS", "ignore")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=_common.REPO_ROOT)
        out, why = proc.stdout, f"worker exit code {proc.returncode}: " + " | ".join(
            proc.stderr.strip().splitlines()[-3:])
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        why = f"killed at its timeout ({timeout:.0f} s)"
    rows = {r["key"]: r for r in (json.loads(ln[7:]) for ln in out.splitlines() if ln.startswith("VS-ROW "))}
    return [rows.get(j["key"], {"key": j["key"], "error": why}) for j in jobs]


def groups(jobs: list[dict[str, Any]], dry: bool, device: str) -> list[list[dict[str, Any]]]:
    """Processes to run: the dry run one for all; on CUDA one per model (the allocator's peak is reset before each
    measurement, so measurements can share a process); on a CPU one per measurement (its resident memory cannot be
    given back reliably)."""
    if dry:
        return [jobs]
    if device.startswith("cuda"):
        out: dict[str, list[dict[str, Any]]] = {}
        for j in jobs:
            out.setdefault(f"{j['model']} {j.get('size')}", []).append(j)
        return list(out.values())
    return [[j] for j in jobs]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else args.device
        self.cfg = dict(PRESETS["dry" if self.dry else ("full" if args.full or self.device == "cuda" else "cpu")])
        if args.size:
            self.cfg["step_size"] = args.size
        if args.decode_sizes:
            self.cfg["decode_sizes"] = args.decode_sizes
        if args.budget_s:
            self.cfg["budget_s"] = args.budget_s
        self.stem = Path(args.out) if args.out else _common.RESULTS_DIR / f"vs_maisi_{self.device.split(':')[0]}"
        self.work = Path(args.work or tempfile.mkdtemp(prefix="vs_maisi_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()
        self.deadline: float | None = None
        self.report: dict[str, Any] = {
            "command": " ".join(["python benchmarks/vs_maisi.py", *sys.argv[1:]]),
            "machine": _common.machine_info(self.device), "dry_run": self.dry, "settings": self.cfg,
            "maisi_args": MAISI_ARGS, "widths": {k: list(v[0]) for k, v in WIDTHS.items()},
            "models": {k: v[0] for k, v in MODELS.items()}, "parts": {},
        }

    # ------------------------------------------------------------------------------------------- bookkeeping
    def timeout(self, cap: float | None = None) -> float | None:
        """Seconds the next process may take: the part's deadline (with ``--budget-min``), else ``cap``; None when
        less than 5 s are left."""
        if self.deadline is None:
            return cap
        left = self.deadline - time.perf_counter()
        return None if left < 5 else (min(left, cap) if cap else left)

    def models(self, default: list[str]) -> list[str]:
        """``--models`` (in the default's order, MAISI always first), else ``default``."""
        if not self.args.models:
            return default
        return ["maisi"] + [m for m in MODELS if m in self.args.models and m != "maisi"]

    def part(self, key: int) -> dict[str, Any]:
        if self.args.budget_min:
            todo = [p for p in self.args.parts if p >= key]
            left = self.start + 60 * self.args.budget_min - time.perf_counter()
            self.deadline = time.perf_counter() + max(0.0, left) * PART_SHARES[key] / sum(PART_SHARES[p] for p in todo)
        entry = {"title": PART_TITLES[key], "rows": [], "started_s": round(time.perf_counter() - self.start, 1)}
        self.report["parts"][str(key)] = entry
        print(f"== part {key}: {PART_TITLES[key]}", flush=True)
        return entry

    def add(self, entry: dict[str, Any], row: dict[str, Any]) -> None:
        entry["rows"].append(row)
        state = f"error {row['error']}" if row.get("error") else "ok"
        print(f"   {row.get('key')}: {state}", flush=True)
        self.save()

    def save(self) -> None:
        self.report["seconds"] = round(time.perf_counter() - self.start, 1)
        _common.write_results(self.stem, self.report, render(self.report))

    # ------------------------------------------------------------------------------------------------ parts
    def part1(self) -> None:
        entry = self.part(1)
        c = self.cfg
        entry["setup"] = {"size": c["step_size"], "batch": 1, "width": c["step_width"], "steps": c["steps"],
                          "warmup": c["warmup"], "losses": "L1 + 1e-6 x KL, Adam 1e-4"}
        jobs = [{"job": "step", "key": f"{m} {prec}", "model": m, "precision": prec, "size": c["step_size"],
                 "width": c["step_width"], "steps": c["steps"], "warmup": c["warmup"], "device": self.device,
                 "dry": self.dry}
                for m in self.models(DRY_STEP_MODELS if self.dry else STEP_MODELS) for prec in PRECISIONS]
        for group in groups(jobs, self.dry, self.device):
            t = self.timeout(1800)
            rows = run_jobs(group, t) if t else [{"key": j["key"], "error": "skipped: time share spent"}
                                                 for j in group]
            for job, row in zip(group, rows):
                self.add(entry, {**row, "model": job["model"], "precision": job["precision"]})
        ratios(entry["rows"])
        self.save()

    def part2(self) -> None:
        entry = self.part(2)
        c = self.cfg
        kind = "brain"
        import importlib.util

        if importlib.util.find_spec("nilearn") is None:
            if not self.dry:
                raise SystemExit("error: part 2 trains on the built-in 'brain' data, which needs nilearn "
                                 "(pip install 'nilearn>=0.10'); run --parts 1 3 without it")
            kind = "phantom"  # the dry run must run where nilearn is missing (CI)
        data = self.work / f"{kind}_{'x'.join(map(str, c['data_size']))}.npz"
        entry["setup"] = {"dataset": kind, "size": c["data_size"], "num_train": c["num_train"],
                          "num_val": c["num_val"], "width": c["train_width"], "batch": c["batch"], "lr": c["lr"],
                          "budget_s": c["budget_s"], "clock": c["clock"], "c2st_epochs": c["c2st_epochs"],
                          "losses": "L1 + 1e-6 x KL, Adam, fp32, the same seeds and batch order for every model"}
        data_job = {"job": "data", "key": "data", "kind": kind, "size": c["data_size"], "num_train": c["num_train"],
                    "num_val": c["num_val"], "path": str(data)}
        models = self.models(DRY_TRAIN_MODELS if self.dry else TRAIN_MODELS)
        train_jobs = [{"job": "train", "key": f"{m}", "model": m, "width": c["train_width"], "data": str(data),
                       "batch": c["batch"], "lr": c["lr"], "budget_s": c["budget_s"], "clock": c["clock"],
                       "c2st_epochs": c["c2st_epochs"], "device": self.device, "dry": self.dry} for m in models]
        if self.dry:  # one process; the equal step count is the dry run's fixed 2
            for j in train_jobs:
                j["equal_steps"] = 2
            rows = run_jobs([data_job, *train_jobs], self.timeout(600))
            for job, row in zip([data_job, *train_jobs], rows):
                self.add(entry, {**row, "model": job.get("model")})
        else:
            t = self.timeout(900)
            row = run_jobs([data_job], t)[0] if t else {"key": "data", "error": "skipped: time share spent"}
            self.add(entry, row)
            if row.get("error"):
                return
            target = None
            for job in train_jobs:  # MAISI first: its steps in the budget are everyone's "equal steps"
                job["equal_steps"] = None if job["model"] == "maisi" else target
                t = self.timeout(4 * c["budget_s"] + 600)
                row = run_jobs([job], t)[0] if t else {"key": job["key"], "error": "skipped: time share spent"}
                if job["model"] == "maisi":
                    target = row.get("steps") or None
                self.add(entry, {**row, "model": job["model"]})
        entry["equal_steps"] = next((r.get("at_steps", {}).get("steps") for r in entry["rows"]
                                     if r.get("model") == "maisi" and not r.get("error")), None)
        self.save()

    def part3(self) -> None:
        entry = self.part(3)
        c = self.cfg
        entry["setup"] = {"sizes": c["decode_sizes"], "width": c["decode_width"], "precision": "fp32 (TF32 off)",
                          "maisi_roi_latent": MAISI_SW_ROI, "maisi_overlap": MAISI_SW_OVERLAP,
                          "ours": "fork 4x with MAISI's architecture, the same latent"}
        jobs = []
        for size in c["decode_sizes"]:
            for model, modes in (("ours", ("whole", "tiles")), ("maisi", ("whole", "sliding"))):
                ref = self.work / f"decode_{model}_{size}.pt"
                for mode in modes:
                    jobs.append({"job": "decode", "key": f"{model} {mode} {size}^3", "model": model, "mode": mode,
                                 "size": [size] * 3, "width": c["decode_width"], "ref": str(ref),
                                 "device": self.device, "dry": self.dry})
        for group in groups(jobs, self.dry, self.device):
            t = self.timeout(3600)
            rows = run_jobs(group, t) if t else [{"key": j["key"], "error": "skipped: time share spent"}
                                                 for j in group]
            for job, row in zip(group, rows):
                self.add(entry, {**row, "model": job["model"], "mode": job["mode"], "size": job["size"][0]})
        for f in self.work.glob("decode_*.pt"):
            f.unlink()
        self.save()


def ratios(rows: list[dict[str, Any]]) -> None:
    """Memory and time of each part-1 row as ratios to MAISI's row of the same precision."""
    ref = {r["precision"]: r for r in rows if r.get("model") == "maisi" and not r.get("error")}
    for r in rows:
        base = ref.get(r.get("precision"))
        if base and not r.get("error"):
            r["memory_ratio"] = r["peak_mib"] / base["peak_mib"]
            r["time_ratio"] = r["step_s"] / base["step_s"]
            r["cpu_time_ratio"] = r["cpu_s"] / base["cpu_s"] if base.get("cpu_s") else None


# ====================================================================================================== output
def _f(v: Any, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _e(v: Any) -> str:
    return f"{v:.1e}" if isinstance(v, (int, float)) else "-"


def render(report: dict[str, Any]) -> str:
    """The Markdown of a report."""
    m = report["machine"]
    lines = [f"# MAISI's VAE and monai-diffusion's autoencoder side by side{' (dry run)' if report['dry_run'] else ''}",
             "", _common.machine_line(m), "", f"Command: `{report['command']}`; {report.get('seconds', 0) / 60:.1f} min.",
             "", "MAISI: `AutoencoderKlMaisi` with its shipped network arguments "
             f"(`{json.dumps(report['maisi_args'])}`; `norm_float16` off outside fp16 autocast). Models:", ""]
    lines += [f"- `{k}`: {v}" for k, v in report["models"].items()] + [""]
    p = report["parts"].get("1")
    if p:
        s = p["setup"]
        lines += [f"## 1. {p['title']}", "",
                  f"Input {'x'.join(map(str, s['size']))}, batch 1, width `{s['width']}` "
                  f"(channels {report['widths'][s['width']]}; the recipe has the 8x config's own), one training step "
                  f"({s['losses']}), median of {s['steps']} after {s['warmup']} warm-up; peak = tensors held before "
                  "the step plus the rise of the process's resident memory (CPU) or max allocated (CUDA). Ratios to "
                  "MAISI at the same precision.", ""]
        rows = [[r.get("model"), r.get("precision"), _f(r.get("peak_mib"), 0), _f(r.get("step_s"), 2),
                 _f(r.get("cpu_s"), 2), _f(r.get("memory_ratio")), _f(r.get("time_ratio")),
                 _f(r.get("cpu_time_ratio")), r.get("latent_values", "-"), r.get("parameters", "-")]
                for r in p["rows"] if not r.get("error")]
        lines += [_common.markdown_table(["model", "precision", "peak MiB", "step s (wall)", "step s (CPU)",
                                          "memory / MAISI", "wall / MAISI", "CPU time / MAISI", "latent values",
                                          "parameters"], rows), ""]
    p = report["parts"].get("2")
    if p:
        s = p["setup"]
        clock = "process CPU time" if s["clock"] == "cpu" else "wall time"
        lines += [f"## 2. {p['title']}", "",
                  f"`{s['dataset']}` {'x'.join(map(str, s['size']))}, {s['num_train']} training and {s['num_val']} "
                  f"validation volumes; every model at width `{s['width']}` (channels "
                  f"{report['widths'][s['width']]}); batch {s['batch']}, lr {s['lr']}, {s['losses']}. Equal time: "
                  f"{s['budget_s']:g} s of {clock} each. Equal steps: the {p.get('equal_steps', '-')} steps MAISI "
                  f"made in that time. C2ST and W1: reconstructions of the validation volumes against them "
                  f"({s['c2st_epochs']} classifier epochs; 0.5 = indistinguishable, one test volume moves it by "
                  f"{1 / max(1, s['num_val']):.3f}).", ""]
        for key, title in (("at_time", "equal time"), ("at_steps", "equal steps")):
            rows = []
            for r in p["rows"]:
                q = r.get(key) or {}
                if r.get("key") == "data" or r.get("error") or q.get("error"):
                    continue
                rows.append([r["model"], q.get("steps"), _f(q.get("clock_s"), 0), _f(q.get("psnr")),
                             _f(q.get("ssim"), 3), _f(q.get("ms_ssim"), 3), _f(q.get("c2st_recon_vs_real")),
                             _f(q.get("w1_recon_vs_real"), 4), r.get("latent_values", "-"), _f(r.get("peak_mib"), 0)])
            lines += [f"**{title}**", "", _common.markdown_table(
                ["model", "steps", "clock s", "PSNR dB", "SSIM", "MS-SSIM", "C2ST recon vs real", "W1 recon vs real",
                 "latent values", "train peak MiB"], rows), ""]
    p = report["parts"].get("3")
    if p:
        s = p["setup"]
        lines += [f"## 3. {p['title']}", "",
                  f"One latent (4 channels, 4x) per size, fp32 with TF32 off, width `{s['width']}`. MAISI: its "
                  f"decoder whole, and through `SlidingWindowInferer` as MAISI's inference decodes (overlap "
                  f"{s['maisi_overlap']}, Gaussian blending, roi {s['maisi_roi_latent']}^3 latent voxels, or 0.75 of "
                  "each latent axis where that would cover the whole latent). Ours: "
                  f"{s['ours']}, whole and in exact tiles. Deviation: |pass - whole| / std(whole) of the same "
                  f"model; ours must stay <= {EXACT_BOUND:g}.", ""]
        rows = [[r["key"], _f(r.get("peak_mib"), 0), _f(r.get("seconds"), 1), _f(r.get("cpu_s"), 1),
                 _e(r.get("max_dev")), _e(r.get("mean_dev")),
                 ("roi " + "x".join(map(str, r["roi_latent"])) if r.get("roi_latent") else
                  "tiles " + "x".join(map(str, r["tile"])) if r.get("tile") else "")]
                for r in p["rows"] if not r.get("error")]
        lines += [_common.markdown_table(["pass", "peak MiB", "seconds (wall)", "CPU s", "max deviation / std",
                                          "mean deviation / std", "window"], rows), ""]
    errors = [(k, r) for k, p in report["parts"].items() for r in p["rows"] if r.get("error")]
    if errors:
        lines += ["## Errors", ""] + [f"- part {k}, {r.get('key')}: {r['error']}" for k, r in errors] + [""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path | None:
    """Part 1's ratios, part 2's PSNR and C2ST, part 3's deviation maps, in one PNG (None without results)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no picture (pip install matplotlib); the tables are complete")
        return None
    import numpy as np

    parts = report["parts"]
    p1 = [r for r in parts.get("1", {}).get("rows", []) if "memory_ratio" in r]
    p2 = [r for r in parts.get("2", {}).get("rows", []) if r.get("at_time") and not r.get("error")]
    p3 = [r for r in parts.get("3", {}).get("rows", []) if r.get("map")]
    largest = max(r["size"] for r in p3) if p3 else None
    maps = sorted([r for r in p3 if r["size"] == largest], key=lambda r: r["model"] != "maisi")[:2]
    top = int(bool(p1)) + int(bool(p2))
    if top + len(maps) == 0:
        return None
    rows, cols = int(top > 0) + int(bool(maps)), max(top, len(maps))
    fig, grid = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.8 * rows), squeeze=False)
    axes = [grid[0, i] for i in range(top)] + [grid[rows - 1, i] for i in range(len(maps))]
    for r in range(rows):
        for c in range(cols):
            if grid[r, c] not in axes:
                grid[r, c].axis("off")
    if p1:
        ax = axes.pop(0)
        models = list(dict.fromkeys(r["model"] for r in p1))
        x = np.arange(len(models))
        for i, (prec, metric, color) in enumerate((("fp32", "memory_ratio", "#1f77b4"), ("fp32", "time_ratio", "#aec7e8"),
                                                  ("bf16", "memory_ratio", "#d62728"), ("bf16", "time_ratio", "#ff9896"))):
            vals = [next((r[metric] for r in p1 if r["model"] == m and r["precision"] == prec), np.nan) for m in models]
            ax.bar(x + (i - 1.5) * 0.2, vals, 0.2, color=color,
                   label=f"{prec} {'memory' if metric == 'memory_ratio' else 'time'}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(0.5, color="k", lw=0.8, ls="--")
        ax.set_xticks(x, models, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("ratio to MAISI (same precision)")
        ax.set_title("1. one training step: memory and time", fontsize=10)
        ax.legend(fontsize=7)
    if p2:
        ax = axes.pop(0)
        models = [r["model"] for r in p2]
        x = np.arange(len(models))
        for i, (key, color) in enumerate((("at_time", "#2ca02c"), ("at_steps", "#98df8a"))):
            vals = [(r.get(key) or {}).get("psnr", np.nan) for r in p2]
            ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, color=color, label=f"PSNR, equal {key[3:]}")
        ax.set_ylim(bottom=max(0.0, np.nanmin([(r.get("at_time") or {}).get("psnr", np.nan) for r in p2]) - 4))
        ax.set_xticks(x, models, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("validation PSNR (dB)")
        ax2 = ax.twinx()
        ax2.plot(x, [r["at_time"].get("c2st_recon_vs_real", np.nan) for r in p2], "ko", label="C2ST, equal time")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("C2ST recon vs real (0.5 = indistinguishable)")
        ax.set_title("2. reconstruction, brain", fontsize=10)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower left")
    if maps:  # one logarithmic colour scale for both, so that their difference shows
        from matplotlib.colors import LogNorm

        floor = 1e-8
        norm = LogNorm(vmin=floor, vmax=max(floor * 10, max(float(np.max(r["map"])) for r in maps)))
        for r in maps:
            ax = axes.pop(0)
            im = ax.imshow(np.maximum(np.asarray(r["map"]), floor), cmap="magma", norm=norm)
            ax.set_title(f"3. {r['key']}: |pass - whole| / std, middle slice\n"
                         f"max {r['max_dev']:.1e}, mean {r['mean_dev']:.1e} (whole volume)", fontsize=9)
            ax.axis("off")
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda: the GPU sizes of --full)")
    p.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    p.add_argument("--full", action="store_true", help="the GPU sizes: 128^3 steps, shipped widths, 256^3 and 512^3 "
                   "decodes (the default with --device cuda)")
    p.add_argument("--size", type=int, nargs=3, help="part 1's input size (default 32 64 32 on CPU, 128^3 --full)")
    p.add_argument("--decode-sizes", type=int, nargs="+", help="part 3's output sizes, multiples of 4 (default 64 "
                   "on CPU, 256 512 --full)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), help="parts 1 and 2: these models (MAISI is always "
                   "measured: it is the reference)")
    p.add_argument("--budget-s", type=float, help="part 2's training time per model (default 75 CPU-s on CPU)")
    p.add_argument("--budget-min", type=float, help="total minutes: each part gets a share and a measurement that "
                   "runs past its part's share is killed (its row says so); default: no limit")
    p.add_argument("--out", help="results stem (default benchmarks/results/vs_maisi_<device>)")
    p.add_argument("--work", help="folder for data and decode outputs (default: a new temporary folder)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, one process per part, ~1 min")
    p.add_argument("--render", metavar="JSON", help="rewrite the .md and .png of a results .json, measuring nothing")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None:
        if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
            p.error(f"--device must be cpu or cuda, got {args.device!r}")
        # MAISI splits the second spatial axis in num_splits pieces, each of at least 3 voxels, at every level of
        # its decoder (the latent's included) and down to its 4x level in the encoder
        pieces = 3 * MAISI_ARGS["num_splits"]
        for n in args.decode_sizes or []:
            if n % 4 or n * MAISI_SW_FRACTION / 4 < pieces:
                p.error(f"--decode-sizes: {n} must be a multiple of 4 with a sliding window of at least {pieces} "
                        f"latent voxels (MAISI's {MAISI_ARGS['num_splits']} splits): at least "
                        f"{math.ceil(pieces * 4 / MAISI_SW_FRACTION)}")
        if args.size and (any(n % 16 for n in args.size) or args.size[1] < 4 * pieces):
            p.error(f"--size {args.size}: every axis must be a multiple of 16 (the 16x model), the second at least "
                    f"{4 * pieces} (MAISI splits it in {MAISI_ARGS['num_splits']} at its 4x level)")
        if args.dry_run and not args.out:
            p.error("--dry-run writes only to --out STEM; give one")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker))
        return 0
    if args.render:
        path = Path(args.render)
        report = json.loads(path.read_text())
        _common.write_text(path.with_suffix(".md"), render(report))
        print(f"rewrote {path.with_suffix('.md')}, {plot(report, path.with_suffix('.png'))}")
        return 0
    if args.device.startswith("cuda") and not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda: no CUDA device is visible to PyTorch", file=sys.stderr)
            return 2
    args.parts = sorted(set(args.parts))
    b = Bench(args)
    print(_common.machine_line(b.report["machine"]), flush=True)
    for key in args.parts:
        getattr(b, f"part{key}")()
    b.save()
    png = plot(b.report, b.stem.with_suffix(".png"))
    print(f"results: {b.stem.with_suffix('.json')}, {b.stem.with_suffix('.md')}" + (f", {png}" if png else ""))
    bad = [r for r in b.report["parts"].get("3", {}).get("rows", []) if r.get("exact") is False]
    if bad:
        print(f"error: {bad[0]['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
