"""benchmarks/vs_maisi.py: its dry run measures every part at tiny sizes and writes a complete report, and the exact
tiled decode's bound is enforced (a decode that exceeds it is an error row)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "vs_maisi.py"


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "GenerativeModels"), env.get("PYTHONPATH", "")])
    return env


def test_dry_run_report(tmp_path):
    stem = tmp_path / "out" / "vs"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(stem), "--work", str(tmp_path / "w")],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(stem.with_suffix(".json").read_text())
    assert sorted(report["parts"]) == ["1", "2", "3"] and report["dry_run"]
    errors = [(k, r) for k, p in report["parts"].items() for r in p["rows"] if r.get("error")]
    assert not errors, errors
    step = {r["key"]: r for r in report["parts"]["1"]["rows"]}
    assert set(step) == {"maisi fp32", "maisi bf16", "8x-lat32 fp32", "8x-lat32 bf16"}
    assert step["maisi fp32"]["memory_ratio"] == 1.0 and step["maisi bf16"]["time_ratio"] == 1.0
    assert step["8x-lat32 fp32"]["latent_values"] == step["maisi fp32"]["latent_values"]  # the equal-latent pair
    assert all(r["peak_mib"] > 0 and r["step_s"] > 0 for r in step.values())
    train = {r["key"]: r for r in report["parts"]["2"]["rows"]}
    assert train["data"]["num_val"] >= 8  # the C2ST needs 4 + 4 per set
    for name in ("maisi", "8x-lat32"):
        for snap in ("at_time", "at_steps"):
            q = train[name][snap]
            assert math.isfinite(q["psnr"]) and 0 <= q["c2st_recon_vs_real"] <= 1 and q["w1_recon_vs_real"] >= 0
            assert q["steps"] >= 1
        assert train[name]["at_steps"]["steps"] == report["parts"]["2"]["equal_steps"] == 2  # the dry run's count
    decode = {(r["model"], r["mode"]): r for r in report["parts"]["3"]["rows"]}
    assert set(decode) == {("ours", "whole"), ("ours", "tiles"), ("maisi", "whole"), ("maisi", "sliding")}
    assert decode["ours", "tiles"]["exact"] and decode["ours", "tiles"]["max_dev"] <= 1e-4
    assert decode["maisi", "sliding"]["max_dev"] > 1e-4  # its windows' GroupNorm statistics and borders differ
    assert all(r["peak_mib"] > 0 and r["seconds"] > 0 for r in decode.values())
    md = stem.with_suffix(".md").read_text()
    for heading in ("## 1. Training cost", "## 2. Reconstruction", "## 3. Large-volume decode", "Machine:"):
        assert heading in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert stem.with_suffix(".png").stat().st_size > 10_000
    else:  # the README's install has no matplotlib: the tables stand alone and the run says why there is no picture
        assert not stem.with_suffix(".png").exists() and "matplotlib is not installed" in proc.stdout


def test_tiled_decode_beyond_its_bound_is_an_error_row(tmp_path):
    common = {"job": "decode", "model": "ours", "size": [32, 32, 32], "width": "tiny", "device": "cpu", "dry": True,
              "ref": str(tmp_path / "ref.pt")}
    jobs = [{**common, "key": "whole", "mode": "whole"},
            {**common, "key": "tiles", "mode": "tiles", "exact_bound": 1e-12}]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--worker", json.dumps(jobs)], capture_output=True,
                          text=True, env=_env(), cwd=REPO, timeout=600)
    rows = {r["key"]: r for r in (json.loads(ln[7:]) for ln in proc.stdout.splitlines() if ln.startswith("VS-ROW "))}
    assert proc.returncode == 0 and set(rows) == {"whole", "tiles"}, proc.stderr[-2000:]
    assert 0 < rows["tiles"]["max_dev"] <= 1e-4  # exact to fp32 rounding, but not bit-identical
    assert rows["tiles"]["exact"] is False and "deviates by" in rows["tiles"]["error"]


def test_sizes_that_maisi_cannot_split_are_refused_up_front():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--size", "32", "32", "32"], capture_output=True, text=True,
                          env=_env(), cwd=REPO, timeout=60)
    assert proc.returncode == 2 and "--size [32, 32, 32]" in proc.stderr and "second at least 48" in proc.stderr
