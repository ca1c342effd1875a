"""Train and register through a real ``mlflow server`` whose artefacts live on S3 (moto's server).

The tracking server keeps runs and the registry in SQLite and proxies artefacts
(``--serve-artifacts``) to a bucket on ``moto_server``; the AWS settings go to the server process
only. Faults: the server stopped before a registration, which fails after its retries with a message
naming the server and leaves the registry as it was; and a server that goes down (answers 503)
right after creating the version, which leaves that version without an alias until the retry
adopts it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import mlflow
import pytest

from airloop.steps import registry
from airloop.steps.data import generate, write_table
from airloop.steps.train import MlflowUnavailableError, train

BIN = Path(sys.executable).parent
BUCKET = "airloop-artefacts"
MODEL = "airloop-server-test"
TAGS = {"airflow.dag_id": "airloop_loop", "airflow.run_id": "manual__1", "airflow.task_id": "train",
        "airflow.map_index": "-1"}
# Few, short retries so the fault surfaces in seconds; MLflow's defaults back off for minutes.
FAST_FAIL = {"max_retries": 2, "backoff_factor": 1, "backoff_jitter": 0, "timeout": 10}
# Generous: a loaded 2-core CI machine has needed minutes to import MLflow twice (CLI, then uvicorn).
STARTUP_SECONDS = 300
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args: list[str], env: dict[str, str], health: str, log: Path) -> subprocess.Popen:
    # A process group of its own: the MLflow server forks workers that must stop with it.
    with open(log, "ab") as out:
        process = subprocess.Popen(args, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{args[0]} exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(health, timeout=2).status_code < 500:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    _stop(process)
    raise RuntimeError(
        f"{args[0]} did not answer {health} within {STARTUP_SECONDS} s: {log.read_text()[-2000:]}"
    )


def _stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class MlflowServer:
    def __init__(self, root: Path, s3_endpoint: str) -> None:
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.args = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                     "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                     "--serve-artifacts", "--artifacts-destination", f"s3://{BUCKET}/mlflow"]
        # No background job runner: the tests use none, and it is one more process importing MLflow.
        self.env = {**AWS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_DISABLE_TELEMETRY": "true",
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.log = root / "mlflow-server.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = _start(self.args, self.env, f"{self.uri}/health", self.log)

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
            self.process = None


class _FailAfterVersionCreated(BaseHTTPRequestHandler):
    """Forwards to the tracking server until a model version is created, then answers 503 to all."""

    def _forward(self) -> None:
        proxy = self.server
        if proxy.down:
            self.send_error(503, "tracking server went down")
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        reply = httpx.request(self.command, proxy.target + self.path, content=body, headers=headers,
                              timeout=30)
        proxy.down = self.path.endswith("/model-versions/create")
        self.send_response(reply.status_code)
        for key, value in reply.headers.items():
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(reply.content)))
        self.end_headers()
        self.wfile.write(reply.content)

    do_GET = do_POST = do_PATCH = do_DELETE = _forward

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def failing_proxy(server):
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _FailAfterVersionCreated)
    proxy.target, proxy.down = server.uri, False
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{proxy.server_address[1]}"
    proxy.shutdown()
    proxy.server_close()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import boto3

    root = tmp_path_factory.mktemp("moto")
    endpoint = f"http://127.0.0.1:{_free_port()}"
    port = endpoint.rsplit(":", 1)[1]
    process = _start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", port], AWS, f"{endpoint}/moto-api/",
                     root / "moto.log")
    # Credentials passed to this one client, never set in the test process's environment.
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    yield {"endpoint": endpoint, "client": client}
    _stop(process)


@pytest.fixture(scope="module")
def server(s3, tmp_path_factory):
    mlflow_server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), s3["endpoint"])
    mlflow_server.start()
    yield mlflow_server
    mlflow_server.stop()


def _train(server: MlflowServer, data: str, tags: dict[str, str]) -> dict:
    return train({"tracking_uri": server.uri, "artifact_root": "mlflow-artifacts:",
                  "experiment": "server-test", "data_uri": data,
                  "estimator": "sklearn.linear_model.LogisticRegression", "tags": tags,
                  "reference_rows": 100, "http": FAST_FAIL})


def _register(server: MlflowServer, trained: dict, uri: str | None = None) -> dict:
    return registry.register({"tracking_uri": uri or server.uri, "model_name": MODEL,
                              "run_id": trained["run_id"], "model_uri": trained["model_uri"], "tags": TAGS,
                              "http": FAST_FAIL})


def test_server_with_s3_artefacts_survives_a_stop_without_half_registrations(server, s3, tmp_path):
    data = write_table(generate(800, seed=2), str(tmp_path / "train.parquet"))
    first = _train(server, data, TAGS)
    assert first["reused"] is False
    keys = [item["Key"] for item in s3["client"].list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert any(key.endswith("holdout.parquet") for key in keys), keys
    assert any(key.endswith("MLmodel") for key in keys), keys
    assert _register(server, first) == {"version": "1", "alias": "champion", "reused": False}

    # The same task run twice: same run, same version.
    again = _train(server, data, {**TAGS, "airflow.try_number": "2"})
    assert again["run_id"] == first["run_id"] and again["reused"] is True
    assert _register(server, again) == {"version": "1", "alias": "champion", "reused": True}

    second = _train(server, data, {**TAGS, "airflow.run_id": "manual__2"})
    server.stop()
    message = rf"MLflow server at {server.uri} is unavailable after 2 retries"
    with pytest.raises(MlflowUnavailableError, match=message):
        _register(server, second)
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ

    server.start()
    client = mlflow.MlflowClient(server.uri)
    assert [v.version for v in client.search_model_versions(f"name = '{MODEL}'")] == ["1"]
    assert registry.aliases(server.uri, MODEL) == {"champion": "1"}
    assert _register(server, second) == {"version": "2", "alias": "challenger", "reused": False}
    assert _register(server, second) == {"version": "2", "alias": "challenger", "reused": True}
    assert registry.aliases(server.uri, MODEL) == {"champion": "1", "challenger": "2"}
    assert client.get_model_version(MODEL, "2").status == "READY"


def test_server_down_between_version_and_alias_leaves_no_dangling_alias(server, failing_proxy, tmp_path):
    data = write_table(generate(800, seed=4), str(tmp_path / "train.parquet"))
    third = _train(server, data, {**TAGS, "airflow.run_id": "manual__3"})
    before = registry.aliases(server.uri, MODEL)
    with pytest.raises(MlflowUnavailableError, match=rf"MLflow server at {failing_proxy} is unavailable"):
        _register(server, third, uri=failing_proxy)
    client = mlflow.MlflowClient(server.uri)
    (created,) = client.search_model_versions(f"name = '{MODEL}' AND run_id = '{third['run_id']}'")
    # The version is complete (ready, tagged) but nothing points at it: the aliases did not move.
    assert created.status == "READY" and created.tags["airloop.run_id"] == third["run_id"]
    assert registry.aliases(server.uri, MODEL) == before
    assert created.version not in before.values()
    # The retry adopts that version instead of creating another.
    assert _register(server, third) == {"version": created.version, "alias": "challenger", "reused": True}
    assert len(client.search_model_versions(f"name = '{MODEL}' AND run_id = '{third['run_id']}'")) == 1
