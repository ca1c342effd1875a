"""Links from a task to what it wrote in MLflow; the Airloop pages build the same URLs."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from airloop.links.base import AirloopLink


def run_url(ui_url: str, experiment_id: str, run_id: str) -> str:
    """A run in MLflow's UI at ``ui_url``."""
    return f"{ui_url}/#/experiments/{quote(str(experiment_id), safe='')}/runs/{quote(run_id, safe='')}"


def model_version_url(ui_url: str, model_name: str, version: str) -> str:
    """A registered model version in MLflow's UI at ``ui_url``."""
    return f"{ui_url}/#/models/{quote(model_name, safe='')}/versions/{quote(str(version), safe='')}"


class MlflowRunLink(AirloopLink):
    name = "MLflow run"
    key = "airloop_mlflow_run"

    def format_link(self, *, ui_url: str, experiment_id: str, run_id: str, **_: Any) -> str:
        return run_url(ui_url, experiment_id, run_id)


class MlflowModelVersionLink(AirloopLink):
    name = "MLflow model version"
    key = "airloop_mlflow_model_version"

    def format_link(self, *, ui_url: str, model_name: str, version: str, **_: Any) -> str:
        return model_version_url(ui_url, model_name, version)
