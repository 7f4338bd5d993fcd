"""benchmarks/gpu_suite.py --dry-run: every part of the GPU suite runs its code on the CPU at tiny sizes and
reports a result, so that the suite cannot rot between the rare sessions that have a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_reports_a_result_for_every_part(tmp_path):
    # a budget of 20 min instead of 9, so that the parts' time shares hold on a loaded machine too: the dry run takes
    # about 2.2 CPU-minutes in all, and took 8.1 min of wall time at load average 17 on a shared 2-core machine
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "GenerativeModels"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--dry-run", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--budget-min", "20"], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_dryrun_cpu.json").read_text())
    assert sorted(report["parts"]) == ["1", "2", "3", "4", "5", "6"]
    for key, part in report["parts"].items():
        errors = [f"{i['name']}: {i['error']}" for i in part["items"] if i.get("error")]
        assert part["status"] == "ok" and part["items"] and not errors, (key, errors)
    names = {i["name"] for p in report["parts"].values() for i in p["items"]}
    assert {"quickstart s1", "quickstart s2", "quickstart s2proj", "CUDA context", "maisi bf16",
            "ddpm-20", "ddim-2", "rflow-2"} <= names
    # the numbers each part exists for are there
    smoke = {i["name"]: i for i in report["parts"]["1"]["items"]}
    assert smoke["quickstart s1"]["peak_mib"] > 0 and smoke["quickstart s1"]["s_per_step"] > 0
    step = {i["name"]: i for i in report["parts"]["2"]["items"]}
    assert step["core-4x fp32"]["memory_ratio"] == 1.0 and step["8x bf16"]["time_ratio"] > 0
    exact = next(i for i in report["parts"]["3"]["items"] if i["name"].startswith("exactness"))
    assert exact["max_rel_error"] < 1e-4
    quality = next(i for i in report["parts"]["4"]["items"] if i["name"].startswith("evaluate"))
    assert 0 <= quality["evaluation"]["samples_vs_recon"]["c2st_accuracy"] <= 1
    stage1 = next(i for i in report["parts"]["4"]["items"] if i["name"].startswith("stage1"))
    assert stage1["stopped_by_sigterm"] and stage1["global_step"] >= 1  # stopped by the suite, saved by the app
    vs = {i["name"]: i for i in report["parts"]["6"]["items"]}  # vs_maisi.py's dry run, its rows as items
    assert vs["vs_maisi 3: ours tiles 32^3"]["exact"] and vs["vs_maisi 1: maisi fp32"]["memory_ratio"] == 1.0
    # the files: JSON, Markdown, log and the picture grid in --out; nothing in benchmarks/results
    assert sorted(p.name for p in out.iterdir()) == ["gpu_dryrun_cpu.json", "gpu_dryrun_cpu.log",
                                                     "gpu_dryrun_cpu.md", "gpu_dryrun_cpu_quality.png"]
    assert not list((REPO / "benchmarks" / "results").glob("gpu_dryrun*"))
    md = (out / "gpu_dryrun_cpu.md").read_text()
    assert "## 5. Sampling time per volume" in md and "Machine:" in md
    assert str(out / "gpu_dryrun_cpu.json") in proc.stdout  # it says where everything went


def test_without_cuda_the_real_run_refuses_in_one_line(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the real run would start")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "GenerativeModels"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: no CUDA device is visible to PyTorch; use --dry-run to check the suite on a CPU"]
    assert not any(tmp_path.iterdir())
