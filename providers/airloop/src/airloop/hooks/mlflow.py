"""MLflow: the system of record for models (runs, registered versions, aliases)."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

from airloop import settings
from airloop.hooks.base import EmbeddedDefaultHook

if TYPE_CHECKING:
    from mlflow import MlflowClient


class MlflowHook(EmbeddedDefaultHook):
    """
    Talks to an MLflow tracking server and model registry.

    The connection's host is the tracking URI (``http://mlflow:5000``; ``sqlite:///...`` works too);
    ``extra`` may hold ``ui_url`` (where people open runs) and ``artifact_root`` (for new experiments).
    Without a ``mlflow_default`` connection the hook uses the embedded MLflow under ``AIRLOOP_HOME``.

    :param mlflow_conn_id: Airflow connection of type ``mlflow``.
    """

    conn_name_attr = "mlflow_conn_id"
    default_conn_name = "mlflow_default"
    conn_type = "mlflow"
    hook_name = "MLflow"

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["schema", "port"],
            "relabeling": {"host": "Tracking URI", "login": "Username", "password": "Password or token"},
            "placeholders": {
                "host": "http://mlflow:5000",
                "extra": '{"ui_url": "https://mlflow.example.com", "artifact_root": "s3://bucket/mlflow"}',
            },
        }

    def __init__(self, mlflow_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.mlflow_conn_id = mlflow_conn_id

    @cached_property
    def _settings(self) -> dict[str, Any]:
        conn = self.connection_or_none(self.mlflow_conn_id)
        if conn is None:
            return {"tracking_uri": settings.mlflow_tracking_uri(),
                    "artifact_root": settings.mlflow_artifact_root(), "ui_url": "http://127.0.0.1:5000"}
        extra = conn.extra_dejson
        uri = conn.host or extra.get("tracking_uri")
        if not uri:
            raise ValueError(f"connection {self.mlflow_conn_id!r} has no tracking URI: set its host")
        if conn.port and uri.startswith("http") and uri.count(":") == 1:
            uri = f"{uri}:{conn.port}"
        return {
            "tracking_uri": uri,
            "artifact_root": extra.get("artifact_root"),
            "ui_url": extra.get("ui_url") or (uri if uri.startswith("http") else "http://127.0.0.1:5000"),
        }

    @property
    def tracking_uri(self) -> str:
        return self._settings["tracking_uri"]

    @property
    def artifact_root(self) -> str | None:
        return self._settings["artifact_root"]

    @property
    def ui_url(self) -> str:
        return self._settings["ui_url"].rstrip("/")

    def step_config(self) -> dict[str, Any]:
        """What a step needs to reach MLflow, as plain values for its request."""
        return {"tracking_uri": self.tracking_uri, "artifact_root": self.artifact_root}

    @cached_property
    def client(self) -> MlflowClient:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def get_conn(self) -> MlflowClient:
        return self.client

    def test_connection(self) -> tuple[bool, str]:
        try:
            self.client.search_experiments(max_results=1)
        except Exception as e:
            return False, f"MLflow at {self.tracking_uri} did not answer: {e}"
        return True, f"Connected to MLflow at {self.tracking_uri}"
