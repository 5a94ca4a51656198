"""The one place that talks to MLflow.

A training run is one MLflow parent run; each stage is a nested child run that the rank-0 Ray
Train worker writes per-epoch metrics into by run id. Talking to MLflow through `MlflowClient`
and explicit run ids (rather than the fluent API's active-run state) is what lets the driver and
a remote worker process write to the same run.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from pathlib import Path
from typing import Any

from cmaclip.config import project_home

logger = logging.getLogger(__name__)


def peak_rss_mib() -> float:
    """This process's peak resident memory, as the epoch metrics and the benchmarks record it.

    `ru_maxrss` is in KiB on Linux and in bytes on macOS.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def tracking_uri(configured: str | None = None) -> str:
    """The configured URI, else `$MLFLOW_TRACKING_URI`, else a SQLite store in the project home."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{project_home() / 'mlflow.db'}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    """Get or create the experiment; its artifacts live in the project home, not the cwd."""
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (project_home() / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_run(
    uri: str, experiment: str, name: str, *, parent_id: str | None = None, tags=None
) -> str:
    tags = dict(tags or {})
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    run = _client(uri).create_run(experiment_id(uri, experiment), run_name=name, tags=tags)
    return run.info.run_id


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(key, str(value)[:6000]) for key, value in params.items()]
    client = _client(uri)
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log numeric metrics at `step`; names are made MLflow-safe (`@` for `=`, etc.)."""
    import time

    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    items = [
        Metric(_metric_key(key), float(value), stamp, step)
        for key, value in metrics.items()
        if isinstance(value, int | float)
    ]
    if items:
        _client(uri).log_batch(run_id, metrics=items)


def _metric_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def log_artifacts(uri: str, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    client = _client(uri)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status=status)


def reopen_run(uri: str, run_id: str | None) -> bool:
    """Mark an earlier submission's run as running again; False when the store has no such run.

    A resubmitted training run continues in the MLflow runs it began in, so each stage keeps one
    history of epochs across the submissions.
    """
    if not run_id:
        return False
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        logger.info("MLflow run %s is not in %s; a new run is started", run_id, uri)
        return False
    client.update_run(run_id, status="RUNNING")
    return True
