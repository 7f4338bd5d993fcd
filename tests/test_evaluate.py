"""Evaluation metrics on cases whose answer is known, the report files, and the command line's bad-input errors."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.layers import GaussianFilter
from PIL import Image

from monai_diffusion import evaluation as E
from monai_diffusion.cli import evaluate_main


def blobs(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """``n`` volumes of 3-5 random Gaussian blobs of random size and brightness, values in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    out = torch.zeros(n, 1, *shape)
    for i in range(n):
        v = torch.zeros(shape)
        for _ in range(int(torch.randint(3, 6, (1,), generator=g))):
            center = torch.rand(len(shape), generator=g) * 1.2 - 0.6
            radius = float(torch.rand(1, generator=g)) * 0.25 + 0.15
            level = float(torch.rand(1, generator=g)) * 0.6 + 0.4
            dist2 = sum((ax - center[k]) ** 2 for k, ax in enumerate(axes))
            v = torch.maximum(v, level * torch.exp(-dist2 / (2 * radius**2)))
        out[i, 0] = v
    return out


def corrupt(x: torch.Tensor, seed: int, sigma: float = 1.0, noise: float = 0.05) -> torch.Tensor:
    """A blurred and noisy copy."""
    g = torch.Generator().manual_seed(seed)
    return GaussianFilter(x.ndim - 2, sigma)(x) + noise * torch.randn(x.shape, generator=g)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The C2ST classifier is tiny: one thread is faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sets_2d():
    real, other = blobs(32, (32, 32), 1), blobs(32, (32, 32), 2)
    return real, other, corrupt(other, 3)


# ------------------------------------------------------------------------------------- metrics


def test_reconstruction_metrics_identical_and_known_psnr():
    x = blobs(3, (16, 16, 16), 0)
    same = E.reconstruction_metrics(x, x.clone())
    assert same["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert same["ms_ssim"] == pytest.approx(1.0, abs=1e-5)
    assert same["l1"] == 0.0
    assert math.isinf(same["psnr"])
    noisy = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    got = E.reconstruction_metrics(x, noisy)
    mse = ((noisy - x) ** 2).flatten(1).mean(1)
    assert got["per_volume"]["psnr"] == pytest.approx((-10 * torch.log10(mse)).tolist(), rel=1e-4)
    assert got["l1"] == pytest.approx(float((noisy - x).abs().mean()), rel=1e-5)
    assert got["ssim"] < 0.9 and got["ms_ssim"] < 1.0
    with pytest.raises(E.EvaluateError, match="same shape"):
        E.reconstruction_metrics(x, x[:2])


@pytest.mark.parametrize("shape", [(16, 16, 16), (24, 24, 24), (32, 32), (40, 40, 8), (3, 3)])
def test_ms_ssim_settings_are_valid_for_small_volumes(shape):
    from monai.metrics import MultiScaleSSIMMetric

    s = E.ms_ssim_settings(shape)
    assert sum(s["weights"]) == pytest.approx(1.0) and len(s["weights"]) == s["scales"]
    x = torch.rand(2, 1, *shape, generator=torch.Generator().manual_seed(0))
    metric = MultiScaleSSIMMetric(len(shape), kernel_size=s["kernel_size"], kernel_sigma=s["kernel_sigma"], weights=s["weights"])
    assert float(metric(x, x).mean()) == pytest.approx(1.0, abs=1e-5)
    assert float(metric(x, x.flip(0)).mean()) < 0.9


def test_histogram_w1_of_a_shift_is_shift_over_range(sets_2d):
    real = sets_2d[0]
    span = float(real.max() - real.min())
    assert E.histogram_w1(real, real) == 0.0
    assert E.histogram_w1(real, real + 0.07) == pytest.approx(0.07 / span, rel=1e-4)
    assert E.histogram_w1(real, real - 0.2) == pytest.approx(0.2 / span, rel=1e-4)


def test_nn_ratio_is_zero_for_copies_and_near_one_for_new_draws(sets_2d):
    real, other, _ = sets_2d
    copies = E.nn_ratio(real, real[:5])
    assert copies["mean"] == 0.0 and copies["min"] == 0.0
    assert copies["nearest_real"] == [0, 1, 2, 3, 4]
    fresh = E.nn_ratio(real, other)
    assert 0.5 < fresh["mean"] < 2.0 and fresh["min"] > 0.0


def test_ms_ssim_diversity(sets_2d):
    real = sets_2d[0]
    assert E.ms_ssim_diversity(real[:1].repeat(4, 1, 1, 1)) == pytest.approx(1.0, abs=1e-5)
    div = E.ms_ssim_diversity(real)
    assert 0.0 < div < 0.9


def test_mmd_and_c2st_known_cases_2d(sets_2d):
    real, other, bad = sets_2d
    mmd_same, mmd_bad = E.mmd(real, other), E.mmd(real, bad)
    assert mmd_bad > 5 * abs(mmd_same)
    same = E.c2st_accuracy(real, other, seed=0)
    assert same["accuracy"] <= 0.7
    assert (same["train_per_set"], same["test_per_set"], same["seed"]) == (16, 16, 0)
    assert E.c2st_accuracy(real, bad, seed=0)["accuracy"] >= 0.9
    quick = E.C2STSettings(epochs=3)
    first = E.c2st_accuracy(real[:8], bad[:8], seed=5, settings=quick)
    assert E.c2st_accuracy(real[:8], bad[:8], seed=5, settings=quick) == first  # deterministic for a seed


def test_mmd_and_c2st_known_cases_3d():
    real, other = blobs(24, (16, 16, 16), 4), blobs(24, (16, 16, 16), 5)
    bad = corrupt(other, 6, noise=0.08)
    assert E.mmd(real, bad) > 5 * abs(E.mmd(real, other))
    cfg = E.C2STSettings(epochs=20)
    assert E.c2st_accuracy(real, other, seed=1, settings=cfg)["accuracy"] <= 0.7
    assert E.c2st_accuracy(real, bad, seed=1, settings=cfg)["accuracy"] >= 0.9


def test_c2st_needs_enough_volumes():
    x = blobs(7, (16, 16), 0)
    assert E.c2st_min_count() == 8
    with pytest.raises(E.EvaluateError, match=r"at least 8 volumes in each set.*got 7 in real and 7 in samples"):
        E.c2st_accuracy(x, x)


def test_fid_from_local_files_only(tmp_path, sets_2d):
    from monai.networks.nets import ResNet

    real, bad = sets_2d[0][:8], sets_2d[2][:8]
    with pytest.raises(E.EvaluateError, match="not found.*nothing is downloaded"):
        E.load_feature_extractor(tmp_path / "missing.pt")
    torch.manual_seed(0)
    net = ResNet("basic", [1, 1, 1, 1], [4, 8, 8, 16], spatial_dims=2, n_input_channels=1, feed_forward=False,
                 shortcut_type="B", bias_downsample=False)  # a resnet10 layout, narrow so that FID stays cheap
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "resnet.pth")
    extractor = E.load_feature_extractor(tmp_path / "resnet.pth")
    assert E.fid(real, real, extractor) == pytest.approx(0.0, abs=1e-3)
    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU()))
    scripted.save(str(tmp_path / "features.pt"))
    extractor = E.load_feature_extractor(tmp_path / "features.pt")
    assert E.fid(real, bad, extractor) > E.fid(real, real, extractor)


def test_compare_sets_with_perfect_reconstructions(sets_2d):
    real, other, _ = sets_2d
    report = E.compare_sets(real[:8], other[:8] + 2.0, recon=real[:8].clone(), c2st=E.C2STSettings(epochs=0))
    rec = report["recon_vs_real"]
    assert rec["nn_ratio"] == 0.0 and rec["histogram_w1"] == 0.0 and rec["reconstruction"]["l1"] == 0.0
    assert rec["c2st_accuracy"] is None and report["settings"]["c2st"]["epochs"] == 0
    assert report["samples"]["fraction_outside_real_range"] > 0.99 and report["samples"]["min"] > 1.9
    assert report["samples_vs_recon"]["histogram_w1"] == pytest.approx(report["samples_vs_real"]["histogram_w1"])
    with pytest.raises(E.EvaluateError, match=r"reconstructions \(3 volumes .*must pair up with real \(8 volumes"):
        E.compare_sets(real[:8], other[:8], recon=real[:3])


# ------------------------------------------------------------------------------------- folders


def _write_nifti(folder, volumes, prefix="vol"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, v in enumerate(volumes):
        nib.save(nib.Nifti1Image(v[0].numpy(), np.diag([1.5, 1.5, 2.0, 1.0])), str(folder / f"{prefix}_{i:03d}.nii.gz"))
    return folder


def _write_png(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, v in enumerate(images):
        Image.fromarray((v[0].clamp(0, 1).numpy().T * 255).round().astype(np.uint8)).save(folder / f"img_{i:03d}.png")
    return folder


def test_load_volume_folder_nifti_and_png(tmp_path):
    x = blobs(3, (8, 9, 10), 0)
    folder = _write_nifti(tmp_path / "nii", x)
    Image.new("L", (4, 4)).save(folder / "vol_000.png")  # a preview next to a sample: ignored
    volumes, meta = E.load_volume_folder(folder)
    assert torch.equal(volumes, x)
    assert meta["count"] == 3 and meta["shape"] == [1, 8, 9, 10] and meta["spacing"] == [1.5, 1.5, 2.0]
    assert meta["ignored"] == ["vol_000.png"]
    images = blobs(2, (12, 10), 1)
    volumes, meta = E.load_volume_folder(_write_png(tmp_path / "png", images))
    assert volumes.shape == (2, 1, 12, 10)
    assert torch.allclose(volumes, images.clamp(0, 1), atol=1 / 255)


def test_load_volume_folder_errors(tmp_path):
    with pytest.raises(E.EvaluateError, match="does not exist"):
        E.load_volume_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(E.EvaluateError, match=r"samples folder .*empty' holds 0 volumes \(1 file"):
        E.load_volume_folder(tmp_path / "empty", what="samples")
    mixed = _write_nifti(tmp_path / "mixed", blobs(2, (8, 8, 8), 0))
    _write_nifti(mixed, blobs(1, (8, 8, 6), 0), prefix="z")
    with pytest.raises(E.EvaluateError, match=r"its 3 volumes differ in shape: 2 of shape .*\[1, 8, 8, 8\].*1 of shape"):
        E.load_volume_folder(mixed)


# ------------------------------------------------------------------------------------- reports and CLI


def test_cli_writes_report_and_refuses_to_overwrite(tmp_path, capsys):
    real, other = blobs(8, (16, 16, 16), 7), blobs(8, (16, 16, 16), 8)
    _write_nifti(tmp_path / "real", real)
    _write_nifti(tmp_path / "samples", other)
    _write_nifti(tmp_path / "recon", GaussianFilter(3, 0.7)(real))
    out = tmp_path / "report.json"
    argv = ["--real", str(tmp_path / "real"), "--samples", str(tmp_path / "samples"), "--out", str(out)]
    assert evaluate_main([*argv, "--recon", str(tmp_path / "recon"), "--c2st-epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "c2st_accuracy" in printed and "report.png" in printed
    report = json.loads(out.read_text())
    assert report["real"]["count"] == 8 and report["samples"]["shape"] == [1, 16, 16, 16]
    for block in ("samples_vs_real", "samples_vs_recon", "recon_vs_real"):
        for key in ("mmd", "ms_ssim_diversity", "ms_ssim_diversity_real", "histogram_w1", "nn_ratio", "c2st_accuracy"):
            assert isinstance(report[block][key], float), (block, key)
    assert report["samples_vs_real"]["c2st"]["epochs"] == 2
    assert report["recon_vs_real"]["reconstruction"]["ssim"] > 0.5
    assert "| c2st_accuracy |" in out.with_suffix(".md").read_text()
    with Image.open(out.with_suffix(".png")) as png:
        assert png.size[0] > 3 * 16 * 4 and png.size[1] > 3 * 16
    before = out.read_bytes()
    assert evaluate_main([*argv, "--c2st-epochs", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "report.json" in err[0] and "already exists" in err[0]
    assert out.read_bytes() == before
    assert evaluate_main([*argv, "--c2st-epochs", "0", "--overwrite"]) == 0
    assert json.loads(out.read_text())["samples_vs_real"]["c2st_accuracy"] is None


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    real = _write_nifti(tmp_path / "real", blobs(8, (16, 16, 16), 0))
    (tmp_path / "empty").mkdir()
    out = ["--out", str(tmp_path / "r.json")]
    assert evaluate_main(["--real", str(real), "--samples", str(tmp_path / "empty"), *out]) == 2
    line = _one_error_line(capsys)
    assert "empty" in line and "0 volumes" in line

    small = _write_nifti(tmp_path / "small", blobs(8, (16, 16, 12), 1))
    assert evaluate_main(["--real", str(real), "--samples", str(small), *out]) == 2
    line = _one_error_line(capsys)
    assert "real" in line and "small" in line and "8 volumes" in line and "[1, 16, 16, 12]" in line

    few = _write_nifti(tmp_path / "few", blobs(5, (16, 16, 16), 2))
    assert evaluate_main(["--real", str(real), "--samples", str(few), *out]) == 2
    line = _one_error_line(capsys)
    assert "at least 8 volumes" in line and "got 8 in real folder" in line and "5 in samples folder" in line
    assert "few" in line

    assert evaluate_main(["--real", str(real), "--samples", str(few), "--c2st-epochs", "0", "--fid-weights", str(tmp_path / "w.pt"), *out]) == 2
    assert "w.pt" in _one_error_line(capsys)
    with pytest.raises(SystemExit) as exc:
        evaluate_main(["--real", str(real)])
    assert exc.value.code == 2
    assert "--samples" in _one_error_line(capsys)
    assert not (tmp_path / "r.json").exists()


def test_write_report_refuses_existing_files(tmp_path):
    x = blobs(2, (16, 16), 0)
    report = {"real": {"count": 2}, "samples": {"count": 2}, "samples_vs_real": {"mmd": 0.1, "c2st_accuracy": float("nan")}}
    written = E.write_report(report, tmp_path / "r.json", real=x, samples=x)
    assert sorted(p.name for p in written) == ["r.json", "r.md", "r.png"]
    assert json.loads((tmp_path / "r.json").read_text())["samples_vs_real"]["c2st_accuracy"] is None
    (tmp_path / "q.md").write_text("mine")
    with pytest.raises(E.EvaluateError, match=r"q\.md.*already exists"):
        E.write_report(report, tmp_path / "q.json", real=x, samples=x)
    assert (tmp_path / "q.md").read_text() == "mine" and not (tmp_path / "q.json").exists()
    assert not list(tmp_path.glob(".*tmp"))


def test_unbiased_mmd_is_monais_estimator_and_takes_sets_of_different_sizes(sets_2d):
    from monai.metrics import MMDMetric

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 2, 5, 5, generator=g), torch.randn(6, 2, 5, 5, generator=g) + 0.3
    assert E.unbiased_mmd(x, y).item() == pytest.approx(MMDMetric()(x, y).item(), rel=1e-6)
    # unequal sizes: the same formula, checked against the pairwise definition
    z = y[:4]
    k = lambda a, b: float((a.flatten() * b.flatten()).sum())  # noqa: E731
    within = lambda s: sum(k(s[i], s[j]) for i in range(len(s)) for j in range(len(s)) if i != j) / (len(s) * (len(s) - 1))  # noqa: E731
    expected = within(x) + within(z) - 2 * sum(k(a, b) for a in x for b in z) / (len(x) * len(z))
    assert E.unbiased_mmd(x, z).item() == pytest.approx(expected, rel=1e-5)
    real, other, _ = sets_2d
    report = E.compare_sets(real, other[:10], c2st=E.C2STSettings(epochs=2))  # 16 real volumes, 10 samples
    assert math.isfinite(report["samples_vs_real"]["mmd"])
