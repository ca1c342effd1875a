"""Links from a task to what it wrote in MLflow."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from airloop.links.base import AirloopLink


class MlflowRunLink(AirloopLink):
    name = "MLflow run"
    key = "airloop_mlflow_run"

    def format_link(self, *, ui_url: str, experiment_id: str, run_id: str, **_: Any) -> str:
        return f"{ui_url}/#/experiments/{experiment_id}/runs/{run_id}"


class MlflowModelVersionLink(AirloopLink):
    name = "MLflow model version"
    key = "airloop_mlflow_model_version"

    def format_link(self, *, ui_url: str, model_name: str, version: str, **_: Any) -> str:
        return f"{ui_url}/#/models/{quote(model_name)}/versions/{version}"
