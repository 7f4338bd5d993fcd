"""checkpoints.py: half-written checkpoint files that a killed writer left behind are found and removed."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from monai_diffusion.checkpoints import atomic_save, remove_stale_temporaries
from monai_diffusion.fileio import atomic_target
from monai_diffusion.runtime import Runtime


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_the_atomic_writer_are_removed_and_nothing_else(tmp_path):
    with atomic_target(tmp_path / "probe.pt") as tmp:  # the temporary name the writer really uses
        tmp.write_bytes(b"")
        written_as = tmp.name
    assert written_as == f".tmp-{os.getpid()}-probe.pt"
    (tmp_path / "probe.pt").unlink()
    dead = _dead_pid()
    stale = [f".tmp-{dead}-latest_checkpoint.pt", f".tmp-{dead}-step_checkpoint_00000012.pt",
             f".best_model.pt.tmp-{dead}"]  # the last: the name earlier versions wrote
    kept = [f".tmp-{os.getpid()}-best_model.pt",  # a writer that is alive (this process)
            f".tmp-{dead}-notes.pt", "latest_checkpoint.pt", f".tmp-{dead}-config.yaml"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"partial")
    removed = remove_stale_temporaries(tmp_path, Runtime(torch.device("cpu"), None))
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    # ranks other than 0 leave the folder alone
    (tmp_path / stale[0]).write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path, Runtime(torch.device("cpu"), None, rank=1)) == []


def test_atomic_save_leaves_no_temporary(tmp_path):
    atomic_save({"a": torch.ones(2)}, tmp_path / "latest_checkpoint.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["latest_checkpoint.pt"]
