"""MLflow: the system of record for models (runs, registered versions, aliases)."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

from airloop import settings
from airloop.hooks.base import EmbeddedDefaultHook
from airloop.tracking.session import HTTP_SETTINGS

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from airloop.tracking.session import SessionClient

# For the Test button: MLflow's own default backs off for minutes.
TEST_HTTP = {"max_retries": 1, "backoff_factor": 0, "timeout": 10}


class MlflowHook(EmbeddedDefaultHook):
    """
    Talks to an MLflow tracking server and model registry.

    The connection (its form is declared in provider.yaml):

    - host (and port): the tracking URI, ``http://mlflow:5000``; ``sqlite:///...`` works too.
    - login and password: HTTP basic auth; a password without a login, or ``token`` in extra, is a
      bearer token.
    - extra ``aws_conn_id``: an ``aws`` connection whose credentials, endpoint and region the steps
      use for ``s3://`` artefacts they read or write themselves (not needed when the server proxies
      artefacts).
    - extra ``max_retries``, ``backoff_factor``, ``backoff_jitter``, ``timeout``: MLflow's HTTP retries.
    - extra ``ui_url`` (where people open runs) and ``artifact_root`` (for new experiments).

    Credentials stay in the hook and in the requests it builds for steps (``step_config()``), which
    apply them to MLflow's clients per call (``airloop.tracking.session``): never in ``os.environ``.
    Without a ``mlflow_default`` connection the hook uses the embedded MLflow under ``AIRLOOP_HOME``.

    :param mlflow_conn_id: Airflow connection of type ``mlflow``.
    """

    conn_name_attr = "mlflow_conn_id"
    default_conn_name = "mlflow_default"
    conn_type = "mlflow"
    hook_name = "MLflow"

    def __init__(self, mlflow_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.mlflow_conn_id = mlflow_conn_id

    @cached_property
    def _settings(self) -> dict[str, Any]:
        conn = self.connection_or_none(self.mlflow_conn_id)
        if conn is None:
            return {
                "tracking_uri": settings.mlflow_tracking_uri(),
                "artifact_root": settings.mlflow_artifact_root(),
                "ui_url": "http://127.0.0.1:5000",
            }
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
            "auth": self._auth(conn.login, conn.password, extra.get("token")),
            "http": {key: extra[key] for key in HTTP_SETTINGS if extra.get(key) not in (None, "")},
            "aws_conn_id": extra.get("aws_conn_id"),
        }

    def _auth(self, login: str | None, password: str | None, token: str | None) -> dict[str, str] | None:
        from airflow.sdk.log import mask_secret

        if token and password:
            raise ValueError(
                f"connection {self.mlflow_conn_id!r} has both a password and a token in extra: keep one"
            )
        if login and not password:
            raise ValueError(f"connection {self.mlflow_conn_id!r} has a login but no password")
        if token or password:
            mask_secret(token or password)
        if login and password:
            return {"username": login, "password": password}
        secret = token or password
        return {"token": secret} if secret else None

    def _s3(self, aws_conn_id: str) -> dict[str, str]:
        """Plain values for the ``s3`` request key from an ``aws`` connection (Amazon provider)."""
        from airloop.hooks.aws import s3_settings

        return s3_settings(aws_conn_id, f"connection {self.mlflow_conn_id!r}")

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
        """What a step needs to reach MLflow, as plain values for its request (credentials included:
        pass the request to the step, never log it)."""
        return dict(self._step_config)

    @cached_property
    def _step_config(self) -> dict[str, Any]:
        # Cached: resolving the AWS connection can mean an STS call.
        config: dict[str, Any] = {"tracking_uri": self.tracking_uri, "artifact_root": self.artifact_root}
        if self._settings.get("auth"):
            config["auth"] = self._settings["auth"]
        if self._settings.get("http"):
            config["http"] = self._settings["http"]
        if self._settings.get("aws_conn_id"):
            config["s3"] = self._s3(self._settings["aws_conn_id"])
        return config

    @cached_property
    def client(self) -> SessionClient:
        """An ``MlflowClient`` (tracking and registry) whose calls use the connection's settings."""
        from airloop.tracking.session import SessionClient

        return SessionClient(self.step_config())

    def get_conn(self) -> SessionClient:
        return self.client

    def session(self) -> AbstractContextManager[None]:
        """A block in which this process's MLflow calls (plain ``MlflowClient`` objects, the helpers of
        ``airloop.steps`` that take a tracking URI) use the connection's settings."""
        from airloop.tracking.session import mlflow_calls

        return mlflow_calls(self.step_config())

    def test_connection(self) -> tuple[bool, str]:
        from airloop.tracking.session import MlflowUnavailableError, SessionClient

        try:
            config = self.step_config()
        except Exception as e:
            return False, f"connection {self.mlflow_conn_id!r} cannot be used: {e}"
        # The Test button answers in seconds, whatever retries the tasks use.
        try:
            client = SessionClient({**config, "http": {**config.get("http", {}), **TEST_HTTP}})
            client.search_experiments(max_results=1)
        except MlflowUnavailableError as e:
            return False, str(e)
        except Exception as e:
            return False, f"MLflow at {config['tracking_uri']} returned an error: {e}"
        return True, f"Connected to MLflow at {config['tracking_uri']}"
