"""Does each config run on this machine, or stop before training with the memory message? (issue 23)

For every config (the shipped ones by default; any other YAML with ``--configs``, such as the seed system's configs
with their data paths changed), as a user runs them: the stage-1 command with ``--fast-dev-run``; where that ran, one
real stage-1 step that writes a checkpoint; then the stage-2 command with ``--fast-dev-run`` on it, one real stage-2
step, and sampling one volume from it (2 DDIM steps: the memory of a sampling step does not depend on their number). Each command runs
in its own process on synthetic phantoms at the config's voxel size (two training volumes, one validation volume,
written once per size), with the config's own networks, batch size and precision. Recorded per command: exit code,
wall time, the process's peak resident memory (``wait4``'s ``ru_maxrss``), the ``memory:`` line of the check, the
``error:`` line when it stopped, and ``fast_dev_run``'s step time and peak.

    python benchmarks/config_fit.py                                        # the shipped configs
    python benchmarks/config_fit.py --configs my.yaml other.yaml --tag seed  # other configs

Results: ``benchmarks/results/config_fit_<device>[_<tag>].{json,md}``, rewritten after every command.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from _common import REPO_ROOT, RESULTS_DIR, machine_info, machine_line, markdown_table, write_results

CONFIGS = REPO_ROOT / "monai_diffusion" / "config"
SHIPPED = ["examples/quickstart.yaml", "examples/quickstart_vq.yaml", "examples/pixel_2d_phantom.yaml",
           "ldm_config.yaml", "examples/ldm_config_8x_downsample.yaml", "examples/ldm_config_2d_512.yaml",
           "examples/ldm_config_16x_downsample.yaml"]
SCRIPTS = REPO_ROOT / "monai_diffusion" / "3d_ldm"
FDR_STEP = re.compile(r"fast_dev_run: (\d+) training step\(s\), ([\d.]+) s/step")
FDR_PEAK = re.compile(r"fast_dev_run: peak memory of the last training step (\d+) MiB")


def run(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run ``cmd``; exit code (None when killed at ``timeout``), seconds, peak RSS of the process tree's largest
    child (MiB) and its output."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=_env())
        deadline = t0 + timeout
        status, usage, timed_out = None, None, False
        while status is None:
            pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status, usage = st, ru
                break
            if time.perf_counter() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                timed_out = True
                break
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read()
    return {"exit_code": None if timed_out else proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "output": output}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO_ROOT), str(REPO_ROOT / "GenerativeModels"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def summary(output: str) -> dict[str, Any]:
    """The lines a user reads: the memory check's, the error, fast_dev_run's figures."""
    out: dict[str, Any] = {}
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("memory:") and "memory" not in out and "GiB" in line:
            out["memory"] = line
        elif line.startswith("error:"):
            out["error"] = line
    m, p = FDR_STEP.search(output), FDR_PEAK.search(output)
    if m:
        out["s_per_step"] = float(m.group(2))
    if p:
        out["fdr_peak_mib"] = int(p.group(1))
    if "Traceback (most recent call last)" in output:
        out["traceback"] = output.strip().splitlines()[-1][:300]
    return out


def data_for(size: list[int], dims: int, work: Path) -> Path:
    folder = work / f"data_{'x'.join(map(str, size))}"
    if not (folder / "val").is_dir():
        from monai_diffusion.synthetic import make_synthetic_dataset

        train, val = make_synthetic_dataset(folder / "train", 2, 1, size, seed=0)
        (folder / "val").mkdir()
        for f in val:
            os.replace(f, folder / "val" / Path(f).name)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=None, help="YAML files (default: the shipped configs)")
    parser.add_argument("--tag", default=None, help="suffix of the result files")
    parser.add_argument("--work", default=None, help="folder for data and runs (default: a temporary one)")
    parser.add_argument("--data", default=None, help="a folder with train/ and val/ volumes to use instead of phantoms "
                        "written at each config's size")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per command")
    parser.add_argument("--append", action="store_true",
                        help="keep the results file's other configs; the configs run now replace their own rows")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="an override for every command")
    args = parser.parse_args()
    configs = [Path(c) for c in args.configs] if args.configs else [CONFIGS / c for c in SHIPPED]
    work = Path(args.work or tempfile.mkdtemp(prefix="config_fit_"))
    stem = RESULTS_DIR / f"config_fit_cpu{'_' + args.tag if args.tag else ''}"
    report: dict[str, Any] = {"machine": machine_info("cpu"), "results": []}
    if args.append and stem.with_suffix(".json").is_file():
        import json

        names = {c.name for c in configs}
        old = json.loads(stem.with_suffix(".json").read_text())
        report["results"] = [e for e in stamped(old)["results"] if Path(e["config"]).name not in names]
    for config in configs:
        raw = yaml.safe_load(config.read_text())
        data_cfg = raw.get("data") or {}
        size = data_cfg.get("voxel_size")
        dims = int((raw.get("autoencoder") or raw.get("diffusion") or {}).get("spatial_dims", 3))
        size = [size] * dims if isinstance(size, int) else list(size)
        data = Path(args.data) if args.data else data_for(size, dims, work)
        run_dir = work / config.stem
        sets = ["data.synthetic={enabled: false}", "data.datalist=null", f"data.train_data_dir={data / 'train'}",
                f"data.val_data_dir={data / 'val'}", "data.num_workers=0", "data.cache_dir=null",
                f"autoencoder.checkpoints.output_dir={run_dir / 'ae'}", "autoencoder.checkpoints.resume_from=null",
                f"diffusion.checkpoints.output_dir={run_dir / 'dm'}", "diffusion.checkpoints.resume_from=null",
                f"diffusion.checkpoints.autoencoder_path={run_dir / 'ae' / 'best_model.pt'}",
                "autoencoder.logging.log_dir=null", "diffusion.logging.log_dir=null", *args.sets]
        pixel = (raw.get("diffusion") or {}).get("space") == "pixel"
        if pixel:  # no autoencoder
            sets = [x for x in sets if not x.startswith("diffusion.checkpoints.autoencoder_path=")] + [
                "diffusion.checkpoints.autoencoder_path=null"]
        steps = commands(pixel, run_dir)
        for name, script, flags, extra in steps:
            cmd = [sys.executable, str(SCRIPTS / script), "--config", str(config), *flags]
            for s in [*sets, *extra]:
                cmd += ["--set", s]
            print(f"{config.name}: {name} ...", flush=True)
            r = run(cmd, args.timeout)
            entry = {"config": str(config.relative_to(REPO_ROOT)) if config.is_relative_to(REPO_ROOT) else
                     config.name, "size": size, "step": name, **{k: v for k, v in r.items() if k != "output"},
                     **summary(r["output"]), "output_tail": r["output"].strip().splitlines()[-6:],
                     "machine": report["machine"]}
            report["results"].append(entry)
            print(f"  exit {entry['exit_code']}, {entry['seconds']} s, peak RSS {entry['peak_rss_mib']} MiB; "
                  f"{entry.get('error') or entry.get('memory') or entry.get('traceback') or ''}", flush=True)
            write_results(stem, report, render(report))
            if entry["exit_code"] != 0:
                break  # the next step needs this one


def commands(pixel: bool, run_dir: Path) -> list[tuple[str, str, list[str], list[str]]]:
    """The commands run for one config, in order: (name, script, flags, extra --set overrides)."""
    steps = [("stage 2 --fast-dev-run", "train_diffusion.py", ["--fast-dev-run"], [])] if pixel else [
        ("stage 1 --fast-dev-run", "train_autoencoder.py", ["--fast-dev-run"], []),
        ("stage 1, one step (checkpoint)", "train_autoencoder.py", [],
         ["autoencoder.training.fast_dev_run=false", "autoencoder.training.n_epochs=1",
          "autoencoder.training.val_interval=1",
          "data.max_data_size_for_train=1", "autoencoder.training.gradient_accumulation_steps=1",
          "autoencoder.logging.visualize_interval=1000"]),
        ("stage 2 --fast-dev-run", "train_diffusion.py", ["--fast-dev-run"], []),
    ]
    steps += [
        ("stage 2, one step (checkpoint)", "train_diffusion.py", [],
         ["diffusion.training.fast_dev_run=false", "diffusion.training.n_epochs=1",
          "diffusion.training.val_interval=1", "data.max_data_size_for_train=1",
          "diffusion.training.gradient_accumulation_steps=1", "diffusion.training.num_samples_to_generate=0"]),
        ("sampling (1 volume, 2 DDIM steps)", "generate_samples.py", [],
         ["sampling.num_samples=1", "sampling.batch_size=1", "sampling.scheduler=ddim",
          "sampling.num_inference_steps=2", f"sampling.output_dir={run_dir / 'samples'}"]),
    ]
    return steps


def stamped(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` with every row carrying the machine (with its commit and date) it ran on; a row written before rows
    carried it is given the file's ``machine``."""
    report.pop("earlier_machine", None)
    for e in report["results"]:
        e.setdefault("machine", report["machine"])
    return report


def render(report: dict[str, Any]) -> str:
    report = stamped(report)
    machines: list[str] = []
    for e in report["results"]:
        line = machine_line(e["machine"])
        if line not in machines:
            machines.append(line)
    rows = []
    for e in report["results"]:
        if e["exit_code"] == 0:
            verdict = "ran"
        elif e.get("error", "").startswith("error: ") and "needs about" in e.get("error", "") and \
                "available" in e.get("error", ""):
            verdict = "stopped before training: memory"
        elif e["exit_code"] is None:
            verdict = "killed at the time limit"
        else:
            verdict = f"failed (exit {e['exit_code']})"
        said = e.get("error") or e.get("memory") or e.get("traceback") or ""
        rows.append([Path(e["config"]).name, "x".join(map(str, e["size"])), e["step"], verdict, e["seconds"],
                     f"{e['peak_rss_mib']:,}", e.get("s_per_step", ""),
                     "ABCDEFGHIJ"[machines.index(machine_line(e["machine"]))], said.replace("|", "\\|")])
    return "\n".join([
        "# Does each config run here, or stop before training with the memory message?", "",
        *[f"{'ABCDEFGHIJ'[i]}. {line}" for i, line in enumerate(machines)], "",
        markdown_table(["config", "size", "command", "result", "seconds", "peak RSS (MiB)", "s/step", "machine",
                        "what it said"], rows), ""])


if __name__ == "__main__":
    main()
