"""How a step reaches MLflow: one connection's settings applied to MLflow's own clients for one call.

A request names the server (``tracking_uri``) and may carry the connection's settings as plain values
(``MlflowHook.step_config()`` builds them):

- ``auth``: ``{"token": ...}`` or ``{"username": ..., "password": ...}`` for the tracking server;
- ``s3``: ``endpoint_url``, ``aws_access_key_id``, ``aws_secret_access_key``, ``aws_session_token``,
  ``region_name`` for ``s3://`` artefacts the step reads or writes itself;
- ``http``: MLflow's HTTP retry settings (``max_retries``, ``backoff_factor``, ``backoff_jitter``,
  ``timeout``).

``mlflow_calls(request)`` applies them while a block runs. Credentials never go to ``os.environ``
(where MLflow looks for them by default): two MLflow plugins that Airloop registers through entry
points (``airloop.tracking.plugins``) read them from this module while a block is open, one
adding the ``Authorization`` header to MLflow's REST requests, the other giving the S3 artefact
repository its credentials. The retry settings are not secrets, and MLflow reads them only from its
``MLFLOW_HTTP_REQUEST_*`` variables: they are set for the block and restored afterwards, together
with ``MLFLOW_DISABLE_TELEMETRY=true`` (MLflow checks it at import and again before each event).

MLflow's clients, thread pools and variables are process-wide, so the settings are too: blocks
with equal settings run side by side, and a block with other settings waits until they have ended.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from airloop.requests import StepRequest

# The request's "http" settings and the MLflow variables that carry them.
HTTP_SETTINGS = {
    "max_retries": ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", int),
    "backoff_factor": ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", int),
    "backoff_jitter": ("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", float),
    "timeout": ("MLFLOW_HTTP_REQUEST_TIMEOUT", int),
}
S3_SETTINGS = (
    "endpoint_url",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "region_name",
)
# Steps never send MLflow usage data.
TELEMETRY_OFF = ("MLFLOW_DISABLE_TELEMETRY", "true")


# A step's request: a dict, as it crosses a runtime hop, or the step's typed request.
Request = TypeVar("Request", bound="Mapping[str, Any] | StepRequest")
Result = TypeVar("Result")


class MlflowUnavailableError(RuntimeError):
    """The MLflow server did not answer, or kept answering with errors, after its retries."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a block applies; secrets stay out of ``repr`` (and so out of logs and tracebacks)."""

    authorization: str | None = dataclasses.field(default=None, repr=False)
    s3: tuple[tuple[str, str], ...] = dataclasses.field(default=(), repr=False)
    environment: tuple[tuple[str, str], ...] = (TELEMETRY_OFF,)

    @classmethod
    def from_request(cls, request: Mapping[str, Any]) -> Settings:
        return cls(
            _authorization(request.get("auth")), _s3(request.get("s3")), _environment(request.get("http"))
        )


def _authorization(auth: Mapping[str, Any] | None) -> str | None:
    if not auth:
        return None
    keys = set(auth)
    if keys == {"token"} and auth["token"]:
        return f"Bearer {auth['token']}"
    if keys == {"username", "password"} and auth["username"] and auth["password"]:
        pair = f"{auth['username']}:{auth['password']}".encode()
        return f"Basic {base64.standard_b64encode(pair).decode()}"
    # Names the keys, never their values.
    raise ValueError(f"'auth' needs a 'token', or a 'username' and a 'password'; got keys {sorted(keys)}")


def _s3(s3: Mapping[str, Any] | None) -> tuple[tuple[str, str], ...]:
    unknown = sorted(set(s3 or {}) - set(S3_SETTINGS))
    if unknown:
        raise ValueError(f"unknown 's3' settings {unknown}: choose from {list(S3_SETTINGS)}")
    return tuple(sorted((key, str(value)) for key, value in (s3 or {}).items() if value))


def _environment(http: Mapping[str, Any] | None) -> tuple[tuple[str, str], ...]:
    """MLflow's variables for the request's ``http`` settings, and telemetry off."""
    unknown = sorted(set(http or {}) - HTTP_SETTINGS.keys())
    if unknown:
        raise ValueError(f"unknown 'http' settings {unknown}: choose from {sorted(HTTP_SETTINGS)}")
    values = [TELEMETRY_OFF]
    for key, value in (http or {}).items():
        variable, kind = HTTP_SETTINGS[key]
        try:
            values.append((variable, str(kind(value))))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"'http' setting {key!r} must be a {kind.__name__}, got {value!r}") from exc
    return tuple(sorted(values))


class _Active:
    """The settings of the blocks open in this process, and who holds them."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._holders: Counter[int] = Counter()  # thread id -> open blocks
        self._saved: dict[str, str | None] = {}
        self.settings: Settings | None = None

    @contextlib.contextmanager
    def use(self, settings: Settings) -> Iterator[None]:
        me = threading.get_ident()
        with self._changed:
            while self.settings is not None and self.settings != settings:
                if self._holders[me]:
                    raise RuntimeError("this thread has an MLflow block with other connection settings open")
                self._changed.wait()
            if self.settings is None:
                self._saved = {variable: os.environ.get(variable) for variable, _ in settings.environment}
                os.environ.update(settings.environment)
                self.settings = settings
            self._holders[me] += 1
        try:
            yield
        finally:
            with self._changed:
                self._holders[me] -= 1
                if self._holders[me] == 0:
                    del self._holders[me]
                if not self._holders:
                    for variable, value in self._saved.items():
                        if value is None:
                            os.environ.pop(variable, None)
                        else:
                            os.environ[variable] = value
                    self.settings = None
                    self._changed.notify_all()


ACTIVE = _Active()


@contextlib.contextmanager
def mlflow_calls(request: Mapping[str, Any] | StepRequest) -> Iterator[None]:
    """Apply the request's ``auth``, ``s3`` and ``http`` settings to MLflow calls made inside the block.

    A server that stays unreachable, or keeps failing with 5xx, after the retries becomes
    ``MlflowUnavailableError`` naming it and the number of tries.
    """
    if isinstance(request, StepRequest):
        request = request.to_dict()
    settings = Settings.from_request(request)
    with ACTIVE.use(settings):
        # Imported inside the block: MLflow decides at import whether to start its telemetry.
        import requests
        from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MlflowException as exc:
            # MLflow wraps the transport's error (refused, timed out, retries exhausted on 5xx).
            cause = exc.__cause__ or exc.__context__
            if not isinstance(cause, requests.RequestException):
                raise
            # What MLflow used: the request's setting, else the environment's, else MLflow's default.
            tries = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() + 1
            raise MlflowUnavailableError(
                f"MLflow at {request.get('tracking_uri')} is unavailable after {tries} tries: {exc.message}"
            ) from exc


def mlflow_step(function: Callable[[Request], Result]) -> Callable[[Request], Result]:
    """Run a step (request in, result out) inside ``mlflow_calls(request)``."""

    @functools.wraps(function)
    def step(request: Request) -> Result:
        with mlflow_calls(request):
            return function(request)

    return step


class SessionClient:
    """An ``MlflowClient`` whose every call runs inside ``mlflow_calls(config)``: what a hook hands out."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self._config = dict(config)
        uri = config["tracking_uri"]
        with mlflow_calls(self._config):  # MLflow's first import, if this is it, sees telemetry off
            import mlflow

            self._client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)

    def __repr__(self) -> str:
        return f"SessionClient({self._config['tracking_uri']!r})"

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            with mlflow_calls(self._config):
                return attribute(*args, **kwargs)

        return call
