"""What every benchmark script shares: the description of the machine it measured on, and writing its results.

* :func:`machine_info` / :func:`machine_line`: CPU model and the flags that decide bf16 speed on a CPU
  (``avx512_bf16``, ``amx*``; ``avx2``/``avx512f`` for the vector width), cores, memory, Python, torch and monai
  versions, the commit, the time and the load; on CUDA also the GPU's name, memory, driver and CUDA version.
* :func:`write_json`, :func:`write_text`, :func:`write_results`: results as ``<stem>.json`` and ``<stem>.md``,
  each written atomically (``monai_diffusion.fileio``), so a run killed while writing leaves the previous file.
* :func:`markdown_table`.

Benchmarks are run as ``python benchmarks/<script>.py``, so this folder is on ``sys.path`` and ``import _common``
works without any path manipulation; the project itself must be importable (``pip install -e .``, or
``PYTHONPATH=$PWD:$PWD/GenerativeModels``).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from monai_diffusion.fileio import atomic_write_json, atomic_write_text

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# CPU flags worth recording: the vector width, and the instructions that make bf16 autocast pay off on a CPU
_FLAGS = ("avx2", "avx512f", "avx512_bf16")


def cpu_info() -> dict[str, Any]:
    """``{"model": ..., "flags": [...]}`` from ``/proc/cpuinfo`` (model "unknown" and no flags elsewhere); flags are
    those of :data:`_FLAGS` and every ``amx*`` flag the CPU reports."""
    model, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown", "", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    have = set(line.split(":", 1)[1].split())
                    flags = sorted(f for f in have if f in _FLAGS or f.startswith("amx"))
    except OSError:
        pass
    return {"model": model, "flags": flags}


def _ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def git_commit() -> str:
    """Short commit of the repository ("" when git or the repository is not there)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO_ROOT, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def gpu_info(index: int = 0) -> dict[str, Any]:
    """Name, memory, driver and CUDA version of CUDA device ``index`` (empty without CUDA). The driver comes from
    ``nvidia-smi`` (None where it is missing); the CUDA version is the one torch was built with."""
    import torch

    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(index)
    driver = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={index}"],
                             capture_output=True, text=True, timeout=30)
        driver = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "gpu": torch.cuda.get_device_name(index),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "gpu_capability": f"{props.major}.{props.minor}",
        "gpu_driver": driver,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "bf16_supported": torch.cuda.is_bf16_supported(),
    }


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, GPU (``device`` "cuda"), versions, commit, time."""
    import monai
    import torch

    cpu = cpu_info()
    info = {
        "device": device,
        "cpu_model": cpu["model"],
        "cpu_flags": cpu["flags"],
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": _ram_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    if device.startswith("cuda"):
        info.update(gpu_info(int(device.split(":", 1)[1]) if ":" in device else 0))
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One-line Markdown description of the machine of :func:`machine_info`."""
    if info.get("gpu"):
        where = (f"{info['gpu']}, {info['gpu_memory_gib']} GiB, driver {info.get('gpu_driver') or 'unknown'}, "
                 f"CUDA {info.get('cuda')}")
    else:
        where = f"CPU only, {info['cpu_cores_usable']} cores ({info['torch_threads']} torch threads)"
    flags = info.get("cpu_flags") or []
    if isinstance(flags, dict):  # reports written before _common: {flag: present}
        flags = [k for k, v in flags.items() if v]
    flags = ", ".join(flags or ["none of avx2/avx512f/avx512_bf16/amx"])
    return (
        f"Machine: {info['cpu_model']} (flags: {flags}), {info['cpu_cores']} cores, {info['ram_gib']} GiB RAM; "
        f"device: {info['device']} ({where}); torch {info['torch']}, monai {info['monai']}, Python {info['python']}; "
        f"commit {info['git_commit']}; {info['date_utc']}; 1-min load average at start {info['loadavg_at_start'][0]}."
    )


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_json(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON at ``path`` (keys in their order), atomically; creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, obj, sort_keys=False)


def write_text(path: str | Path, text: str) -> Path:
    """``text`` at ``path``, atomically, ending in a newline; creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, text if text.endswith("\n") else text + "\n")


def write_results(stem: str | Path, report: Any, markdown: str) -> tuple[Path, Path]:
    """``<stem>.json`` (the report) and ``<stem>.md`` (its table), each atomically. ``stem`` has no suffix (a
    suffix it has is replaced)."""
    stem = Path(stem)
    return write_json(stem.with_suffix(".json"), report), write_text(stem.with_suffix(".md"), markdown)
