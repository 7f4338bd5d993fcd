"""The Fréchet Radiomics Distance in ``evaluate``: known cases (a set against itself, against ever more degraded
copies), its place in the report, and what the report says when the optional ``frd-score`` is not installed."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from monai.networks.layers import GaussianFilter

from monai_diffusion.errors import EvaluateError
from monai_diffusion.evaluation import compare_sets, write_report
from monai_diffusion.evaluation.frd import FRD_INSTALL, frd, frd_missing


def blobs(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """``n`` images/volumes of 2-4 random Gaussian blobs plus a little noise, values about [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    out = torch.zeros(n, 1, *shape)
    for i in range(n):
        v = torch.zeros(shape)
        for _ in range(int(torch.randint(2, 5, (1,), generator=g))):
            center = torch.rand(len(shape), generator=g) * 1.2 - 0.6
            radius = float(torch.rand(1, generator=g)) * 0.25 + 0.15
            level = float(torch.rand(1, generator=g)) * 0.6 + 0.4
            dist2 = sum((ax - center[k]) ** 2 for k, ax in enumerate(axes))
            v = torch.maximum(v, level * torch.exp(-dist2 / (2 * radius**2)))
        out[i, 0] = v + 0.02 * torch.randn(shape, generator=g)
    return out


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return GaussianFilter(x.ndim - 2, sigma)(x)


def noisy(x: torch.Tensor, sigma: float, seed: int = 5) -> torch.Tensor:
    return x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def without_frd(monkeypatch):
    """As if ``frd-score`` were not installed (a ``None`` in ``sys.modules`` makes its import fail)."""
    monkeypatch.setitem(sys.modules, "frd_score", None)


# ------------------------------------------------------------------------------ without the optional package
def test_report_without_frd_says_how_to_install(without_frd, tmp_path):
    assert frd_missing() is not None and FRD_INSTALL in frd_missing()
    real, samples = blobs(4, (16, 16), 1), blobs(4, (16, 16), 2)
    recon = blur(real, 1.0)
    report = compare_sets(real, samples, recon=recon, c2st=_no_c2st())
    note = report["settings"]["frd"]
    assert note.startswith("not installed") and 'pip install -e ".[frd]"' in note
    assert report["samples_vs_real"]["frd"] is None and report["recon_vs_real"]["frd"] is None
    assert "frd" not in report["samples_vs_recon"]
    written = write_report(report, tmp_path / "r.json", real=real, recon=recon, samples=samples)
    md = (tmp_path / "r.md").read_text()
    assert f"- FRD: {note}" in md and "| frd | n/a |" in md
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["frd"] == note
    assert len(written) == 3
    # asked for explicitly, its absence is an error that says how to install it, before any metric is computed
    with pytest.raises(EvaluateError, match=r"FRD was asked for but is not installed .*pip install"):
        compare_sets(real, samples, c2st=_no_c2st(), frd=True)
    with pytest.raises(EvaluateError, match="FRD is not installed"):
        frd(real, samples)


def test_frd_skipped_on_request():
    real, samples = blobs(4, (16, 16), 1), blobs(4, (16, 16), 2)
    report = compare_sets(real, samples, c2st=_no_c2st(), frd=False)
    assert report["settings"]["frd"] == "skipped" and report["samples_vs_real"]["frd"] is None


def _no_c2st():
    from monai_diffusion.evaluation import C2STSettings

    return C2STSettings(epochs=0)


# ------------------------------------------------------------------------------ with it (skipped where it is not)
def _need_frd():
    pytest.importorskip("frd_score")
    pytest.importorskip("radiomics")


def test_frd_2d_itself_zero_and_growing_with_degradation():
    _need_frd()
    real = blobs(8, (32, 32), 1)
    same = frd(real, real.clone(), workers=2)
    blurred = [frd(real, blur(real, s), workers=2) for s in (0.5, 1.0, 2.0)]
    noised = [frd(real, noisy(real, s), workers=2) for s in (0.02, 0.1)]
    # d² of a set against itself is 0 up to the rounding of the matrix square root of singular covariances (more
    # features than images): ln d² is -inf or far below every degraded copy's
    smallest = min(r["squared_distance"] for r in blurred + noised)
    assert same["squared_distance"] < 1.0 and same["squared_distance"] < 1e-2 * smallest
    for chain in (blurred, noised):
        values = [r["value"] for r in chain]
        assert all(math.isfinite(v) for v in values), values
        assert values == sorted(values) and values[-1] > values[0] + 1.0, values
        assert all(abs(math.log(r["squared_distance"]) - r["value"]) < 1e-6 for r in chain)  # one channel: ln d²


def test_frd_3d_itself_zero_degraded_clearly_more():
    _need_frd()
    real = blobs(6, (16, 16, 16), 3)
    same = frd(real, real.clone(), workers=2)
    degraded = frd(real, noisy(blur(real, 1.5), 0.1), workers=2)
    assert same["squared_distance"] < 1.0
    assert math.isfinite(degraded["value"]) and degraded["squared_distance"] > 100.0
    assert degraded["per_channel"] == [degraded["value"]] and degraded["seconds"] > 0


def test_frd_per_channel_mean():
    _need_frd()
    one = blobs(6, (24, 24), 4)
    two = torch.cat([one, one.flip(-1)], dim=1)  # the second channel is the mirror image
    res = frd(two, blur(two, 1.0), workers=2)
    assert len(res["per_channel"]) == 2
    assert res["value"] == pytest.approx(sum(res["per_channel"]) / 2)


def test_evaluate_report_has_frd(tmp_path):
    _need_frd()
    real, samples = blobs(8, (24, 24), 1), blobs(8, (24, 24), 2)
    recon = blur(real, 1.0)
    report = compare_sets(real, samples, recon=recon, c2st=_no_c2st())
    setting = report["settings"]["frd"]
    assert setting["version"] == "v1" and setting["frd_score"] and setting["pyradiomics"]
    for key in ("samples_vs_real", "recon_vs_real"):
        assert math.isfinite(report[key]["frd"]), key
        assert set(report[key]["frd_details"]) == {"squared_distance", "per_channel", "seconds"}
    assert "frd" not in report["samples_vs_recon"]
    # the same as the metric on its own (samples vs real: the real set is the reference), up to float32 features
    alone = frd(real, samples, workers=2)["value"]
    assert report["samples_vs_real"]["frd"] == pytest.approx(alone, rel=1e-3)
    write_report(report, tmp_path / "r.json", real=real, recon=recon, samples=samples)
    stored = json.loads((tmp_path / "r.json").read_text())
    assert stored["samples_vs_real"]["frd"] == pytest.approx(report["samples_vs_real"]["frd"])
    md = (tmp_path / "r.md").read_text()
    assert "- FRD: frd-score" in md and "| frd | " in md
    row = next(line for line in md.splitlines() if line.startswith("| frd |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["frd", f"{report['samples_vs_real']['frd']:.4g}", "n/a", f"{report['recon_vs_real']['frd']:.4g}"]


def test_cli_no_frd_and_the_printed_line(tmp_path, capsys):
    import numpy as np

    from monai_diffusion.cli import evaluate_main

    for name, x in (("real", blobs(4, (16, 16), 1)), ("samples", blobs(4, (16, 16), 2))):
        (tmp_path / name).mkdir()
        for i, v in enumerate(x):
            np.save(tmp_path / name / f"{i}.npy", v[0].numpy())
    argv = ["--real", str(tmp_path / "real"), "--samples", str(tmp_path / "samples"), "--c2st-epochs", "0"]
    assert evaluate_main([*argv, "--out", str(tmp_path / "a.json"), "--no-frd"]) == 0
    assert "FRD: skipped" in capsys.readouterr().out
    assert json.loads((tmp_path / "a.json").read_text())["settings"]["frd"] == "skipped"
    if frd_missing() is not None:  # without the package the command still works and says how to get it
        assert evaluate_main([*argv, "--out", str(tmp_path / "b.json")]) == 0
        assert f"FRD: {frd_missing()}" in capsys.readouterr().out
