"""``python -m monai_diffusion.settings --config X [--set ...]``: validate a config and print the resolved settings
(every default filled in); ``--reference`` prints the Markdown reference of every key instead."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import ConfigError
from .load import add_config_args, settings_from_args
from .reference import settings_reference


def main(argv: Sequence[str] | None = None) -> int:
    """Validate and print the resolved settings (exit code 0), or the problems (exit code 2)."""
    parser = add_config_args(argparse.ArgumentParser(description="Validate a config and print the resolved settings"))
    parser.add_argument("--no-check-paths", action="store_true", help="do not look at the filesystem")
    parser.add_argument("--reference", action="store_true", help="print the Markdown reference of every key and exit")
    args = parser.parse_args(argv)
    if args.reference:
        print(settings_reference())
        return 0
    try:
        settings = settings_from_args(args, check_paths=not args.no_check_paths)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    print(settings.to_yaml(), end="")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
