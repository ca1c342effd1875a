"""How steps reach MLflow: a connection's settings applied per block, never through os.environ."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import pytest

from airloop.steps.training.select import select_best
from airloop.tracking.session import ACTIVE, MlflowUnavailableError, Settings, mlflow_calls

TOKEN = "tok-3f9a"


class _Recorder(BaseHTTPRequestHandler):
    """An MLflow REST stand-in: records each request's Authorization header and the process's
    environment at that moment, and answers every search with no experiments."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append(
            {"authorization": self.headers.get("Authorization"), "environ": dict(os.environ)}
        )
        body = json.dumps({"experiments": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.seen, server.uri = [], f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_http_settings_and_telemetry_opt_out_apply_inside_the_block_only(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    with mlflow_calls({"http": {"max_retries": 1, "timeout": 3}}):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"
        assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert "MLFLOW_DISABLE_TELEMETRY" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "120"


def test_bad_settings_are_named_and_secrets_are_not():
    with pytest.raises(ValueError, match=r"unknown 'http' settings \['retries'\]"):
        Settings.from_request({"http": {"retries": 1}})
    with pytest.raises(ValueError, match="'backoff_factor' must be a int"):
        Settings.from_request({"http": {"backoff_factor": "soon"}})
    with pytest.raises(ValueError, match=r"unknown 's3' settings \['secret'\]"):
        Settings.from_request({"s3": {"secret": "x"}})
    with pytest.raises(ValueError, match=r"got keys \['password'\]") as raised:
        Settings.from_request({"auth": {"password": "hunter2"}})
    assert "hunter2" not in str(raised.value)
    settings = Settings.from_request({"auth": {"token": TOKEN}, "s3": {"aws_secret_access_key": "s3cr3t"}})
    assert TOKEN not in repr(settings) and "s3cr3t" not in repr(settings)


def test_auth_header_reaches_the_server_inside_the_block_only(recorder, monkeypatch):
    for variable in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(variable, raising=False)
    client = mlflow.MlflowClient(recorder.uri)
    with mlflow_calls({"tracking_uri": recorder.uri, "auth": {"token": TOKEN}}):
        client.search_experiments(max_results=1)
    with mlflow_calls({"tracking_uri": recorder.uri, "auth": {"username": "ada", "password": "pw:1"}}):
        client.search_experiments(max_results=1)
    client.search_experiments(max_results=1)
    # base64("ada:pw:1") == "YWRhOnB3OjE="
    assert [seen["authorization"] for seen in recorder.seen] == [
        f"Bearer {TOKEN}",
        "Basic YWRhOnB3OjE=",
        None,
    ]
    # While the requests were made, the credentials were nowhere in the process's environment.
    for seen in recorder.seen:
        assert not any(TOKEN in value or "pw:1" in value for value in seen["environ"].values())
        assert not {"MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD"} & seen["environ"].keys()


def test_blocks_with_other_settings_wait_and_equal_ones_share():
    first, other = {"auth": {"token": "a"}}, {"auth": {"token": "b"}}
    order = []

    def other_block() -> None:
        with mlflow_calls(other):
            order.append("other")

    with mlflow_calls(first):
        with mlflow_calls(first):  # nesting equal settings is fine
            waiting = threading.Thread(target=other_block)
            waiting.start()
            time.sleep(0.3)
            order.append("first")
            assert ACTIVE.settings == Settings.from_request(first)
        with pytest.raises(RuntimeError, match="other connection settings open"):
            with mlflow_calls(other):
                pass
    waiting.join(timeout=10)
    assert order == ["first", "other"] and ACTIVE.settings is None


def test_unreachable_server_fails_fast_with_a_message_naming_it_and_the_tries():
    # Nothing listens on port 9 of localhost: the connection is refused at once.
    request = {
        "tracking_uri": "http://127.0.0.1:9",
        "http": {"max_retries": 1, "backoff_factor": 0},
        "run_ids": ["x"],
    }
    message = r"MLflow at http://127\.0\.0\.1:9 is unavailable after 2 tries"
    with pytest.raises(MlflowUnavailableError, match=message):
        select_best(request)
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
