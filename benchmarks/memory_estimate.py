"""How close the memory check's estimate comes to the measured peak: for each shipped config and stage, the estimate
that runs before every training run (``plan.preflight.estimate_step``: one step on fake tensors) beside ``plan``'s
measurement of the same step (a fresh process, after a warm-up step, as ``--fast-dev-run`` measures), at the
config's own size, precision and batch 1. Stages that do not fit this machine are estimated only.

    python benchmarks/memory_estimate.py [--device cuda] [--configs quickstart.yaml /abs/other.yaml ...]
        [--set KEY=VALUE ...] [--out STEM]

``--set`` overrides apply to every config (e.g. ``autoencoder.training.use_perceptual_loss=false`` for the seed
system's configs, whose perceptual loss needs a weights file).

Results: ``benchmarks/results/memory_estimate_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import REPO_ROOT, RESULTS_DIR, machine_info, machine_line, markdown_table, write_results
from monai_diffusion.memory import MIB, available_bytes
from monai_diffusion.plan.measure import measure_stages
from monai_diffusion.plan.preflight import estimate_step
from monai_diffusion.runtime import resolve_precision
from monai_diffusion.settings import ConfigError, load_settings

CONFIGS = REPO_ROOT / "monai_diffusion" / "config"
DEFAULT = ["examples/quickstart.yaml", "ldm_config.yaml", "examples/ldm_config_8x_downsample.yaml",
           "examples/ldm_config_2d_512.yaml", "examples/ldm_config_16x_downsample.yaml"]
# data paths are not read by either figure; settings validation wants them to exist
_NO_DATA = ["data.train_data_dir=null", "data.val_data_dir=null", "data.datalist=null",
            "data.synthetic={enabled: true}", "diffusion.checkpoints.autoencoder_path=null"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", nargs="*", default=DEFAULT)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per measurement process")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="an override for every config")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    free = available_bytes(device)[0]
    rows, report = [], {"machine": machine_info(args.device), "results": []}
    for name in args.configs:
        try:
            s = load_settings(CONFIGS / name, overrides=[*_NO_DATA, *args.sets], check_paths=False,
                              require_data=False)
        except ConfigError as exc:  # one config the settings refuse: say so, go on with the others
            first = str(exc).splitlines()[0]
            report["results"].append({"config": name, "error": str(exc)})
            rows.append([name.split("/")[-1], "", "", "", "", f"refused by the settings: {first[:80]}", "", "", ""])
            print(rows[-1], flush=True)
            continue
        precision = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[
            resolve_precision(s.device.mixed_precision, device)]
        for stage in ("autoencoder", "diffusion"):
            t0 = time.perf_counter()
            est = estimate_step(s, stage, device, 1)
            entry = {"config": name, "stage": stage, "precision": precision, "estimate_mib": est["peak_mib"],
                     "need_mib": est["need_mib"], "estimate_seconds": time.perf_counter() - t0}
            if free is not None and est["need_mib"] > 0.8 * free / MIB:
                entry["measured"] = f"not measured: the estimate needs {est['need_mib'] / 1024:.1f} GiB"
            else:
                m = measure_stages([stage], s, str(device), precision, 1, 1, args.timeout)[stage]
                entry["measured"] = m
            report["results"].append(entry)
            m = entry["measured"]
            peak = m.get("peak_mib") if isinstance(m, dict) and m.get("ok") else None
            rows.append([name.split("/")[-1], stage, precision, f"{est['peak_mib']:,.0f}", f"{est['need_mib']:,.0f}",
                         f"{peak:,.0f}" if peak else (m if isinstance(m, str) else m.get("error", "failed"))[:60],
                         f"{peak / est['peak_mib']:.2f}" if peak else "",
                         "yes" if peak and peak <= est["need_mib"] else ("no" if peak else ""),
                         f"{entry['estimate_seconds']:.1f}"])
            print(rows[-1], flush=True)
    table = markdown_table(["config", "stage", "precision", "estimate MiB (tensors)", "need MiB (with margin)",
                            "measured MiB", "measured / estimate", "within need", "estimate s"], rows)
    md = (f"# The memory check's estimate against the measured peak ({args.device})\n\n"
          f"{machine_line(report['machine'])}\n\nOne training step at batch 1, the config's own size and precision. "
          "Estimate: `plan.preflight.estimate_step` (fake tensors); measured: `plan`'s fresh-process measurement "
          f"(`memory.PeakMeter`).\n\n{table}\n")
    write_results(args.out or RESULTS_DIR / f"memory_estimate_{args.device.split(':')[0]}", report, md)
    print(md)


if __name__ == "__main__":
    main()
