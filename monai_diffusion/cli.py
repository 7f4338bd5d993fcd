"""Command-line entry points; the scripts in ``3d_ldm/`` and the console scripts call these.

Every problem a user can cause (config, data files, checkpoints, output folders) ends the command with exit code 2
and one line on stderr, ``error: ...``, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .data import DataError
from .engine import RunError
from .settings import ConfigError, add_config_args, settings_from_args

# the exceptions that mean "the user's input is wrong", as opposed to a bug
USER_ERRORS = (ConfigError, DataError, RunError, FileExistsError)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line: the lines of a multi-problem message joined with '; '."""
    parts = [part.strip(" -") for part in str(exc).splitlines() if part.strip(" -")]
    text = "; ".join(parts) if parts else type(exc).__name__
    return text.replace(":;", ":")


def run_command(work: Callable[[], object]) -> int:
    """Run ``work``; a user error becomes ``error: <one line>`` on stderr and exit code 2."""
    try:
        work()
    except USER_ERRORS as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_args(parser)
    parser.add_argument(
        "--fast-dev-run",
        action="store_true",
        help="run a couple of training and validation batches, one visualisation (stage 2: one sample in a few "
             "steps) and a checkpoint into memory, then stop without writing anything",
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

    def work() -> None:
        settings = settings_from_args(args, stage="autoencoder")
        from .stage1 import train_autoencoder

        train_autoencoder(settings)

    return run_command(work)


def train_diffusion_main(argv: Sequence[str] | None = None) -> int:
    """``train_diffusion.py --config FILE [--set key=value ...]``: stage 2."""
    parser = _parser("train_diffusion", "Train the stage-2 latent diffusion UNet on a trained autoencoder.")
    args = parser.parse_args(argv)
    if args.plan:
        return _run_plan(args)
    if args.fast_dev_run:
        args.set = [*(args.set or []), "diffusion.training.fast_dev_run=true"]

    def work() -> None:
        settings = settings_from_args(args, stage="diffusion")
        from .stage2 import train_diffusion

        train_diffusion(settings)

    return run_command(work)


def generate_samples_main(argv: Sequence[str] | None = None) -> int:
    """``generate_samples.py --config FILE [--checkpoint PATH] [--set key=value ...]``: write samples."""
    parser = argparse.ArgumentParser(prog="generate_samples", description="Generate volumes with a trained stage-2 model.")
    add_config_args(parser)
    parser.add_argument("--checkpoint", help="stage-2 checkpoint (default: sampling.checkpoint, else best_model.pt)")
    args = parser.parse_args(argv)

    def work() -> None:
        settings = settings_from_args(args, require_data=False, stage="sampling")
        from .generate import generate_samples

        generate_samples(settings, args.checkpoint)

    return run_command(work)
