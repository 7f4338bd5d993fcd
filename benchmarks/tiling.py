"""Exact tiled encode/decode of AutoencoderKL: its error against the untiled pass, and its peak memory by volume size.

``AutoencoderKL.encode_tiled`` / ``decode_tiled`` (and ``enable_tiling``) compute convolutions tile by tile with the
halo their kernels need, GroupNorm with whole-volume statistics gathered tile by tile, and attention on the whole
(low-resolution) tensor, so the result equals the untiled pass up to float rounding. This script measures:

* **error**: for a few architectures (factors [2, 2] (4x), [4, 2] with attention, [8, 2], anisotropic) and tiles that
  do not divide the volume, the mean and max |tiled - untiled| divided by the std of the untiled result, fp32, for
  encode (``z_mu``) and decode (of the untiled ``z_mu``);
* **memory**: peak memory of one encode and one decode pass, untiled and tiled, against the volume size, each in a
  fresh process. CPU: peak RSS (``VmHWM``, as ``ru_maxrss`` but not inherited from the parent) minus the RSS after
  the model and input exist, with
  ``MALLOC_MMAP_THRESHOLD_=131072`` so that freed tensors leave the RSS; CUDA: ``torch.cuda.max_memory_allocated``
  minus the allocation before the pass. Wall and CPU time are reported too (wall time is meaningless on a shared
  machine).

The model of the memory table is the 8x recipe of ``ldm_config_8x_downsample.yaml``: channels (32, 64, 64),
``downsample_factors [4, 2]``, latent_channels 3, one residual block per level, attention at the last level plus the
non-local blocks, ``use_flash_attention=True``; weights random (seed 0), as memory does not depend on them.

Usage (from the repository root)::

    python benchmarks/tiling.py                               # errors + memory at 64^3, 128^3, 192^3 (CPU)
    python benchmarks/tiling.py --skip-memory                 # errors only (~1 min)
    python benchmarks/tiling.py --sizes 96 160 --tile 64 --device cuda
    python benchmarks/tiling.py --single decode 512 128 --no-attention   # one large pass (takes long on a CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from monai_diffusion.memory import MIB, PeakMeter  # noqa: E402

from _common import RESULTS_DIR, machine_info, machine_line, markdown_table, write_json, write_text  # noqa: E402
from autoencoder_bench import CLEAN_MALLOC_ENV, run_worker_subprocess  # noqa: E402

from generative.networks.nets import AutoencoderKL  # noqa: E402

RECIPE_8X = dict(
    spatial_dims=3,
    in_channels=1,
    out_channels=1,
    num_channels=(32, 64, 64),
    attention_levels=(False, False, True),
    num_res_blocks=1,
    latent_channels=3,
    norm_num_groups=32,
    downsample_factors=[4, 2],
    use_flash_attention=True,
)

# name: (model arguments, input size, tile) -- tiles chosen so that they do not divide the volume
ERROR_CASES: dict[str, tuple[dict[str, Any], tuple[int, ...], tuple[int, ...]]] = {
    "3d 4x (None), non-local attention": (
        dict(RECIPE_8X, downsample_factors=None, attention_levels=(False, False, False)), (48, 48, 48), (32, 32, 32)
    ),
    "3d 8x [4, 2], attention (recipe)": (RECIPE_8X, (64, 64, 64), (40, 40, 40)),
    "3d anisotropic [(2,2,1), (4,4,2)], attention": (
        dict(RECIPE_8X, downsample_factors=[(2, 2, 1), (4, 4, 2)]), (64, 64, 16), (48, 40, 10)
    ),
    "3d 16x [8, 2], no attention": (
        dict(RECIPE_8X, downsample_factors=[8, 2], attention_levels=(False, False, False),
             with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False),
        (64, 64, 64), (48, 48, 48),
    ),
    "2d 16x [8, 2], attention": (dict(RECIPE_8X, spatial_dims=2, downsample_factors=[8, 2]), (256, 256), (96, 96)),
}


def rel(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = (a - ref).abs()
    std = ref.std()
    return float(diff.mean() / std), float(diff.max() / std)


def measure_errors() -> list[list[Any]]:
    rows = []
    for name, (args, size, tile) in ERROR_CASES.items():
        torch.manual_seed(0)
        model = AutoencoderKL(**args).eval()
        x = torch.rand(1, 1, *size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            z_mu, _ = model.encode(x)
            y = model.decode(z_mu)
        enc = rel(model.encode_tiled(x, tile_size=tile)[0], z_mu)
        dec = rel(model.decode_tiled(z_mu, tile_size=tile), y)
        rows.append([name, "x".join(map(str, size)), "x".join(map(str, tile)),
                     *(f"{v:.1e}" for v in (*enc, *dec))])
        print(rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------- memory
def worker(payload: dict[str, Any]) -> dict[str, Any]:
    """One pass in this (fresh) process: build, measure the baseline, run, report peak increase and time."""
    device = torch.device(payload["device"])
    torch.manual_seed(0)
    args = dict(RECIPE_8X)
    if not payload.get("attention", True):
        args.update(attention_levels=(False, False, False), with_encoder_nonlocal_attn=False,
                    with_decoder_nonlocal_attn=False)
    model = AutoencoderKL(**args).eval().to(device)
    size = (payload["size"],) * 3
    if payload["mode"] == "encode":
        inp = torch.rand(1, 1, *size, device=device)
    else:
        inp = torch.randn(model.latent_shape((1, 1, *size)), device=device)
    tile = payload["tile"]

    def run() -> torch.Tensor:
        with torch.no_grad():
            if payload["mode"] == "encode":
                return (model.encode_tiled(inp, tile_size=tile) if tile else model.encode(inp))[0]
            return model.decode_tiled(inp, tile_size=tile) if tile else model.decode(inp)

    # the project's one memory meter (monai_diffusion/memory.py): CUDA max allocated, or the VmHWM rise on CPU
    meter = PeakMeter(device)
    base = torch.cuda.memory_allocated(device) / MIB if device.type == "cuda" else PeakMeter.rss_mib()
    meter.start()
    t0, c0 = time.perf_counter(), time.process_time()
    out = run()
    peak = meter.peak_mib() - base if device.type == "cuda" else meter.rise_mib()
    return {"peak_mib": peak, "pass_wall_s": time.perf_counter() - t0, "pass_cpu_s": time.process_time() - c0,
            "output_mib": out.numel() * out.element_size() / 2**20, "baseline_mib": base}


def measure_memory(sizes: list[int], tile: int, device: str) -> list[dict[str, Any]]:
    results = []
    for mode in ("decode", "encode"):
        for size in sizes:
            for t in (None, tile):
                payload = {"mode": mode, "size": size, "tile": t, "device": device}
                res = run_worker_subprocess(Path(__file__), payload, timeout=3600, extra_env=CLEAN_MALLOC_ENV)
                res.update(payload)
                results.append(res)
                print(json.dumps(res), flush=True)
    return results


def memory_rows(results: list[dict[str, Any]]) -> list[list[Any]]:
    by_key = {(r["mode"], r["size"], r["tile"]): r for r in results}
    rows = []
    for r in results:
        if r["tile"] is None:
            continue
        untiled = by_key.get((r["mode"], r["size"], None), {})

        def cell(res: dict[str, Any], key: str, fmt: str) -> str:
            return fmt.format(res[key]) if key in res else res.get("error", "—")

        ratio = (f"{r['peak_mib'] / untiled['peak_mib']:.2f}" if "peak_mib" in r and "peak_mib" in untiled else "—")
        rows.append([r["mode"], f"{r['size']}^3", r["tile"], cell(untiled, "peak_mib", "{:.0f}"),
                     cell(r, "peak_mib", "{:.0f}"), ratio, cell(r, "output_mib", "{:.0f}"),
                     cell(untiled, "pass_cpu_s", "{:.0f}"), cell(r, "pass_cpu_s", "{:.0f}")])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 192], help="cubic volume sizes (voxels)")
    parser.add_argument("--tile", type=int, default=64, help="tile size (image voxels) of the tiled passes")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--skip-errors", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", default=None, help="output path without suffix (default results/tiling_<device>)")
    parser.add_argument(
        "--render-log", default=None,
        help="write the tables from the per-process JSON lines of an earlier (e.g. interrupted) run's stdout instead of "
             "measuring; the machine line is then this machine now",
    )
    parser.add_argument(
        "--single", nargs=3, metavar=("MODE", "SIZE", "TILE"), default=None,
        help="measure one pass (encode|decode, cubic size, tile; tile 0 = untiled) in a fresh process and print JSON "
             "with the machine description, e.g. --single decode 512 128",
    )
    parser.add_argument("--no-attention", action="store_true", help="with --single: no attention blocks")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.single:
        mode, size, tile = args.single[0], int(args.single[1]), int(args.single[2]) or None
        payload = {"mode": mode, "size": size, "tile": tile, "device": args.device, "attention": not args.no_attention}
        info = machine_info(args.device)
        res = run_worker_subprocess(Path(__file__), payload, extra_env=CLEAN_MALLOC_ENV)
        record = {**payload, **res, "machine": info}
        print(json.dumps(record))
        if args.out:  # keep the figure: <out>.json and a one-row <out>.md
            out = Path(args.out)
            command = "python benchmarks/tiling.py " + " ".join(sys.argv[1:] if argv is None else argv)
            write_json(out.with_suffix(".json"), {"command": command, **record})
            cell = (lambda k, f: f.format(res[k]) if k in res else res.get("error", "—"))
            write_text(out.with_suffix(".md"), "\n".join([
                f"# One {mode} pass of the 8x recipe ({args.device})", "", machine_line(info), "",
                f"Command: `{command.strip()}`", "",
                markdown_table(["pass", "volume", "tile", "attention", "peak MiB", "output MiB", "wall s", "CPU s"],
                               [[mode, f"{size}^3", tile or "untiled", "yes" if payload["attention"] else "no",
                                 cell("peak_mib", "{:.0f}"), cell("output_mib", "{:.0f}"),
                                 cell("pass_wall_s", "{:.0f}"), cell("pass_cpu_s", "{:.0f}")]]), ""]))
        return 0
    start = time.perf_counter()
    info = machine_info(args.device)
    if args.render_log:
        lines = Path(args.render_log).read_text().splitlines()
        memory = [json.loads(ln) for ln in lines if ln.startswith("{") and '"mode"' in ln]
        args.skip_errors = True
    else:
        memory = [] if args.skip_memory else measure_memory(args.sizes, args.tile, args.device)
    errors = [] if args.skip_errors else measure_errors()
    out = Path(args.out) if args.out else RESULTS_DIR / f"tiling_{args.device}"
    command = "python benchmarks/tiling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json(out.with_suffix(".json"), {"machine": info, "command": command, "errors": errors, "memory": memory})
    meter = ("peak RSS increase (`VmHWM` minus RSS after model and input exist, fresh process, "
             "`MALLOC_MMAP_THRESHOLD_=131072`)" if args.device == "cpu" else "`torch.cuda.max_memory_allocated` increase")
    lines = [f"# Exact tiled encode/decode ({args.device})", "", machine_line(info), "", f"Command: `{command.strip()}`  ",
             f"Total wall time {(time.perf_counter() - start) / 60:.1f} min.", ""]
    if errors:
        lines += ["## Error of the tiled pass (fp32)", "",
                  "mean / max |tiled - untiled| divided by the std of the untiled output; random weights (seed 0), "
                  "uniform random input; decode uses the untiled `z_mu`.", "",
                  markdown_table(["model", "volume", "tile", "encode mean", "encode max", "decode mean", "decode max"],
                                 errors), ""]
    if memory:
        lines += ["## Peak memory against volume size", "",
                  f"8x recipe (channels (32, 64, 64), `[4, 2]`, attention at the last level + non-local, SDPA), batch "
                  f"1, fp32, under `torch.no_grad()`. Peak: {meter}, in MiB; it includes the returned tensor "
                  f"(column \"output\"). CPU s: process CPU time of the pass.", "",
                  markdown_table(["pass", "volume", "tile", "untiled peak", "tiled peak", "tiled / untiled",
                                  "output", "untiled CPU s", "tiled CPU s"], memory_rows(memory)), ""]
    write_text(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
