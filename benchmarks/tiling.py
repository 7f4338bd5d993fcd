"""How far tiled encoding/decoding of AutoencoderKL is from the whole-volume pass, and what it saves.

``AutoencoderKL.encode_tiled`` / ``decode_tiled`` (or ``enable_tiling``) run the network on halo-padded tiles and keep
each tile's core. Convolutions see the same inputs as in the whole-volume pass wherever the halo covers their
receptive field, but GroupNorm statistics and attention are computed per tile, so the result differs. This script
measures by how much, for a few tile/halo settings, and prints a Markdown table:

* encode: tiled ``z_mu`` against the untiled ``z_mu``;
* decode: tiled decoding of the untiled ``z_mu`` against its untiled decoding;
* differences are mean and max absolute differences divided by the standard deviation of the untiled result;
* work: voxels run through the network (tile cores plus halos) relative to the volume, a machine-independent
  measure of the extra compute;
* the peak resident-memory increase of one decode pass, measured in a forked child process (``VmHWM`` from
  ``/proc/self/status``; Linux only, skipped elsewhere or with ``--no-memory``);
* with ``--time``, wall time of each pass (meaningless on a machine shared with other jobs).

By default the networks are randomly initialised (seeded) and the input is a synthetic phantom (random ellipsoids on
a zero background); ``--checkpoint`` measures a trained monai-diffusion autoencoder instead and ``--input`` a real
volume stored as ``.npy``. Trained weights can behave differently from random ones: measure the model you deploy.

Usage (from the repository root)::

    python benchmarks/tiling.py                      # both built-in cases, CPU only
    python benchmarks/tiling.py --cases 2d --no-memory
    python benchmarks/tiling.py --cases 3d --settings 32:16,16:8
    python benchmarks/tiling.py --checkpoint runs/autoencoder/best_model.pt --input volume.npy --settings 128:32
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

# idle OpenMP threads sleep instead of spinning, which matters on a shared machine; must be set before torch starts
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from generative.networks.nets import AutoencoderKL  # noqa: E402
from generative.networks.nets.autoencoderkl import AttentionBlock  # noqa: E402

CASES: dict[str, dict[str, Any]] = {
    # the default 3D recipe of monai_diffusion/config/ldm_config.yaml (4x, legacy factors) on a 64^3 volume
    "3d": {
        "model": dict(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            num_channels=(32, 64, 64),
            attention_levels=(False, False, False),
            num_res_blocks=1,
            latent_channels=3,
            norm_num_groups=32,
            downsample_factors=None,
        ),
        "size": (64, 64, 64),
        "settings": [(32, 0), (32, 16)],
    },
    # the 8x recipe of ldm_config_8x_downsample.yaml (factors [4, 2], attention at the latent level), in 2D
    "2d": {
        "model": dict(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            num_channels=(32, 64, 64),
            attention_levels=(False, False, True),
            num_res_blocks=1,
            latent_channels=3,
            norm_num_groups=32,
            downsample_factors=[4, 2],
        ),
        "size": (256, 256),
        "settings": [(256, 0), (128, 0), (128, 32), (128, 64), (64, 32)],
    },
}


def phantom(size: Sequence[int], seed: int) -> torch.Tensor:
    """1 x 1 x *size image in [0, 1]: random ellipsoids on a zero background plus a little noise."""
    gen = torch.Generator().manual_seed(seed)
    dims = len(size)
    coords = [torch.linspace(-1, 1, n).reshape([n if i == axis else 1 for i in range(dims)]) for axis, n in
              enumerate(size)]
    img = torch.zeros(size)
    for _ in range(12):
        centre = torch.rand(dims, generator=gen) - 0.5
        radii = 0.1 + 0.4 * torch.rand(dims, generator=gen)
        dist = sum(((c - float(m)) / float(r)) ** 2 for c, m, r in zip(coords, centre, radii))  # broadcasts
        img = torch.where(dist <= 1, 0.2 + 0.8 * float(torch.rand((), generator=gen)), img)
    img = img + 0.02 * torch.randn(size, generator=gen)
    return img.clamp(0, 1)[None, None]


def count_tiles(size: Sequence[int], tile: int) -> int:
    return math.prod(math.ceil(n / tile) for n in size)


def work_ratio(size: Sequence[int], tile: int, halo: int) -> float:
    """Voxels run through the network (cores plus halos of all tiles) divided by the voxels of the volume."""
    total = 1
    for n in size:
        total *= sum(min(n, s + tile + halo) - max(0, s - halo) for s in range(0, n, tile))
    return total / math.prod(size)


def rel_diff(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Mean and max absolute difference, both divided by the standard deviation of ``ref``."""
    diff = (a.float() - ref.float()).abs()
    std = ref.float().std()
    return float(diff.mean() / std), float(diff.max() / std)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+)", f.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"{field} not in /proc/self/status")
    return int(match.group(1))


def _peak_increase_mib(run: Callable[[], Any]) -> float:
    """Peak resident memory reached by ``run()`` above the resident memory before it, in MiB (Linux)."""
    gc.collect()
    try:  # reset the high-water mark (Linux >= 4.0); a fresh child is close to it anyway
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = _proc_status_kib("VmRSS")
    run()
    return (_proc_status_kib("VmHWM") - before) / 1024


def _return_freed_memory() -> None:
    """Make glibc hand large freed blocks back to the system at once, so resident memory follows live tensors.

    By default glibc raises its mmap threshold after large frees and then keeps freed heap memory around, which makes
    the peak resident size depend on the allocation history rather than on what the pass needs.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed (disables the dynamic adjustment)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def memory_supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "fork") and os.path.exists("/proc/self/status")


def in_child(fn: Callable[[], float]) -> float | None:
    """Run ``fn`` in a forked child (fresh heap, own high-water mark) and return its result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(fn()).encode())
            code = 0
        except BaseException:  # noqa: BLE001 - report and leave the cell empty
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    while True:
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if status != 0 or not chunks:
        return None
    return float(json.loads(b"".join(chunks)))


# ------------------------------------------------------------------------------------------------ measuring
def build(case: dict[str, Any], args: argparse.Namespace) -> tuple[AutoencoderKL, torch.Tensor]:
    if args.checkpoint:
        from monai_diffusion.models import load_autoencoder

        model, _ = load_autoencoder(args.checkpoint)
    else:
        torch.manual_seed(args.seed)
        model = AutoencoderKL(**case["model"])
    if args.ablate:
        ablate(model, args.ablate)
    model.eval()
    if args.input:
        import numpy as np

        x = torch.from_numpy(np.load(args.input)).float()
        while x.dim() < model.spatial_dims + 2:
            x = x[None]
    else:
        x = phantom(case["size"], args.seed)
    return model, x


def ablate(model: torch.nn.Module, what: str) -> None:
    """Diagnostic only: replace GroupNorm and/or attention blocks by identities, in place."""
    kinds = {"groupnorm": (torch.nn.GroupNorm,), "attention": (AttentionBlock,),
             "both": (torch.nn.GroupNorm, AttentionBlock)}[what]
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, kinds):
                setattr(module, child_name, torch.nn.Identity())


def decode_memory(case: dict[str, Any], args: argparse.Namespace, setting: tuple[int, int] | None) -> float | None:
    """Peak memory increase of one decode pass (untiled when ``setting`` is None), in a forked child."""

    def child() -> float:
        _return_freed_memory()
        torch.set_num_threads(args.threads)
        model, x = build(case, args)
        z = torch.randn(model.latent_shape(x.shape))  # values do not change memory use
        with torch.no_grad():
            if setting is None:
                return _peak_increase_mib(lambda: model.decode(z))
            return _peak_increase_mib(lambda: model.decode_tiled(z, tile_size=setting[0], halo=setting[1]))

    return in_child(child)


def measure_memory(case: dict[str, Any], args: argparse.Namespace) -> dict[Any, float | None]:
    """Decode peak memory of the untiled pass (key None) and of each tile setting, each in a forked child.

    Must run before this process computes anything with torch: a child forked after the parent has used its
    OpenMP thread pool can hang.
    """
    memory = {None: decode_memory(case, args, None)}
    for setting in case["settings"]:
        memory[setting] = decode_memory(case, args, setting)
    return memory


def measure(name: str, case: dict[str, Any], args: argparse.Namespace, memory: dict) -> list[dict[str, Any]]:
    settings = case["settings"]
    model, x = build(case, args)
    size = tuple(x.shape[2:])
    rows = []
    with torch.no_grad():
        (z_mu, _), t_enc = timed(lambda: model.encode(x))
        y, t_dec = timed(lambda: model.decode(z_mu))
        rows.append(
            dict(case=name, size=size, tile="untiled", halo="", tiles=1, work=1.0, enc=None, dec=None,
                 t_enc=t_enc, t_dec=t_dec, mem=memory.get(None))
        )
        for tile, halo in settings:
            (z_t, _), t_enc = timed(lambda: model.encode_tiled(x, tile_size=tile, halo=halo))
            y_t, t_dec = timed(lambda: model.decode_tiled(z_mu, tile_size=tile, halo=halo))
            rows.append(
                dict(case=name, size=size, tile=tile, halo=halo, tiles=count_tiles(size, tile),
                     work=work_ratio(size, tile, halo), enc=rel_diff(z_t, z_mu), dec=rel_diff(y_t, y),
                     t_enc=t_enc, t_dec=t_dec, mem=memory.get((tile, halo)))
            )
    return rows


def describe(name: str, case: dict[str, Any], args: argparse.Namespace) -> str:
    ablated = f"; ablated (replaced by identity): {args.ablate}" if args.ablate else ""
    if args.checkpoint:
        return f"`{name}`: checkpoint {args.checkpoint}{ablated}"
    m = case["model"]
    factors = m["downsample_factors"] if m["downsample_factors"] is not None else "None (2 per level)"
    return (
        f"`{name}`: {m['spatial_dims']}D, input {'x'.join(map(str, case['size']))}, num_channels "
        f"{list(m['num_channels'])}, downsample_factors {factors}, attention_levels "
        f"{[bool(a) for a in m['attention_levels']]}, num_res_blocks {m['num_res_blocks']}, latent_channels "
        f"{m['latent_channels']}, norm_num_groups {m['norm_num_groups']}, encoder/decoder non-local attention on"
        f"{ablated}"
    )


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict[str, Any]], with_memory: bool, with_time: bool) -> str:
    head = ["case", "tile", "halo", "tiles", "work", "encode mean", "encode max", "decode mean", "decode max"]
    if with_time:
        head += ["encode s", "decode s"]
    if with_memory:
        head.append("decode peak MiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        enc = r["enc"] or (None, None)
        dec = r["dec"] or (None, None)
        cells = [r["case"], str(r["tile"]), str(r["halo"]), str(r["tiles"]), f"{r['work']:.2f}x", fmt(enc[0]),
                 fmt(enc[1]), fmt(dec[0]), fmt(dec[1])]
        if with_time:
            cells += [fmt(r["t_enc"], 2), fmt(r["t_dec"], 2)]
        if with_memory:
            cells.append(fmt(r["mem"], 0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_settings(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        tile, _, halo = item.partition(":")
        out.append((int(tile), int(halo or 0)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="3d,2d", help=f"comma-separated built-in cases: {', '.join(CASES)}")
    parser.add_argument("--settings", default=None, help="tile:halo pairs in image voxels, e.g. 32:0,32:16")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory column")
    parser.add_argument("--time", action="store_true", help="add wall-time columns (noisy on a shared machine)")
    parser.add_argument(
        "--ablate", choices=["groupnorm", "attention", "both"], default=None,
        help="diagnostic: replace GroupNorm and/or attention blocks by identities to see what the rest contributes",
    )
    parser.add_argument("--checkpoint", default=None, help="monai-diffusion autoencoder checkpoint to measure")
    parser.add_argument("--input", default=None, help=".npy volume (spatial, or channel + spatial) to encode")
    args = parser.parse_args(argv)
    if args.memory and not memory_supported():
        print("peak memory needs Linux (/proc/self/status and fork); skipping it", file=sys.stderr)
        args.memory = False
    torch.set_num_threads(args.threads)

    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    if args.checkpoint and len(names) != 1:
        parser.error("--checkpoint measures one model: name one case (its tile settings are used unless --settings)")
    start = time.perf_counter()
    cases = {}
    for name in names:
        cases[name] = dict(CASES[name])
        if args.settings:
            cases[name]["settings"] = parse_settings(args.settings)
    # all forked memory measurements first, while this process has not computed anything yet
    memory = {name: measure_memory(case, args) if args.memory else {} for name, case in cases.items()}
    rows, notes = [], []
    for name, case in cases.items():
        rows += measure(name, case, args, memory[name])
        notes.append(describe(name, case, args))
    print(table(rows, args.memory, args.time))
    print()
    for note in notes:
        print(f"- {note}")
    print(
        f"- differences: mean / max |tiled - untiled| divided by the std of the untiled result; tile and halo in "
        f"image voxels; decode uses the untiled z_mu; seed {args.seed}"
    )
    print(
        f"- {platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"python {platform.python_version()}; total {time.perf_counter() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
