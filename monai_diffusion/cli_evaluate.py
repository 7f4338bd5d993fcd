"""``evaluate`` entry point (folder mode); to be moved into ``cli.py`` by the lead, with the ``--config`` mode."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn


class _OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one ``error: ...`` line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def evaluate_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="evaluate",
        description="Compare generated volumes with real ones: reconstruction and generation metrics, a JSON and "
        "Markdown report and a PNG grid (definitions: monai_diffusion/docs/evaluate.md).",
    )
    parser.add_argument("--real", required=True, help="folder of real volumes (NIfTI, or 2D images)")
    parser.add_argument("--samples", required=True, help="folder of generated volumes, same shape as the real ones")
    parser.add_argument(
        "--recon",
        help="folder of the autoencoder's reconstructions of the real volumes, one per real volume in the same sorted order",
    )
    parser.add_argument(
        "--out", help="report JSON path (default: <samples folder>_evaluation.json next to the samples folder); "
        "the .md and .png are written next to it"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument("--seed", type=int, default=0, help="seed of the C2ST split and classifier (default 0)")
    parser.add_argument(
        "--c2st-epochs", type=int, default=None, help="epochs of the C2ST classifier (default 30; 0 skips the test)"
    )
    parser.add_argument("--fid-weights", help="local feature-extractor file for FID (TorchScript or ResNet state dict)")
    return parser


def _default_out(samples: str) -> Path:
    folder = Path(samples).expanduser().resolve()
    return folder.with_name(folder.name + "_evaluation.json")


def _print_summary(report: dict, written: Sequence[Path]) -> None:
    from .evaluate import summary_table

    s = report["samples"]
    print(
        f"real: {report['real']['count']} x {report['real']['shape']}, samples: {s['count']} x {s['shape']}, "
        f"sample range [{s['min']:.4g}, {s['max']:.4g}], {100 * s['fraction_outside_real_range']:.3g}% of voxels "
        "outside the real range"
    )
    print(summary_table(report))
    print("wrote " + ", ".join(str(p) for p in written))


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``evaluate.py --real DIR --samples DIR [--recon DIR] [--out FILE.json] [...]``: compare two folders."""
    args = evaluate_parser().parse_args(argv)
    from .evaluate import C2STSettings, EvaluateError, compare_sets, load_volume_folder, write_report

    try:
        out = Path(args.out).expanduser() if args.out else _default_out(args.samples)
        if out.suffix.lower() != ".json":
            raise EvaluateError(f"--out must name a .json file, got {str(out)!r}")
        if not args.overwrite:
            for path in (out, out.with_suffix(".md"), out.with_suffix(".png")):
                if path.exists():
                    raise EvaluateError(f"report file {str(path)!r} already exists; choose another --out or pass --overwrite")
        c2st = C2STSettings() if args.c2st_epochs is None else C2STSettings(epochs=args.c2st_epochs)
        real, real_meta = load_volume_folder(args.real, what="real")
        samples, samples_meta = load_volume_folder(args.samples, what="samples")
        meta = {"real": real_meta, "samples": samples_meta}
        names = {"real": f"real folder {args.real!r}", "samples": f"samples folder {args.samples!r}"}
        recon = None
        if args.recon:
            recon, meta["recon"] = load_volume_folder(args.recon, what="reconstructions")
            names["recon"] = f"reconstructions folder {args.recon!r}"
        report = compare_sets(
            real, samples, recon=recon, seed=args.seed, c2st=c2st, fid_weights=args.fid_weights, names=names, meta=meta
        )
        written = write_report(report, out, real=real, recon=recon, samples=samples, overwrite=args.overwrite)
    except EvaluateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_summary(report, written)
    return 0
