"""Plan a run without training: shapes, factors, parameter counts, how the UNet meets the latent, measured memory,
and what to change to fit a budget.

For a valid config (YAML + ``--set`` overrides; an invalid one is refused by settings validation with its one-line
``error:`` and the ``--set`` lines that fix it) this reports, without reading any data:

* stage 1 (:mod:`.geometry`): input and latent shape, total downsample factor per axis, compression ratio, the
  resolution and channels of every level, attention blocks (tokens, size of the attention matrix when it is
  materialised), parameter counts of the autoencoder and the patch discriminator;
* stage 2 (:mod:`.geometry`): the latent size, the UNet's levels and the divisor each latent axis needs, attention
  blocks, parameter counts;
* inference (:mod:`.geometry`, :mod:`.measure`): the exact tiles of encoding and of sampling's decoding
  (``autoencoder.tile_size``, ``sampling.tile_size``) and, measured, the peak memory and time of encoding one
  volume and decoding a sampling batch with them;
* (:mod:`.measure`) the peak memory and time of one training step of each stage at batch 1 on the current device:
  the real stage objects (``stage1.build_autoencoder_stage``, ``stage2.build_diffusion_stage``) driven through
  ``engine.train_step``, each stage in a fresh process, measured with ``memory.PeakMeter`` exactly as
  ``fast_dev_run`` measures its last training step;
* (:mod:`.advice`) with ``--budget-gb``: for each stage whether it fits and with how much headroom, or which config
  keys to turn, most effective first, as ``--set`` lines, skipping knobs that are already set.

:mod:`.report` formats it all as text. Public API: :func:`make_plan`, :func:`format_plan`, :func:`apply_budget`,
:func:`plan_main`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..settings import Settings, add_config_args, settings_from_args
from .advice import apply_budget
from .geometry import MIB, inference_info, parameter_counts, stage1_info, stage2_info
from .measure import measure_stages, worker_main
from .report import format_plan

__all__ = ["make_plan", "format_plan", "apply_budget", "plan_main"]


def _resolve_device(device: str | None, s: Settings) -> tuple[str, str]:
    """(torch device string, human name). ``device`` None: CUDA when the config allows it and one is visible."""
    import torch

    from ..errors import RunError
    from ..runtime import choose_device

    if device is None:
        device = str(choose_device(s.device.use_cuda, s.device.gpu_id))
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
    """('fp32' | 'fp16' | 'bf16', note) for device.mixed_precision on this device (``runtime.resolve_precision``)."""
    import torch

    from ..runtime import resolve_precision

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dtype = resolve_precision(s.device.mixed_precision, torch.device(device))
    name = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    note = str(caught[0].message) if caught else None
    return name, note


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
        measure: run training steps of each stage in a subprocess and record peak memory and time.
        budget_gb: memory budget in GiB; each stage gets a verdict and, when over, a list of knobs in ``advice``.
        device: "cpu" or "cuda" (``cuda:N``); None = CUDA if ``device.use_cuda`` and one is visible, else CPU.
        batch_size: batch of the measured step (1 by default, whatever the config trains with).
        steps: measured steps per stage, after one unmeasured warm-up step (which allocates the optimizer states and
            pages in kernels); the peak is the largest of them, the time the fastest.
        timeout: seconds allowed per measurement process (None = no limit).

    Raises:
        ValueError: ``batch_size`` or ``steps`` below 1.
        ConfigError: a stage-1 network other than the KL autoencoder (``autoencoder.type: vq``).
        RunError: ``device`` is not usable here.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if settings.diffusion.space == "pixel":
        from ..errors import RunError

        raise RunError("the plan covers latent pipelines (autoencoder + latent UNet); this config has diffusion.space "
                       "pixel: run train_diffusion.py --fast-dev-run instead, which prints the UNet's batch shape, "
                       "the time of a step and its peak memory")
    if settings.autoencoder.type != "kl":
        from ..errors import ConfigError

        raise ConfigError(f"the plan describes and measures the KL autoencoder only, not yet type "
                          f"{settings.autoencoder.type!r}; run train_autoencoder.py --fast-dev-run to check a VQ-VAE "
                          f"config", key="autoencoder.type")
    dev, dev_name = _resolve_device(device, settings)
    precision, precision_note = _resolve_precision(settings, dev)
    s1 = stage1_info(settings, batch_size)
    s2 = stage2_info(settings, batch_size)
    s1["parameters"], s2["parameters"] = parameter_counts(settings)
    s1["measurement"] = s2["measurement"] = None
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
        "inference": inference_info(settings),
        "config": None,  # set by plan_main
        "overrides": [],
    }
    if measure:
        results = measure_stages(("autoencoder", "diffusion", "inference"), settings, dev, precision, batch_size,
                                 steps, timeout)
        for stage, result in results.items():
            plan[stage]["measurement"] = result
        methods = [m["method"] for m in results.values() if m.get("ok")]
        plan["measure_method"] = methods[0] if methods else None
    return apply_budget(plan, settings, budget_gb)


def plan_main(argv: Sequence[str] | None = None) -> int:
    """``monai-diffusion-plan --config FILE [--set k=v ...] [--budget-gb G] [--no-measure] [--device D] [--json P]``.

    Returns the exit code: 0, or 2 with one ``error:`` line on stderr for anything the user gave that is wrong (an
    invalid config included: its message carries the ``--set`` lines that fix it).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1], argv[2])
    parser = argparse.ArgumentParser(
        prog="monai-diffusion-plan",
        description="Plan a run without training: input/latent shapes per stage, total downsample factor, parameter "
                    "counts, how the UNet meets the latent, measured peak memory and time of one training step "
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
    from ..errors import USER_ERRORS, one_line

    if args.budget_gb is not None and not args.budget_gb > 0:
        print(f"error: --budget-gb must be > 0, got {args.budget_gb}", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.steps < 1:
        print(f"error: --batch-size and --steps must be >= 1, got {args.batch_size} and {args.steps}",
              file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args, check_paths=False, require_data=False)
        plan = make_plan(settings, measure=not args.no_measure, budget_gb=args.budget_gb, device=args.device,
                         batch_size=args.batch_size, steps=args.steps, timeout=args.timeout)
    except USER_ERRORS as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
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
