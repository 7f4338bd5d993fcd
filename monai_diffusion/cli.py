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
    return parser


def train_autoencoder_main(argv: Sequence[str] | None = None) -> int:
    """``train_autoencoder.py --config FILE [--set key=value ...]``: stage 1."""
    parser = _parser("train_autoencoder", "Train the stage-1 autoencoder (AutoencoderKL + patch discriminator).")
    args = parser.parse_args(argv)
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
