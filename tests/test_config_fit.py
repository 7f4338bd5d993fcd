"""benchmarks/config_fit.py: the results table names the machine and commit of every row, also when a run with
``--append`` keeps rows of an earlier one, and a config's own ``fast_dev_run: true`` does not turn the one-step
commands into dry runs."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import config_fit  # noqa: E402
from _common import machine_info  # noqa: E402
from conftest import QUICKSTART  # noqa: E402

from monai_diffusion.settings import load_settings  # noqa: E402


def _row(config: str, machine: dict | None) -> dict:
    row = {"config": config, "size": [32, 32, 32], "step": "stage 1 --fast-dev-run", "exit_code": 0, "seconds": 1.0,
           "peak_rss_mib": 500, "memory": "memory: ~0.3 GiB estimated"}
    if machine is not None:
        row["machine"] = machine
    return row


def test_rows_of_two_runs_name_their_own_machine():
    old = {**machine_info("cpu"), "git_commit": "aaaaaaa", "date_utc": "2026-01-01 00:00 UTC"}
    new = {**machine_info("cpu"), "git_commit": "bbbbbbb", "date_utc": "2026-02-01 00:00 UTC"}
    text = config_fit.render({"machine": new, "results": [_row("a.yaml", old), _row("b.yaml", new)]})
    lines = text.splitlines()
    a_line = next(line for line in lines if line.startswith("A. "))
    b_line = next(line for line in lines if line.startswith("B. "))
    assert "commit aaaaaaa" in a_line and "commit bbbbbbb" in b_line
    assert "| a.yaml |" in next(line for line in lines if "| a.yaml |" in line) and \
        next(line for line in lines if "| a.yaml |" in line).count("| A |") == 1
    assert next(line for line in lines if "| b.yaml |" in line).count("| B |") == 1


def test_rows_written_before_rows_carried_a_machine_take_the_files_machine():
    last = {**machine_info("cpu"), "git_commit": "ccccccc"}
    report = config_fit.stamped({"machine": last, "earlier_machine": {**last, "git_commit": "ddddddd"},
                                 "results": [_row("a.yaml", None)]})
    assert "earlier_machine" not in report
    assert report["results"][0]["machine"]["git_commit"] == "ccccccc"


def test_one_step_commands_turn_a_configs_own_fast_dev_run_off():
    """The seed's ldm_config_remote.yaml says ``fast_dev_run: true`` in both stages; its "one step" commands must
    still train for real and write the checkpoint the next command reads."""
    steps = config_fit.commands(pixel=False, run_dir=Path("/tmp/run"))
    one_step = [(name, extra) for name, _, flags, extra in steps if "one step" in name]
    assert [name for name, _ in one_step] == ["stage 1, one step (checkpoint)", "stage 2, one step (checkpoint)"]
    for name, extra in one_step:
        section = "autoencoder" if name.startswith("stage 1") else "diffusion"
        s = load_settings(QUICKSTART, [f"{section}.training.fast_dev_run=true", *extra], check_paths=False)
        assert getattr(s, section).training.fast_dev_run is False, name
    assert all("--fast-dev-run" in flags for name, _, flags, _ in steps if name.endswith("--fast-dev-run"))
