"""Opening a checkpoint never runs code: every entry point that reads one refuses a file with pickled objects in one
``error:`` line (exit 2) before anything in it is built, and names the converter for this project's older files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from monai_diffusion.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    convert_checkpoint,
    load_checkpoint,
    unsafe_entries,
)
from monai_diffusion.cli import (
    convert_checkpoint_main,
    evaluate_main,
    generate_samples_main,
    train_autoencoder_main,
    train_diffusion_main,
)
from monai_diffusion.errors import RunError

from conftest import QUICKSTART, cli_args, error_line, tiny_overrides


class _Payload:
    """Unpickling this creates ``marker``: the proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payload_file(tmp_path: Path, name: str = "payload.pt") -> tuple[Path, Path]:
    marker = tmp_path / f"{name}.RAN"
    path = tmp_path / name
    # shaped like a real checkpoint, so that nothing but the pickled object could make it fail
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "stage": "autoencoder",
                "state_dict": {}, "x": _Payload(marker)}, path)
    return path, marker


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safe")
    sets = tiny_overrides(root, "data.voxel_size=[8, 8, 8]", "autoencoder.num_channels=[4, 4]",
                          "autoencoder.downsample_factors=[2]", "diffusion.attention_levels=[false, false]",
                          "diffusion.num_channels=[4, 4]", "diffusion.num_head_channels=4",
                          "diffusion.scheduler.num_train_timesteps=20", "diffusion.training.n_epochs=1",
                          "diffusion.training.num_samples_to_generate=0", "autoencoder.checkpoints.every_n_steps=1",
                          "sampling.num_inference_steps=2", "sampling.num_samples=1")
    assert train_autoencoder_main(cli_args(QUICKSTART, sets)) == 0
    assert train_diffusion_main(cli_args(QUICKSTART, sets)) == 0
    return root


def _sets(root: Path, *extra: str) -> list[str]:
    return cli_args(QUICKSTART, tiny_overrides(root, "data.voxel_size=[8, 8, 8]", "autoencoder.num_channels=[4, 4]",
                                               "autoencoder.downsample_factors=[2]",
                                               "diffusion.attention_levels=[false, false]",
                                               "diffusion.num_channels=[4, 4]", "diffusion.num_head_channels=4",
                                               "diffusion.scheduler.num_train_timesteps=20",
                                               "sampling.num_inference_steps=2", "sampling.num_samples=1", *extra))


def test_written_checkpoints_load_with_weights_only(trained):
    files = sorted(trained.rglob("*.pt"))
    assert any("step_checkpoint" in p.name for p in files), files  # the step checkpoint holds the random states
    for path in files:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["version"] == CHECKPOINT_VERSION and unsafe_entries(ckpt) == [], path


@pytest.mark.parametrize("entry", ["resume_from", "init_from", "autoencoder_path", "generate", "evaluate"])
def test_payload_never_runs(entry, trained, tmp_path, capsys):
    payload, marker = _payload_file(tmp_path)
    if entry == "resume_from":
        code = train_autoencoder_main(_sets(tmp_path, f"autoencoder.checkpoints.resume_from={payload}"))
    elif entry == "init_from":
        code = train_autoencoder_main(_sets(tmp_path, f"autoencoder.checkpoints.init_from={payload}"))
    elif entry == "autoencoder_path":
        code = train_diffusion_main(_sets(tmp_path, f"diffusion.checkpoints.autoencoder_path={payload}"))
    elif entry == "generate":
        code = generate_samples_main(_sets(trained) + ["--checkpoint", str(payload)])
    else:
        code = evaluate_main(_sets(trained) + ["--checkpoint", str(payload), "--out", str(tmp_path / "ev.json")])
    line = error_line(capsys, code)
    assert not marker.exists(), "loading the checkpoint ran the code pickled in it"
    assert str(payload) in line and "monai-diffusion-convert-checkpoint" in line, line


def _old_format(ckpt: dict, rng_tuple: bool = True) -> dict:
    """``ckpt`` as format 2 wrote it: NumPy's random state as its own tuple (an ndarray: needs unpickling)."""
    old = dict(ckpt, version=2)
    if rng_tuple:
        old["position"] = {"epoch": 1, "batches_done": 1,
                           "ranks": [{"rng": {"numpy": np.random.get_state()}, "sums": {}, "counted": 0,
                                      "in_a_row": 0}]}
    return old


def test_old_checkpoint_is_refused_then_converts(trained, tmp_path, capsys):
    good = torch.load(trained / "ae" / "best_model.pt", weights_only=True)
    old = tmp_path / "old.pt"
    torch.save(_old_format(good), old)
    with pytest.raises(RunError, match="monai-diffusion-convert-checkpoint"):
        load_checkpoint(old)
    new = tmp_path / "new.pt"
    assert convert_checkpoint_main([str(old), str(new)]) == 0
    assert "wrote" in capsys.readouterr().out
    ckpt = load_checkpoint(new, expected_stage="autoencoder")
    assert ckpt["version"] == CHECKPOINT_VERSION
    state = ckpt["position"]["ranks"][0]["rng"]["numpy"]
    saved = np.random.get_state()
    np.random.set_state((state["kind"], state["key"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                         state["cached_gaussian"]))
    np.random.set_state(saved)
    for key, value in good["state_dict"]["autoencoder"].items():
        assert torch.equal(ckpt["state_dict"]["autoencoder"][key], value), key
    # the converter never replaces a file, and only converts this project's checkpoints
    assert "already exists" in error_line(capsys, convert_checkpoint_main([str(old), str(new)]))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    assert "not a monai-diffusion checkpoint" in error_line(
        capsys, convert_checkpoint_main([str(foreign), str(tmp_path / "x.pt")]))


def test_writer_refuses_objects(tmp_path):
    from monai_diffusion.checkpoints import atomic_save

    with pytest.raises(TypeError, match="optimizer"):
        atomic_save({"optimizer": torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)}, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
    assert unsafe_entries({"a": [1, 2.0, "x", None, (True,)], "t": torch.zeros(1)}) == []
    assert unsafe_entries({"rng": {"numpy": np.random.get_state()}}) == ["rng.numpy[1] (numpy.ndarray)"]


def test_mapped_reading_gives_the_same_tensors_and_reads_the_old_file_format(tmp_path):
    from monai_diffusion.checkpoints import read_tensors_file

    state = {"w": torch.arange(6.0).reshape(2, 3), "meta": {"step": 3, "name": "x"}}
    new, old = tmp_path / "new.pt", tmp_path / "old.pt"
    torch.save(state, new)
    torch.save(state, old, _use_new_zipfile_serialization=False)  # mmap cannot map this format: read whole
    for path in (new, old):
        got = read_tensors_file(path, mmap=True)
        assert torch.equal(got["w"], state["w"]) and got["meta"] == state["meta"]
