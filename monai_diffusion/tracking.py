"""Experiment trackers of the training loop (``logging.tracker``): TensorBoard (the default), MLflow, or none.

A tracker is what the loop writes to: ``add_scalar(tag, value, step)``, ``add_image(tag, image CHW in [0, 1],
step)``, ``close(status)``. TensorBoard is PyTorch's ``SummaryWriter`` itself. :class:`MlflowTracker` logs the
resolved settings as parameters (dotted keys), every scalar as a metric under the same tag, every picture and the
run's ``config.yaml`` as artifacts, to ``logging.mlflow_uri`` or a local store in ``mlruns/`` beside the stage folders
(``runs/quickstart/mlruns/mlflow.db`` and ``mlruns/artifacts`` for the quickstart; ``mlflow ui --backend-store-uri
sqlite:///runs/quickstart/mlruns/mlflow.db`` shows it); the experiment is named after the run folder and the MLflow run
after the stage. A resumed run continues the same MLflow run: its id is kept in the checkpoints
(``mlflow_run_id``, a plain string).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import RunError

TRACKERS = ("tensorboard", "mlflow", "none")
MLFLOW_INSTALL = 'pip install -e ".[mlflow]" (or pip install mlflow)'
_PARAM_CHUNK = 100  # MLflow takes at most 100 parameters per batch
_PARAM_LENGTH = 500  # and values of limited length (6000 characters in recent versions, 500 in older ones)


def require_mlflow(key: str) -> None:
    """A one-line :class:`RunError` naming ``key`` and the install command when MLflow is not installed."""
    if importlib.util.find_spec("mlflow") is None:
        raise RunError(f"{key}=mlflow, but the mlflow package is not installed: {MLFLOW_INSTALL}")


def default_mlflow_uri(output_dir: Path) -> str:
    """The local store of a run: the SQLite database ``<folder above the stage's output_dir>/mlruns/mlflow.db``
    (MLflow's file store is in maintenance mode: recent versions refuse it), with the artifacts beside it in
    ``mlruns/artifacts`` (see :class:`MlflowTracker`)."""
    store = Path(output_dir).resolve().parent / "mlruns"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _artifact_root(uri: str) -> str | None:
    """Where a new experiment of a local SQLite store keeps its artifacts: ``artifacts/`` beside the database (MLflow
    would otherwise use ``./mlartifacts`` in the working directory); None for other stores (their own default)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """Nested settings as ``{"a.b.c": "value"}`` (values as text, cut to MLflow's parameter length)."""
    if isinstance(d, dict):
        out: dict[str, str] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: str(d)[:_PARAM_LENGTH]}


def _picture(image: torch.Tensor) -> np.ndarray:
    """A CHW picture in [0, 1] (TensorBoard's ``add_image`` format) as HWC uint8 (grey: HW)."""
    array = image.detach().float().cpu().clamp(0, 1).numpy()
    array = (array * 255.0 + 0.5).astype(np.uint8)
    return array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)


class MlflowTracker:
    """Logs one stage of a run to MLflow (see the module's docstring).

    Args:
        uri: the tracking URI (``logging.mlflow_uri``; a folder path is a file store).
        experiment: the experiment's name (created when missing).
        run_name: the MLflow run's name (the stage).
        params: the resolved settings, nested.
        run_id: the MLflow run to continue (a resumed training run), or None for a new one.
        artifacts: files logged once at the start (``config.yaml``).
    """

    def __init__(self, uri: str, experiment: str, run_name: str, params: dict[str, Any], run_id: str | None = None,
                 artifacts: tuple[Path, ...] = ()) -> None:
        require_mlflow("logging.tracker")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id: str
        if run_id is not None:
            try:
                self.client.get_run(run_id)
            except Exception as exc:  # noqa: BLE001 - MLflow raises its own exception types
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise RunError(f"the checkpoint continues MLflow run {run_id}, which {uri} does not hold ({first}); "
                               "set logging.mlflow_uri to the store it was logged to") from None
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (found.experiment_id if found is not None
                             else self.client.create_experiment(experiment, artifact_location=_artifact_root(uri)))
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        logged = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in flatten(params).items() if k not in logged]  # parameters cannot change
        for i in range(0, len(new), _PARAM_CHUNK):
            self.client.log_batch(self.run_id, params=new[i: i + _PARAM_CHUNK])
        for path in artifacts:
            if Path(path).is_file():
                self.client.log_artifact(self.run_id, str(path))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.client.log_metric(self.run_id, tag, float(value), step=int(step))

    def add_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        name = tag.replace("/", "_")
        self.client.log_image(self.run_id, _picture(image), artifact_file=f"pictures/{name}_{int(step):06d}.png")

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run: ``FINISHED``, ``KILLED`` (stopped by a signal; a resume continues it) or
        ``FAILED``."""
        self.client.set_terminated(self.run_id, status=status)


class TensorBoardTracker:
    """PyTorch's ``SummaryWriter`` with the tracker's ``close(status)``."""

    def __init__(self, log_dir: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self.run_id = None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def add_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, image, step)

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()
