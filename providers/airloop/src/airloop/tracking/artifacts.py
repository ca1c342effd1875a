"""MLflow artefacts and runs: download and read what a run holds, find the run of an Airflow task
instance, create experiments, describe a training run. Every call goes through a client bound to the
request's tracking URI."""

from __future__ import annotations

import json
import tempfile
from typing import TYPE_CHECKING, Any

from airloop import settings
from airloop.tables import read_table
from airloop.tracking.requests import TrainedRun

if TYPE_CHECKING:
    import mlflow
    import pandas as pd

# The logged model of a training run: ``runs:/<run_id>/model``.
MODEL_NAME = "model"
HOLDOUT_PATH = "data/holdout.parquet"
REFERENCE_PATH = "drift/reference.parquet"
FINGERPRINT_PATH = "data/fingerprint.json"


# Tags that identify one Airflow task instance: a finished run carrying the same values is reused.
IDEMPOTENCY_TAGS = ("airflow.dag_id", "airflow.run_id", "airflow.task_id", "airflow.map_index")
# MLflow marks a nested (child) run with this tag; its UI groups children under the parent.
PARENT_RUN_TAG = "mlflow.parentRunId"


def task_run(
    client: mlflow.MlflowClient, experiment_id: str, tags: dict[str, str], finished: bool = True
) -> mlflow.entities.Run | None:
    """The newest (finished, unless ``finished=False``) run of the Airflow task instance the tags name."""
    key = {name: tags[name] for name in IDEMPOTENCY_TAGS if name in tags}
    if not {"airflow.dag_id", "airflow.run_id", "airflow.task_id"} <= key.keys():
        return None
    clauses = [f"tags.`{name}` = {_quote(value)}" for name, value in key.items()]
    if finished:
        clauses.append("attributes.status = 'FINISHED'")
    runs = client.search_runs(
        [experiment_id], " AND ".join(clauses), order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0] if runs else None


def _quote(value: str) -> str:
    """A search-filter string literal (MLflow's filter grammar has no escapes)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"tag value {value!r} holds both quote characters and cannot be searched for")


def ensure_experiment(client: mlflow.MlflowClient, name: str, artifact_root: str | None) -> str:
    """The id of experiment ``name``, created with artefacts under ``artifact_root/name`` if new."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    root = (artifact_root or settings.mlflow_artifact_root()).rstrip("/")
    try:
        return client.create_experiment(name, artifact_location=f"{root}/{name}")
    except MlflowException:
        # Another task created it between our lookup and create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def download(tracking_uri: str, uri: str, dst_dir: str) -> str:
    """Download an MLflow artefact URI (``runs:/``, ``models:/``, ``file://``...) into ``dst_dir``."""
    import mlflow

    return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst_dir, tracking_uri=tracking_uri)


def read_data(tracking_uri: str, uri: str, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """A table from a ``runs:/`` / ``models:/`` artefact or any location ``read_table`` reads."""
    if uri.startswith(("runs:/", "models:/")):
        with tempfile.TemporaryDirectory() as tmp:
            return read_table(download(tracking_uri, uri, tmp))
    return read_table(uri, storage_options)


def read_json_artifact(client: mlflow.MlflowClient, run_id: str, path: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        with open(client.download_artifacts(run_id, path, tmp)) as handle:
            return json.load(handle)


def trained_run(
    run_id: str, metrics: dict[str, float], data_print: dict[str, Any], reused: bool
) -> TrainedRun:
    """A training run as the later steps name it: its model, metrics, splits and data fingerprint."""
    return {
        "run_id": run_id,
        "model_uri": f"runs:/{run_id}/{MODEL_NAME}",
        "metrics": metrics,
        "holdout_uri": f"runs:/{run_id}/{HOLDOUT_PATH}",
        "reference_uri": f"runs:/{run_id}/{REFERENCE_PATH}",
        "fingerprint": data_print,
        "reused": reused,
    }


def run_result(client: mlflow.MlflowClient, run: mlflow.entities.Run, reused: bool) -> TrainedRun:
    """``trained_run`` of a run that the train step logged earlier."""
    data_print = read_json_artifact(client, run.info.run_id, FINGERPRINT_PATH)
    return trained_run(run.info.run_id, dict(run.data.metrics), data_print, reused=reused)
