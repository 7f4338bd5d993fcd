"""Experiment tracking (issue 21): ``logging.tracker: mlflow`` logs both stages to a local MLflow store (SQLite file + artifacts folder) (the
resolved settings as parameters, the scalars as metrics, pictures and config.yaml as artifacts), a resumed run
continues the same MLflow run (its id is in the checkpoint), ``none`` writes no logs, and a missing mlflow package
is one error line naming the install command, before any work."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import QUICKSTART, cli_args, error_line, tiny_overrides

from monai_diffusion.checkpoints import load_checkpoint
from monai_diffusion.cli import train_autoencoder_main, train_diffusion_main


def _args(root: Path, *extra: str) -> list[str]:
    return cli_args(QUICKSTART, tiny_overrides(
        root,
        f"autoencoder.checkpoints.output_dir={root / 'run' / 'autoencoder'}",
        f"diffusion.checkpoints.autoencoder_path={root / 'run' / 'autoencoder' / 'best_model.pt'}",
        f"diffusion.checkpoints.output_dir={root / 'run' / 'diffusion'}",
        "autoencoder.logging.log_interval=1",
        "autoencoder.logging.visualize_interval=1",
        "diffusion.training.n_epochs=1",
        "diffusion.scheduler.num_train_timesteps=20",
        "diffusion.logging.log_interval=1",
        "diffusion.logging.visualize_interval=1",
        "diffusion.logging.num_inference_steps=2",
        "sampling.num_inference_steps=2",
        *extra,
    ))


def test_mlflow_logs_both_stages_and_a_resume_continues_the_run(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    ml = ["autoencoder.logging.tracker=mlflow", "diffusion.logging.tracker=mlflow"]
    assert train_autoencoder_main(_args(tmp_path, *ml, "autoencoder.training.n_epochs=1")) == 0
    first = load_checkpoint(tmp_path / "run" / "autoencoder" / "latest_checkpoint.pt")
    run_id = first["mlflow_run_id"]
    assert isinstance(run_id, str) and run_id
    # resumed for a second epoch: the same MLflow run, its metric history continued
    assert train_autoencoder_main(_args(tmp_path, *ml, "autoencoder.training.n_epochs=2",
                                        "autoencoder.checkpoints.resume_from=latest")) == 0
    assert load_checkpoint(tmp_path / "run" / "autoencoder" / "latest_checkpoint.pt")["mlflow_run_id"] == run_id
    assert train_diffusion_main(_args(tmp_path, *ml)) == 0

    store = tmp_path / "run" / "mlruns"
    assert store.is_dir() and not (tmp_path / "run" / "autoencoder" / "logs").exists()
    assert (store / "mlflow.db").is_file() and (store / "artifacts").is_dir()
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("run")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"autoencoder", "diffusion"} and runs["autoencoder"].info.run_id == run_id
    ae = client.get_run(run_id)
    assert ae.info.status == "FINISHED"
    assert ae.data.params["autoencoder.training.n_epochs"] == "1"  # parameters keep the first value
    assert ae.data.params["data.voxel_size"] == "[16, 16, 16]"
    assert [m.step for m in client.get_metric_history(run_id, "epoch/val_loss")] == [1, 2]
    assert any(key.startswith("train/") for key in ae.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert "config.yaml" in artifacts
    pictures = [a.path for a in client.list_artifacts(run_id, "pictures")]
    assert pictures and all(p.endswith(".png") for p in pictures)
    dm = runs["diffusion"]
    assert "epoch/val_loss" in dm.data.metrics and dm.data.params["diffusion.training.n_epochs"] == "1"
    assert [a.path for a in client.list_artifacts(dm.info.run_id, "pictures")]


def test_tracker_none_writes_no_logs_and_tensorboard_stays_the_default(tmp_path):
    assert train_autoencoder_main(_args(tmp_path, "autoencoder.logging.tracker=none",
                                        "autoencoder.training.n_epochs=1")) == 0
    folder = tmp_path / "run" / "autoencoder"
    assert (folder / "best_model.pt").is_file() and not (folder / "logs").exists()
    assert "mlflow_run_id" not in load_checkpoint(folder / "best_model.pt")
    assert not (tmp_path / "run" / "mlruns").exists()
    from monai_diffusion.settings import load_settings

    settings = load_settings(QUICKSTART, check_paths=False)
    assert settings.autoencoder.logging.tracker == settings.diffusion.logging.tracker == "tensorboard"


def test_missing_mlflow_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    code = train_autoencoder_main(_args(tmp_path, "autoencoder.logging.tracker=mlflow"))
    line = error_line(capsys, code)
    assert "autoencoder.logging.tracker" in line and 'pip install -e ".[mlflow]"' in line
    assert not (tmp_path / "run").exists()
    with pytest.raises(Exception, match="tracker"):
        from monai_diffusion.settings import load_settings

        load_settings(QUICKSTART, ["autoencoder.logging.tracker=wandb"], check_paths=False)


def test_mlflow_run_survives_a_kill_and_resume_from_latest(tmp_path, capsys):
    """Stage 1 in a child process, SIGKILLed after a checkpoint and after it logged steps past that checkpoint, then
    resumed with ``resume_from: latest``: the same MLflow run goes on; its history has every step, and twice only the
    steps between the checkpoint and the kill (the work the kill lost, done again: MLflow cannot erase values)."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    steps_per_epoch, n_epochs = 2, 4  # 4 phantoms, batch 2
    argv = _args(tmp_path, "autoencoder.logging.tracker=mlflow", f"autoencoder.training.n_epochs={n_epochs}",
                 "autoencoder.training.val_interval=1")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(repo), str(repo / "GenerativeModels"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    folder = tmp_path / "run" / "autoencoder"
    latest = folder / "latest_checkpoint.pt"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlruns' / 'mlflow.db'}")
    tag = "train/l1"
    with open(tmp_path / "child.log", "wb") as log:
        child = subprocess.Popen([sys.executable, str(repo / "monai_diffusion" / "3d_ldm" / "train_autoencoder.py"),
                                  *argv], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 600
            while True:  # a checkpoint, and a step logged after it
                assert child.poll() is None, (tmp_path / "child.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "no checkpoint and later step within 10 minutes"
                if latest.is_file():
                    ckpt = load_checkpoint(latest)
                    logged = [m.step for m in client.get_metric_history(ckpt["mlflow_run_id"], tag)]
                    if logged and max(logged) > ckpt["global_step"] and ckpt["epoch"] < n_epochs - 1:
                        break
                time.sleep(0.2)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
    killed_at = int(time.time() * 1000)
    ckpt = load_checkpoint(latest)  # the checkpoint that survived the kill
    run_id, resumed_from = ckpt["mlflow_run_id"], ckpt["global_step"]
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody closed it
    before = [m.step for m in client.get_metric_history(run_id, tag)]
    last_before_kill = max(before)
    assert sorted(before) == list(range(1, last_before_kill + 1)) and last_before_kill > resumed_from

    capsys.readouterr()
    assert train_autoencoder_main(argv + ["--set", "autoencoder.checkpoints.resume_from=latest"]) == 0
    # the closing line names where the logs went
    assert f"stage 1 done: checkpoints in {folder}, MLflow run in {client.tracking_uri}" in capsys.readouterr().out
    assert load_checkpoint(latest)["mlflow_run_id"] == run_id
    runs = client.search_runs([client.get_experiment_by_name("run").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # one MLflow run, continued
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, tag)
    after = sorted(m.step for m in history if m.timestamp >= killed_at)
    final = steps_per_epoch * n_epochs
    assert after == list(range(resumed_from + 1, final + 1))  # the resume starts right after its checkpoint
    steps = sorted(m.step for m in history)
    assert set(steps) == set(range(1, final + 1))  # no step lost
    twice = sorted({s for s in steps if steps.count(s) > 1})
    assert twice == list(range(resumed_from + 1, last_before_kill + 1))  # only those the kill lost, logged again
    epochs = [m.step for m in client.get_metric_history(run_id, "epoch/val_loss")]
    assert set(epochs) == set(range(1, n_epochs + 1)) and max(epochs) == n_epochs
    # parameters: the first values stay (MLflow refuses to change one) and the resume did not try to
    assert run.data.params["autoencoder.training.n_epochs"] == str(n_epochs)
    assert run.data.params["autoencoder.checkpoints.resume_from"] == "None"
    assert "config.yaml" in {a.path for a in client.list_artifacts(run_id)}
    pictures = {a.path for a in client.list_artifacts(run_id, "pictures")}
    for epoch in range(1, n_epochs + 1):  # a picture of every epoch, before the kill and after the resume
        assert any(p.endswith(f"_{epoch:06d}.png") for p in pictures), (epoch, sorted(pictures))
    with capsys.disabled():
        print(f"mlflow run {run_id}: killed after step {last_before_kill}, checkpoint at step {resumed_from}, resumed "
              f"to step {final}; steps logged twice: {twice}")
