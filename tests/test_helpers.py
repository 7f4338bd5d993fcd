"""The shared test helpers of conftest.py: the tiny-run builder's merge rule and the argv it becomes."""

from __future__ import annotations

from pathlib import Path

import pytest

from monai_diffusion.settings import apply_overrides

from conftest import QUICKSTART, cli_args, tiny_overrides


def test_a_change_replaces_its_key_once_and_goes_after_the_rest(tmp_path):
    base = tiny_overrides(tmp_path)
    assert f"autoencoder.checkpoints.output_dir={tmp_path / 'ae'}" in base
    assert len({item.split("=", 1)[0] for item in base}) == len(base)  # each key once
    changed = tiny_overrides(tmp_path, "data.voxel_size=[8, 8, 8]", "sampling.seed=3")
    assert changed[-2:] == ["data.voxel_size=[8, 8, 8]", "sampling.seed=3"]
    assert "data.voxel_size=[16, 16, 16]" not in changed and len(changed) == len(base) + 1
    # the same raw config as appending the changes after the whole tiny list (--set: the last one wins), also where
    # a change sets a section that another change then edits inside
    changes = ("data.synthetic={enabled: false}", "data.synthetic.seed=4", "autoencoder.training={n_epochs: 3}")
    assert apply_overrides({}, tiny_overrides(tmp_path, *changes)) == apply_overrides({}, [*base, *changes])


def test_leave_drops_a_key_and_refuses_one_the_tiny_run_does_not_set(tmp_path):
    kept = tiny_overrides(tmp_path, leave=("sampling.output_dir", "device.mixed_precision"))
    assert not any(item.startswith(("sampling.output_dir=", "device.mixed_precision=")) for item in kept)
    assert len(kept) == len(tiny_overrides(tmp_path)) - 2
    with pytest.raises(KeyError, match=r"sampling\.outputdir"):
        tiny_overrides(tmp_path, leave=("sampling.outputdir",))


def test_a_malformed_change_is_passed_on_for_the_error_it_causes(tmp_path):
    assert tiny_overrides(tmp_path, "no_equals_sign")[-1] == "no_equals_sign"


def test_cli_args_puts_flags_before_the_overrides():
    assert cli_args(QUICKSTART, ["a=1", "b=2"], "--fast-dev-run") == [
        "--config", str(QUICKSTART), "--fast-dev-run", "--set", "a=1", "--set", "b=2"]
    assert Path(QUICKSTART).is_file()
