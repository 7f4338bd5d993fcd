"""The Python API (issue 21): ``DiffusionPipeline`` opened from a tiny trained run generates exactly what the CLI's
``generate_samples`` writes (one sampling path), encodes and decodes (exact tiles), saves like the CLI, refuses wrong
arguments with a ``ValueError`` naming them; ``evaluate_sets`` gives ``evaluate``'s report; the code blocks of
``docs/python_api.md`` run as written against the run; ``import monai_diffusion`` stays light."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, error_line, tiny_run_args

from monai_diffusion.cli import generate_samples_main, train_autoencoder_main, train_diffusion_main

DOC = REPO / "monai_diffusion" / "docs" / "python_api.md"


def _args(root: Path, *extra: str) -> list[str]:
    return tiny_run_args(
        root,
        f"autoencoder.checkpoints.output_dir={root / 'autoencoder'}",
        f"diffusion.checkpoints.autoencoder_path={root / 'autoencoder' / 'best_model.pt'}",
        f"diffusion.checkpoints.output_dir={root / 'diffusion'}",
        "diffusion.scheduler.num_train_timesteps=40",  # the doc samples with 30 steps
        "sampling.num_samples=3",
        # the default execution (SDPA attention), which from_checkpoints uses too, not the quickstart's explicit one
        "autoencoder.use_flash_attention=true",
        "diffusion.use_flash_attention=true",
        *extra,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder laid out as the quickstart's: ``autoencoder/``, ``diffusion/``, ``synthetic_data/``."""
    root = tmp_path_factory.mktemp("api_run")
    assert train_autoencoder_main(_args(root)) == 0
    assert train_diffusion_main(_args(root)) == 0
    return root


def test_generate_is_what_the_cli_writes(run, tmp_path):
    from monai.data import MetaTensor

    from monai_diffusion import DiffusionPipeline

    out = tmp_path / "cli"
    assert generate_samples_main(_args(run, f"sampling.output_dir={out}", "sampling.seed=7")) == 0
    pipe = DiffusionPipeline.from_run(run)
    x = pipe.generate(3, seed=7, progress=False)  # the run's sampling settings: 2 steps, batch 2
    assert isinstance(x, MetaTensor) and tuple(x.shape) == (3, 1, 16, 16, 16)
    for i in range(3):
        image = nib.load(str(out / f"sample_{i:04d}.nii.gz"))
        assert np.array_equal(np.asarray(image.dataobj), x[i, 0].numpy())
        assert np.allclose(image.affine, x.affine.numpy())
    # another batch size changes the noise draw of samples 1 and 2, not of sample 0 (up to batched float rounding)
    y = pipe.generate(3, seed=7, batch_size=1, progress=False)
    assert torch.allclose(y[0], x[0], atol=1e-5) and not torch.allclose(y[1], x[1], atol=1e-3)
    # from_checkpoints (the CLI's defaults, not the run's) with the same overrides: the same numbers
    other = DiffusionPipeline.from_checkpoints(diffusion=run / "diffusion" / "best_model.pt",
                                               autoencoder=run / "autoencoder" / "best_model.pt").to("cpu")
    z = other.generate(3, seed=7, num_inference_steps=2, batch_size=2, progress=False)
    assert torch.equal(z.as_tensor(), x.as_tensor())


def test_encode_decode_and_save(run, tmp_path):
    from monai_diffusion import DiffusionPipeline

    pipe = DiffusionPipeline.from_run(run)
    files = sorted(str(p) for p in (run / "synthetic_data").glob("train_*.nii.gz"))
    z = pipe.encode(files)
    assert tuple(z.shape) == (2, *pipe.checkpoint["latent_shape"])
    assert torch.allclose(pipe.encode(files[0]), z[:1], atol=1e-5)
    whole = pipe.decode(z)
    tiled = pipe.decode(z, tile_size=(8, 8, 8))
    assert tuple(whole.shape) == (2, 1, 16, 16, 16)
    assert float((whole - tiled).abs().max()) < 1e-4
    # a tensor input goes through the same encoder
    assert torch.equal(pipe.encode(whole.as_tensor()), pipe.encode(whole))
    written = pipe.save(whole, tmp_path / "out")
    assert [p.name for p in written] == ["sample_0000.nii.gz", "sample_0000.png", "sample_0001.nii.gz",
                                         "sample_0001.png"]
    assert np.allclose(nib.load(str(written[0])).affine, whole.affine.numpy())
    again = pipe.save(whole[0], tmp_path / "out")  # numbered after, nothing replaced
    assert again[0].name == "sample_0002.nii.gz"


@pytest.mark.parametrize("kwargs, name", [
    ({"scheduler": "rflow"}, "scheduler"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 41}, "num_inference_steps"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"class_label": 0}, "class_label"),
    ({"covariates": [1.0]}, "covariates"),
    ({"tile_size": (3, 8, 8)}, "tile_size"),
    ({"tile_size": (8, 8)}, "tile_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"seed": -1}, "seed"),
    ({"condition": torch.zeros(1, 16, 16)}, "condition"),
])
def test_wrong_arguments_are_value_errors_naming_them(run, kwargs, name):
    from monai_diffusion import DiffusionPipeline

    pipe = DiffusionPipeline.from_run(run)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        pipe.generate(1, progress=False, **kwargs)


def test_wrong_inputs_of_the_other_calls(run, tmp_path):
    from monai_diffusion import DiffusionPipeline

    with pytest.raises(ValueError, match="run_dir"):
        DiffusionPipeline.from_run(tmp_path)
    pipe = DiffusionPipeline.from_run(run)
    with pytest.raises(ValueError, match="volumes"):
        pipe.encode(torch.zeros(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="z:"):
        pipe.decode(torch.zeros(1, 3, 8, 8, 8))
    with pytest.raises(ValueError, match="dtype"):
        pipe.to("cpu", torch.int64)
    with pytest.raises(ValueError, match="save_format"):
        pipe.save(torch.zeros(1, 1, 16, 16, 16), tmp_path, save_format="jpeg")


def test_evaluate_sets_is_the_evaluate_report(run, tmp_path):
    from monai_diffusion import DiffusionPipeline, evaluate_sets
    from monai_diffusion.evaluation import C2STSettings, compare_sets, load_volume_folder

    pipe = DiffusionPipeline.from_run(run)
    pipe.save(pipe.generate(3, seed=1, progress=False), tmp_path / "s")
    report = evaluate_sets(run / "synthetic_data", tmp_path / "s", c2st_epochs=0)
    real, real_meta = load_volume_folder(run / "synthetic_data", what="real")
    samples, samples_meta = load_volume_folder(tmp_path / "s", what="samples")
    expected = compare_sets(real, samples, c2st=C2STSettings(epochs=0),
                            meta={"real": real_meta, "samples": samples_meta})
    assert report["samples_vs_real"] == expected["samples_vs_real"]
    assert evaluate_sets(real, samples, c2st_epochs=0)["samples_vs_real"] == expected["samples_vs_real"]
    with pytest.raises(ValueError, match="samples"):
        evaluate_sets(real, [1, 2, 3])


def test_the_docs_code_runs(run, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 3 and blocks[0].startswith("RUN = ")
    scope: dict = {}
    exec(f"RUN = {str(run)!r}\n", scope)
    for block in blocks[1:]:
        exec(compile(block, str(DOC), "exec"), scope)
    assert tuple(scope["x"].shape) == (4, 1, 16, 16, 16)
    assert float((scope["y"] - scope["y_tiled"]).abs().max()) < 1e-4
    assert len(list((run / "python_samples").glob("*.nii.gz"))) == 4
    assert "mmd" in scope["report"]["samples_vs_real"]


def test_import_stays_light():
    code = ("import sys, monai_diffusion; assert 'torch' not in sys.modules, 'torch'; "
            "assert 'monai_diffusion.pipeline' not in sys.modules; "
            "from monai_diffusion import DiffusionPipeline, evaluate_sets; print(DiffusionPipeline.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "monai_diffusion.pipeline"
    import monai_diffusion

    with pytest.raises(AttributeError):
        monai_diffusion.NoSuchThing  # noqa: B018


# ---------------------------------------------------------------------------------------- memory before sampling
def _limit(monkeypatch, mib: float) -> None:
    from monai_diffusion import pipeline
    from monai_diffusion.memory import MIB

    monkeypatch.setattr(pipeline, "available_bytes", lambda device: (int(mib * MIB), "a test limit"))


def test_sampling_memory_estimate_grows_with_the_batch_and_shrinks_with_tiles(run):
    from monai_diffusion import DiffusionPipeline
    from monai_diffusion.memory import MARGIN

    sampler = DiffusionPipeline.from_run(run).sampler()
    one, four = sampler.estimate_batch(1), sampler.estimate_batch(4)
    tiled = sampler.estimate_batch(4, (8, 8, 8))
    assert 0 < one["peak_mib"] < four["peak_mib"] and tiled["peak_mib"] < four["peak_mib"]
    assert one["weights_mib"] == four["weights_mib"] > 0 and four["peak_mib"] > four["weights_mib"]
    factor, extra = MARGIN["cpu"]
    assert four["need_mib"] == pytest.approx((four["peak_mib"] - four["weights_mib"]) * factor + extra)
    # the estimate allocates nothing and leaves the sampler as it was: it still samples its full schedule
    assert len(sampler.scheduler.timesteps) == sampler.steps


def test_sampling_that_will_not_fit_stops_before_any_sample_with_what_would_fit(run, tmp_path, monkeypatch, capsys):
    from monai_diffusion import DiffusionPipeline

    sampler = DiffusionPipeline.from_run(run).sampler()
    one, two = sampler.estimate_batch(1)["need_mib"], sampler.estimate_batch(2)["need_mib"]
    _limit(monkeypatch, (one + two) / 2)  # batch 1 fits, the run's batch of 2 does not
    out = tmp_path / "samples"
    line = error_line(capsys, generate_samples_main(_args(run, f"sampling.output_dir={out}")))
    assert "sampling batch (2 volume(s) of 16x16x16) needs about" in line and "(a test limit)" in line
    assert "--set sampling.batch_size=1" in line and "device.memory_check=false" in line
    assert not list(out.glob("sample_*"))
    # the same limit, the suggested batch: it fits and says so
    assert generate_samples_main(_args(run, f"sampling.output_dir={out}", "sampling.batch_size=1")) == 0
    assert "GiB estimated for one sampling batch (1 volume(s) of 16x16x16)" in capsys.readouterr().out
    assert len(list(out.glob("sample_*.nii.gz"))) == 3
    # not even one volume fits whole: exact tiles are suggested, the largest that fits
    tile = sampler.estimate_batch(1, (8, 16, 16))["need_mib"]
    _limit(monkeypatch, (tile + one) / 2)
    line = error_line(capsys, generate_samples_main(_args(run, f"sampling.output_dir={out}")))
    assert "--set sampling.batch_size=1 --set sampling.tile_size=[" in line
    # the check turned off: samples (and the Python API raises the same error, a RunError)
    assert generate_samples_main(_args(run, f"sampling.output_dir={out}", "device.memory_check=false")) == 0
    from monai_diffusion.errors import OutOfMemory

    with pytest.raises(OutOfMemory, match="sampling batch"):
        DiffusionPipeline.from_run(run).generate(2, progress=False)


def test_evaluate_checks_sampling_memory_before_it_loads_anything(run, tmp_path, monkeypatch, capsys):
    from monai_diffusion.cli import evaluate_main

    _limit(monkeypatch, 1)
    report = tmp_path / "report.json"
    line = error_line(capsys, evaluate_main([*_args(run), "--out", str(report)]))
    assert "sampling batch" in line and not report.exists()
