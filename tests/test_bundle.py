"""MONAI bundle export (issue 21): ``monai-diffusion-export-bundle`` writes configs/, models/ (no pickled code) and
docs/ of a tiny trained run, and MONAI's own bundle runner, in a fresh process, writes NIfTI samples with the data's
affine that are the CLI's samples of the same model and seed."""

from __future__ import annotations

import importlib.util
import json
import os
import pickletools
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, error_line, tiny_run_args

from monai_diffusion.cli import export_bundle_main, generate_samples_main, train_autoencoder_main, train_diffusion_main


def _args(root: Path, *extra: str) -> list[str]:
    return tiny_run_args(
        root,
        f"autoencoder.checkpoints.output_dir={root / 'autoencoder'}",
        f"diffusion.checkpoints.autoencoder_path={root / 'autoencoder' / 'best_model.pt'}",
        f"diffusion.checkpoints.output_dir={root / 'diffusion'}",
        "sampling.num_samples=3",
        "sampling.seed=5",
        *extra,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bundle_run")
    assert train_autoencoder_main(_args(root)) == 0
    assert train_diffusion_main(_args(root)) == 0
    (root / "evaluation.md").write_text("| | samples vs real |\n| --- | --- |\n| mmd | 0.123 |\n")
    return root


def _runner(config: Path, bundle: Path, out: Path, *extra: str) -> list[str]:
    """MONAI's bundle runner in a fresh interpreter: ``python -m monai.bundle run`` when its command-line helper
    (``fire``) is installed, else the same ``monai.bundle.run`` function called directly."""
    overrides = {"bundle_root": str(bundle), "output_dir": str(out), **dict(zip(extra[::2], extra[1::2]))}
    if importlib.util.find_spec("fire") is not None:
        flags = [item for key, value in overrides.items() for item in (f"--{key}", value)]
        return [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config), *flags]
    kwargs = ", ".join(f"{k}={v!r}" if k in ("bundle_root", "output_dir") else f"{k}={v}"
                       for k, v in overrides.items())
    return [sys.executable, "-c", f"import monai.bundle; monai.bundle.run(config_file={str(config)!r}, {kwargs})"]


def test_exported_bundle_runs_under_monai(run, tmp_path):
    bundle = tmp_path / "bundle"
    assert export_bundle_main(["--run", str(run), "--out", str(bundle)]) == 0
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["data"]["shape"] == [16, 16, 16] and meta["data"]["spacing"] is not None
    assert meta["monai_version"] and meta["pytorch_version"] and "UNet" in meta["description"]
    assert "intensity_window" in meta["data"]
    readme = (bundle / "docs" / "README.md").read_text()
    assert "| mmd | 0.123 |" in readme and "monai.bundle run" in readme
    weights = sorted(p.name for p in (bundle / "models").iterdir())
    suffix = ".safetensors" if importlib.util.find_spec("safetensors") is not None else ".pt"
    assert weights == ["autoencoder" + suffix, "diffusion.json", "unet" + suffix]
    for path in (bundle / "models").glob("*.pt"):  # weights-only files: no GLOBAL opcode other than torch's own
        import zipfile

        with zipfile.ZipFile(path) as z:
            data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        globals_ = [arg for op, arg, _ in pickletools.genops(data) if op.name in ("GLOBAL", "STACK_GLOBAL")]
        assert all(str(g).startswith(("torch", "collections OrderedDict")) for g in globals_ if g), globals_

    cli_out = tmp_path / "cli"
    assert generate_samples_main(_args(run, f"sampling.output_dir={cli_out}")) == 0
    out = tmp_path / "bundle_samples"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "GenerativeModels"),
                                                        os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(_runner(bundle / "configs" / "inference.json", bundle, out, "num_samples", "3", "seed",
                                    "5", "device", "'cpu'"),
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for i in range(3):
        ours, cli = nib.load(str(out / f"sample_{i:04d}.nii.gz")), nib.load(str(cli_out / f"sample_{i:04d}.nii.gz"))
        assert np.array_equal(np.asarray(ours.dataobj), np.asarray(cli.dataobj))
        assert np.allclose(ours.affine, cli.affine) and not np.allclose(ours.affine, np.eye(4))
    assert not (out / "sample_0003.nii.gz").exists()


def test_export_refuses_a_used_folder_and_a_folder_without_a_run(run, tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    line = error_line(capsys, export_bundle_main(["--run", str(run), "--out", str(used)]))
    assert "never overwritten" in line and (used / "keep.txt").read_text() == "mine"
    line = error_line(capsys, export_bundle_main(["--run", str(tmp_path), "--out", str(tmp_path / "b")]))
    assert "diffusion/best_model.pt" in line and not (tmp_path / "b").exists()
