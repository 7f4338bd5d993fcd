"""Command-line entry points; the scripts in ``3d_ldm/`` and the console scripts call these."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .data import DataError
from .engine import RunError
from .settings import ConfigError, add_config_args, settings_from_args


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_args(parser)
    parser.add_argument(
        "--fast-dev-run",
        action="store_true",
        help="run a few batches of training and validation, then stop without writing checkpoints or logs",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print shapes, factors, parameter counts and the measured memory of one step per stage; do not train",
    )
    return parser


def _run_plan(args: argparse.Namespace) -> int:
    from .plan import plan_main

    argv = ["--config", args.config] if args.config else []
    for override in args.set or []:
        argv += ["--set", override]
    return plan_main(argv)


def train_autoencoder_main(argv: Sequence[str] | None = None) -> int:
    """``train_autoencoder.py --config FILE [--set key=value ...]``: stage 1."""
    parser = _parser("train_autoencoder", "Train the stage-1 autoencoder (AutoencoderKL + patch discriminator).")
    args = parser.parse_args(argv)
    if args.plan:
        return _run_plan(args)
    if args.fast_dev_run:
        args.set = [*(args.set or []), "autoencoder.training.fast_dev_run=true"]
    try:
        settings = settings_from_args(args)
        from .stage1 import train_autoencoder

        train_autoencoder(settings)
    except (ConfigError, DataError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def train_diffusion_main(argv: Sequence[str] | None = None) -> int:
    """``train_diffusion.py --config FILE [--set key=value ...]``: stage 2."""
    parser = _parser("train_diffusion", "Train the stage-2 latent diffusion UNet on a trained autoencoder.")
    args = parser.parse_args(argv)
    if args.plan:
        return _run_plan(args)
    if args.fast_dev_run:
        args.set = [*(args.set or []), "diffusion.training.fast_dev_run=true"]
    try:
        settings = settings_from_args(args)
        from .stage2 import train_diffusion

        train_diffusion(settings)
    except (ConfigError, DataError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def generate_samples_main(argv: Sequence[str] | None = None) -> int:
    """``generate_samples.py --config FILE [--checkpoint PATH] [--set key=value ...]``: write samples."""
    parser = argparse.ArgumentParser(prog="generate_samples", description="Generate volumes with a trained stage-2 model.")
    add_config_args(parser)
    parser.add_argument("--checkpoint", help="stage-2 checkpoint (default: sampling.checkpoint, else best_model.pt)")
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args, require_data=False)
        from .generate import generate_samples

        generate_samples(settings, args.checkpoint)
    except (ConfigError, RunError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
