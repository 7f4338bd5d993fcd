"""The phantom's blob masks (``synthetic.phantom_blobs``) and the stage-1 blob benchmark's dry run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from monai_diffusion.synthetic import generate_volume, phantom_blobs

REPO = Path(__file__).resolve().parents[1]

# sha256 of generate_volume("phantom", ...) as written before phantom_blobs existed: the helper must not change them
FROZEN = [
    ("train", 0, 0, (32, 32, 32), "34807ac7e643c2f7e689a604d66010d520aa0035258279405a6d7bdd5f4b8677"),
    ("train", 5, 0, (32, 32, 32), "d2903cd79a4d0f63f7cbc7fa8497ba6e9f9421ee9c5664b9c5ff3b905a215413"),
    ("val", 1, 0, (32, 32, 32), "ab757793f866812d86151217b8fbb4f1ae5b021342b4ff0d9e7ab5203970b8fe"),
    ("train", 3, 7, (48, 40, 24), "57bc65c7f232bbae3545b6d4fd1e44fc02134decebc86095d54b6bf0f9760dba"),
    ("train", 2, 1, (64, 64), "d98744d4a741be8eaf998ae17211041ab3672ad7c4fc09abe6fb86241c2a0937"),
]


@pytest.mark.parametrize("split,index,seed,shape,digest", FROZEN)
def test_phantom_unchanged_and_helper_regenerates_it(split, index, seed, shape, digest):
    volume = generate_volume("phantom", shape, seed=seed, split=split, index=index)
    assert hashlib.sha256(volume.tobytes()).hexdigest() == digest
    parts = phantom_blobs(shape, seed=seed, split=split, index=index)
    assert np.array_equal(parts["image"], volume)


def test_blob_masks_are_where_the_blobs_are():
    parts = phantom_blobs((32, 32, 32), seed=0, split="train", index=0)
    image, head, blobs = parts["image"], parts["head"], parts["blobs"]
    assert 3 <= len(blobs) <= 6 and head.shape == image.shape
    assert blobs[0]["dark"] and not any(b["dark"] for b in blobs[1:])
    total = np.zeros_like(image)
    for b in blobs:
        w = b["weight"]
        assert w.shape == image.shape and w.dtype == np.float32
        assert w.min() >= 0.0 and w.max() <= 1.0 + 1e-6
        assert w.max() <= head.max() + 1e-6  # blobs live inside the head
        core = w > 0.5
        assert 1 <= core.sum() < 0.1 * image.size  # small
        # the image inside a blob's core is near its level (noise sd 0.02 * (0.25 + rim); soft edges mix)
        assert abs(float(image[w > 0.9].mean()) - b["level"]) < 0.06 if (w > 0.9).any() else True
        assert (0.05 <= b["level"] <= 0.15) if b["dark"] else (0.55 <= b["level"] <= 1.0)
        total += w
    assert total.max() <= 1.0 + 1e-5  # the visible weights of overlapping blobs share each voxel


def test_blob_masks_depend_on_the_volume():
    a = phantom_blobs((32, 32, 32), seed=0, split="train", index=0)["blobs"][0]["weight"]
    b = phantom_blobs((32, 32, 32), seed=0, split="train", index=1)["blobs"][0]["weight"]
    c = phantom_blobs((32, 32, 32), seed=0, split="val", index=0)["blobs"][0]["weight"]
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="split"):
        phantom_blobs((32, 32, 32), split="test")


def test_benchmark_dry_run(tmp_path):
    """The benchmark's every code path at 16^3 with one-epoch runs (seconds): rows measured, files written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "GenerativeModels"), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "results" / "stage1_blobs"
    cmd = [sys.executable, str(REPO / "benchmarks" / "stage1_blobs.py"), "--dry-run", "--variants", "adv0.01",
           "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["baseline", "adv0.01"]
    for r in result["rows"]:
        assert r["steps"] > 0 and r["seconds"] > 0 and 0.0 <= r["c2st_recon_vs_real"] <= 1.0
        assert r["blob_contrast_train"]["blobs"] > 0 and np.isfinite(r["blob_contrast_train"]["mean"])
    assert set(result["probes"]) == {"baseline", "adv0.01"}
    assert out.with_suffix(".png").is_file() and "| baseline | budget |" in out.with_suffix(".md").read_text()
    # an existing run folder is not trained over without --reuse
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "--reuse" in again.stderr
