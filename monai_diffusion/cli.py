"""Command-line entry points; the scripts in ``3d_ldm/`` and the console scripts call these.

Every problem a user can cause (config, data files, checkpoints, output folders) ends the command with exit code 2
and one line on stderr, ``error: ...``, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from .errors import USER_ERRORS, one_line
from .settings import add_config_args, settings_from_args


def run_command(work: Callable[[], object]) -> int:
    """Run ``work``; a user error becomes ``error: <one line>`` on stderr and exit code 2. A training run that a
    signal stopped (it wrote a checkpoint first) exits with 128 + the signal's number, as a shell reports it."""
    try:
        result = work()
    except USER_ERRORS as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from .memory import is_out_of_memory

        if not is_out_of_memory(exc):
            raise
        # training turns its own into errors.OutOfMemory (with the kept checkpoint); this is sampling, evaluate, plan
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"error: ran out of memory ({first[:160]}); nothing that was written is lost. Less at once: "
              "--set sampling.batch_size=1, exact tiles (--set autoencoder.tile_size=[...], sampling.tile_size) for "
              "decoding and encoding; monai-diffusion-plan --budget-gb N says what fits", file=sys.stderr)
        return 2
    return int(getattr(result, "exit_code", 0) or 0)  # a training run stopped by a signal: 128 + its number


def _print_rank0(line: str) -> None:
    """Print on the first process of a multi-process run (``RANK`` unset or 0) only."""
    if os.environ.get("RANK", "0") == "0":
        print(line)


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

    def work() -> object:
        settings = settings_from_args(args, stage="autoencoder")
        from .plan.preflight import prepare_training
        from .stage1 import train_autoencoder

        settings = prepare_training(settings, "autoencoder", print_fn=_print_rank0)
        return train_autoencoder(settings)

    return run_command(work)


def train_diffusion_main(argv: Sequence[str] | None = None) -> int:
    """``train_diffusion.py --config FILE [--set key=value ...]``: stage 2."""
    parser = _parser("train_diffusion", "Train the stage-2 diffusion UNet on a trained autoencoder's latents, or "
                                        "(diffusion.space: pixel) on the images directly.")
    args = parser.parse_args(argv)
    if args.plan:
        return _run_plan(args)
    if args.fast_dev_run:
        args.set = [*(args.set or []), "diffusion.training.fast_dev_run=true"]

    def work() -> object:
        settings = settings_from_args(args, stage="diffusion")
        from .plan.preflight import prepare_training
        from .stage2 import train_diffusion

        settings = prepare_training(settings, "diffusion", print_fn=_print_rank0)
        return train_diffusion(settings)

    return run_command(work)


def generate_samples_main(argv: Sequence[str] | None = None) -> int:
    """``generate_samples.py --config FILE [--checkpoint PATH] [--condition FILE] [--interpolate A B --steps N]
    [--set key=value ...]``: write samples, or an interpolation between the samples of two seeds."""
    parser = argparse.ArgumentParser(prog="generate_samples", description="Generate volumes with a trained stage-2 model.")
    add_config_args(parser)
    parser.add_argument("--checkpoint", help="stage-2 checkpoint (default: sampling.checkpoint, else best_model.pt)")
    parser.add_argument("--interpolate", nargs=2, type=int, metavar=("A", "B"),
                        help="instead of sampling.num_samples samples: --steps samples between the samples of seeds A "
                             "and B (spherical interpolation of the initial noise, deterministic DDIM / rflow "
                             "sampling), written to <sampling.output_dir>/interpolation_A_B/ with strip.png")
    parser.add_argument("--steps", type=int, default=None, help="with --interpolate: samples, both ends included "
                                                                "(default 8)")
    parser.add_argument("--condition", help="a projection-conditioned model's condition: a PNG, TIFF or 2D NIfTI "
                                            "image of the training projection's size (not resized)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.interpolate is None:
        parser.error("--steps goes with --interpolate A B")

    def work() -> None:
        settings = settings_from_args(args, require_data=False, stage="sampling")
        if args.interpolate is not None:
            from .generate import interpolate

            steps = 8 if args.steps is None else args.steps
            interpolate(settings, args.interpolate[0], args.interpolate[1], steps, args.checkpoint,
                        condition=args.condition)
            return
        from .generate import generate_samples

        generate_samples(settings, args.checkpoint, condition=args.condition)

    return run_command(work)


# ------------------------------------------------------------------------------------------------------ evaluate
class _OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one ``error: ...`` line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def evaluate_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="evaluate",
        description="Measure generation quality: a trained pipeline (--config: stage-1 reconstruction of the "
        "validation volumes, and samples against the training volumes and their reconstructions), or two folders "
        "(--real and --samples). Writes a JSON report, a Markdown summary and a PNG grid of mid-slices "
        "(definitions: monai_diffusion/docs/evaluate.md).",
    )
    add_config_args(parser)
    parser.add_argument("--checkpoint", help="with --config: the stage-2 checkpoint (default: sampling.checkpoint, "
                                             "else <diffusion output_dir>/best_model.pt)")
    parser.add_argument("--num-samples", type=int, help="with --config: samples to draw (default: as many as there "
                                                        "are training volumes)")
    parser.add_argument("--real", help="folder of real volumes (NIfTI, or 2D images); folder mode")
    parser.add_argument("--samples", help="folder of generated volumes, same shape as the real ones (with --config: "
                                          "take these instead of drawing new ones)")
    parser.add_argument(
        "--recon", help="folder mode: the autoencoder's reconstructions of the real volumes, same order"
    )
    parser.add_argument(
        "--out", help="report JSON path (--config: <diffusion output_dir>/../evaluation.json; folder mode: "
        "<samples folder>_evaluation.json); the .md and .png are written next to it"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise, the C2ST split and classifier "
                                                            "(default 0)")
    parser.add_argument(
        "--c2st-epochs", type=int, default=None, help="epochs of the C2ST classifier (default 30; 0 skips the test)"
    )
    parser.add_argument("--fid-weights", help="local feature-extractor file for FID (TorchScript or ResNet state dict)")
    parser.add_argument("--no-frd", action="store_true", help="skip the Fréchet Radiomics Distance (computed by "
                                                             "default when the optional frd-score is installed)")
    return parser


def _print_evaluation(report: dict, written: Sequence[Path]) -> None:
    from .evaluation import summary_table
    from .evaluation.report import frd_line

    s = report["samples"]
    print(
        f"real: {report['real']['count']} x {report['real']['shape']}, samples: {s['count']} x {s['shape']}, "
        f"sample range [{s['min']:.4g}, {s['max']:.4g}], {100 * s['fraction_outside_real_range']:.3g}% of voxels "
        "outside the real range"
    )
    if "stage1_validation" in report:
        v = report["stage1_validation"]
        print(f"stage 1 on {v['count']} validation volume(s): PSNR {v['psnr']:.2f} dB, SSIM {v['ssim']:.3f}, "
              f"MS-SSIM {v['ms_ssim']:.3f}, L1 {v['l1']:.4f}")
    print(summary_table(report))
    print(f"FRD: {frd_line(report)}")
    print("wrote " + ", ".join(str(p) for p in written))


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``evaluate.py --config FILE [--checkpoint PATH] [--num-samples N]`` or ``evaluate.py --real DIR --samples
    DIR``: write an evaluation report."""
    parser = evaluate_parser()
    args = parser.parse_args(argv)
    if args.config is None and not (args.real and args.samples):
        parser.error("give --config (evaluate a trained pipeline) or both --real and --samples (compare two folders)")
    if args.config is not None and (args.real or args.recon):
        parser.error("--real and --recon belong to the folder mode; with --config the real volumes come from the "
                     "config's data")
    from .errors import EvaluateError
    from .evaluation import C2STSettings, compare_sets, load_volume_folder, write_report

    result: dict = {}

    def work() -> None:
        c2st = C2STSettings() if args.c2st_epochs is None else C2STSettings(epochs=args.c2st_epochs)
        if args.config is not None:
            from .evaluation.pipeline import evaluate_pipeline

            settings = settings_from_args(args, stage="sampling")
            result["report"], result["written"] = evaluate_pipeline(
                settings, args.checkpoint, num_samples=args.num_samples, samples_dir=args.samples, out=args.out,
                seed=args.seed, c2st=c2st, fid_weights=args.fid_weights, overwrite=args.overwrite,
                frd=False if args.no_frd else None,
            )
            return
        out = Path(args.out).expanduser() if args.out else _default_report(args.samples)
        if out.suffix.lower() != ".json":
            raise EvaluateError(f"--out must name a .json file, got {str(out)!r}")
        if not args.overwrite:
            for path in (out, out.with_suffix(".md"), out.with_suffix(".png")):
                if path.exists():
                    raise EvaluateError(f"report file {str(path)!r} already exists; choose another --out or pass "
                                        "--overwrite")
        real, real_meta = load_volume_folder(args.real, what="real")
        samples, samples_meta = load_volume_folder(args.samples, what="samples")
        meta = {"real": real_meta, "samples": samples_meta}
        names = {"real": f"real folder {args.real!r}", "samples": f"samples folder {args.samples!r}"}
        recon = None
        if args.recon:
            recon, meta["recon"] = load_volume_folder(args.recon, what="reconstructions")
            names["recon"] = f"reconstructions folder {args.recon!r}"
        report = compare_sets(
            real, samples, recon=recon, seed=args.seed, c2st=c2st, fid_weights=args.fid_weights, names=names, meta=meta,
            frd=False if args.no_frd else None,
        )
        result["report"] = report
        result["written"] = write_report(report, out, real=real, recon=recon, samples=samples, overwrite=args.overwrite)

    code = run_command(work)
    if code == 0:
        _print_evaluation(result["report"], result["written"])
    return code


def _default_report(samples: str) -> Path:
    folder = Path(samples).expanduser().resolve()
    return folder.with_name(folder.name + "_evaluation.json")


# ------------------------------------------------------------------------------------------------------ voxelize
def voxelize_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="monai-diffusion-voxelize",
        description="Turn point clouds (CSV/TSV tables such as ThunderSTORM's 'x [nm]' columns; HDF5 with h5py) "
        "into NIfTI volumes whose affine holds the voxel size and origin in mm, one per input "
        "(monai_diffusion/docs/pointclouds.md).",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="point-cloud files (.csv, .tsv, .txt, .h5, .hdf5)")
    parser.add_argument("--out", required=True, help="output folder; each input becomes <out>/<name>.nii.gz")
    parser.add_argument("--voxel-size", required=True, nargs="+", type=float, metavar="S",
                        help="voxel size in --unit: one value (cubic voxels) or three (x y z)")
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--extent", nargs=6, type=float, metavar=("X0", "X1", "Y0", "Y1", "Z0", "Z1"),
                      help="the volume's physical box in --unit (default: each file's bounding box)")
    grid.add_argument("--shape", nargs=3, type=int, metavar=("NX", "NY", "NZ"),
                      help="voxels per axis, starting at --origin")
    parser.add_argument("--origin", nargs=3, type=float, metavar=("X0", "Y0", "Z0"),
                        help="lower corner of voxel (0,0,0) in --unit, with --shape or alone (default 0 with "
                             "--shape, else the points' minimum)")
    parser.add_argument("--mode", choices=("occupancy", "density", "gaussian"), default="density",
                        help="occupancy (0/1), density (points per voxel) or gaussian (density smoothed by a "
                             "Gaussian of --sigma voxels); default density")
    parser.add_argument("--sigma", type=float, default=1.0, help="gaussian: standard deviation in voxels (default 1)")
    parser.add_argument("--normalize", action="store_true", help="density/gaussian: divide by the maximum (to [0, 1])")
    parser.add_argument("--unit", required=True, choices=("nm", "um", "mm"),
                        help="unit of --voxel-size, --extent, --origin, and of coordinate columns whose header names "
                             "no unit (headers such as 'x [nm]' or 'x_um' name their own)")
    parser.add_argument("--columns", help="x,y,z column names, or 0-based indices for files without a header")
    parser.add_argument("--dataset", help="HDF5: the dataset to read (default: the first of shape (N, 3) or with "
                                          "fields x, y, z, e.g. Picasso's 'locs')")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


def voxelize_main(argv: Sequence[str] | None = None) -> int:
    """``monai-diffusion-voxelize INPUT [INPUT ...] --out DIR --voxel-size S [S S] --unit nm|um|mm [...]``: point
    clouds -> NIfTI volumes."""
    args = voxelize_parser().parse_args(argv)
    from .pointcloud import voxelize_files

    def work() -> None:
        columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
        voxelize_files(
            args.inputs, args.out, args.voxel_size, args.unit, mode=args.mode, extent=args.extent, shape=args.shape,
            origin=args.origin, sigma=args.sigma, normalize=args.normalize, columns=columns, dataset=args.dataset,
            overwrite=args.overwrite,
        )

    return run_command(work)


# ------------------------------------------------------------------------------------------- convert-checkpoint
def convert_checkpoint_main(argv: Sequence[str] | None = None) -> int:
    """``monai-diffusion-convert-checkpoint OLD NEW``: rewrite an older monai-diffusion checkpoint (format 1 or 2) in
    the safe format (tensors and plain values only). Reading OLD unpickles it: only for files you trust."""
    parser = _OneLineParser(
        prog="monai-diffusion-convert-checkpoint",
        description="Rewrite a checkpoint of an older monai-diffusion in the current format, which holds only tensors "
                    "and plain values and so loads without running any code. ONLY FOR FILES YOU TRUST: reading the "
                    "old file unpickles it, which runs whatever code it holds.",
    )
    parser.add_argument("old", help="the older checkpoint (latest_checkpoint.pt, best_model.pt, step_checkpoint_*.pt)")
    parser.add_argument("new", help="where to write the converted checkpoint (must not exist)")
    args = parser.parse_args(argv)

    def work() -> None:
        from .checkpoints import CHECKPOINT_VERSION, convert_checkpoint

        path = convert_checkpoint(args.old, args.new)
        print(f"wrote {path} (checkpoint format {CHECKPOINT_VERSION}: tensors and plain values only)")

    return run_command(work)


# ------------------------------------------------------------------------------------------------ export-bundle
def export_bundle_main(argv: Sequence[str] | None = None) -> int:
    """``monai-diffusion-export-bundle --run DIR --out BUNDLE``: a trained run as a MONAI bundle (see
    :mod:`monai_diffusion.bundle`)."""
    parser = _OneLineParser(
        prog="monai-diffusion-export-bundle",
        description="Write a trained run as a MONAI bundle (configs/, models/ without pickled code, docs/) that "
                    "`python -m monai.bundle run --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE` "
                    "runs to write NIfTI samples.",
    )
    parser.add_argument("--run", required=True, help="the run folder the CLI wrote (e.g. runs/quickstart: its "
                                                     "diffusion/ holds best_model.pt and config.yaml)")
    parser.add_argument("--out", required=True, help="the bundle folder to write (must not exist, or be empty)")
    args = parser.parse_args(argv)

    def work() -> None:
        from .bundle import export_bundle

        written = export_bundle(args.run, args.out)
        print(f"wrote the MONAI bundle {args.out} ({len(written)} files); run it with: python -m monai.bundle run "
              f"--config_file {Path(args.out) / 'configs' / 'inference.json'} --bundle_root {args.out}")

    return run_command(work)
