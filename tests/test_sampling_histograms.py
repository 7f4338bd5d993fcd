"""benchmarks/sampling_histograms.py: its band split of the histogram W1 adds up to the W1 that ``evaluate``
reports, and the signed part says which set is brighter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import sampling_histograms as sh  # noqa: E402

from monai_diffusion.evaluation.metrics import histogram_w1  # noqa: E402


def test_bands_add_up_to_evaluates_w1_and_the_sign_says_brighter():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(6, 1, 8, 8, 8, generator=g) ** 2
    brighter = (real + 0.05 * torch.rand(6, 1, 8, 8, 8, generator=g)).clamp(0, 1)
    parts = sh.band_w1(sh.quantile_function(brighter), sh.quantile_function(real))
    bands = sum(parts[name] for _, _, name in sh.BANDS)
    assert bands == pytest.approx(parts["total"], rel=1e-9)
    assert parts["signed_mean"] > 0 and parts["total"] > 0.01
    assert parts["total"] == pytest.approx(histogram_w1(real, brighter), rel=0.05)
    same = sh.band_w1(sh.quantile_function(real), sh.quantile_function(real))
    assert same["total"] == 0.0


def test_missing_models_are_one_error_line(tmp_path, capsys):
    assert sh.main(["--work-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "best_model.pt is missing" in err[0]
