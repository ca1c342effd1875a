"""Train and register through a real ``mlflow server`` whose artefacts live on S3 (moto's server).

The tracking server keeps runs and the registry in SQLite and proxies artefacts
(``--serve-artifacts``) to a bucket on ``moto_server``; the AWS settings go to the server process
only. Faults: the server stopped before a registration, which fails after its retries with a message
naming the server and leaves the registry as it was; a server that goes down (answers 503) right
after creating the version, which leaves that version without an alias until the retry adopts it;
and a create the server committed but answered with 503, which MLflow's client sends again.

Credentials from Airflow connections, never from the environment: a tracking store in-process whose
``s3://`` artefacts the steps write with an ``aws`` connection's keys and endpoint, and a second
server started with MLflow's basic-auth app that the operators reach with the connection's login.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import mlflow
import pytest

from airloop.embedded.demo import generate
from airloop.hooks.mlflow import MlflowHook
from airloop.ports import free_port
from airloop.steps.training.register import register
from airloop.steps.training.train import train
from airloop.tables import write_table
from airloop.tracking import registry
from airloop.tracking.models import load_model
from airloop.tracking.session import MlflowUnavailableError
from tests.fakes.context import task_context

BIN = Path(sys.executable).parent
BUCKET = "airloop-artefacts"
MODEL = "airloop-server-test"
TAGS = {
    "airflow.dag_id": "airloop_loop",
    "airflow.run_id": "manual__1",
    "airflow.task_id": "train",
    "airflow.map_index": "-1",
}
# Few, short retries so the fault surfaces in seconds; MLflow's defaults back off for minutes.
FAST_FAIL = {"max_retries": 2, "backoff_factor": 1, "backoff_jitter": 0, "timeout": 10}
# Generous: a loaded 2-core CI machine has needed minutes to import MLflow twice (CLI, then uvicorn).
STARTUP_SECONDS = 300
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _start(args: list[str], env: dict[str, str], health: str, log: Path) -> subprocess.Popen:
    # A process group of its own: the MLflow server forks workers that must stop with it.
    with open(log, "ab") as out:
        process = subprocess.Popen(
            args, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
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
    def __init__(self, root: Path, artefacts: str, env: dict[str, str], args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.args = [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            artefacts,
            *args,
        ]
        # No background job runner: the tests use none, and it is one more process importing MLflow.
        self.env = {**env, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.log = root / "mlflow-server.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = _start(self.args, self.env, f"{self.uri}/health", self.log)

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
            self.process = None


class _FaultyProxy(BaseHTTPRequestHandler):
    """Forwards to the tracking server, with the server's ``fault``: ``"down_after_create"`` answers
    503 to everything once a model version is created; ``"lose_first_create_answer"`` forwards the
    first create but answers it with 503, as a gateway that timed out on a committed write would."""

    def _forward(self) -> None:
        proxy = self.server
        if proxy.down:
            self.send_error(503, "tracking server went down")
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        reply = httpx.request(
            self.command, proxy.target + self.path, content=body, headers=headers, timeout=30
        )
        if self.path.endswith("/model-versions/create"):
            proxy.down = proxy.fault == "down_after_create"
            if proxy.fault == "lose_first_create_answer" and not proxy.lost:
                proxy.lost = True
                self.send_error(503, "gateway timed out")
                return
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
def faulty_proxy(server):
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _FaultyProxy)
    proxy.target, proxy.down, proxy.fault, proxy.lost = server.uri, False, None, False
    proxy.uri = f"http://127.0.0.1:{proxy.server_address[1]}"
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()


@pytest.fixture(scope="module")
def s3(moto_s3: dict) -> dict:
    moto_s3["client"].create_bucket(Bucket=BUCKET)
    return moto_s3


@pytest.fixture(scope="module")
def server(s3, tmp_path_factory):
    mlflow_server = MlflowServer(
        tmp_path_factory.mktemp("mlflow-server"),
        f"s3://{BUCKET}/mlflow",
        {**AWS, "MLFLOW_S3_ENDPOINT_URL": s3["endpoint"]},
    )
    mlflow_server.start()
    yield mlflow_server
    mlflow_server.stop()


def _train(server: MlflowServer, data: str, tags: dict[str, str]) -> dict:
    return train(
        {
            "tracking_uri": server.uri,
            "artifact_root": "mlflow-artifacts:",
            "experiment": "server-test",
            "data_uri": data,
            "estimator": "sklearn.linear_model.LogisticRegression",
            "tags": tags,
            "reference_rows": 100,
            "http": FAST_FAIL,
        }
    )


def _register(server: MlflowServer, trained: dict, uri: str | None = None) -> dict:
    return register(
        {
            "tracking_uri": uri or server.uri,
            "model_name": MODEL,
            "run_id": trained["run_id"],
            "model_uri": trained["model_uri"],
            "tags": TAGS,
            "http": FAST_FAIL,
        }
    )


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
    message = rf"MLflow at {server.uri} is unavailable after 3 tries"
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


def test_server_down_between_version_and_alias_leaves_no_dangling_alias(server, faulty_proxy, tmp_path):
    data = write_table(generate(800, seed=4), str(tmp_path / "train.parquet"))
    third = _train(server, data, {**TAGS, "airflow.run_id": "manual__3"})
    before = registry.aliases(server.uri, MODEL)
    faulty_proxy.fault = "down_after_create"
    with pytest.raises(MlflowUnavailableError, match=rf"MLflow at {faulty_proxy.uri} is unavailable"):
        _register(server, third, uri=faulty_proxy.uri)
    client = mlflow.MlflowClient(server.uri)
    (created,) = client.search_model_versions(f"name = '{MODEL}' AND run_id = '{third['run_id']}'")
    # The version is complete (ready, tagged) but nothing points at it: the aliases did not move.
    assert created.status == "READY" and created.tags["airloop.run_id"] == third["run_id"]
    assert registry.aliases(server.uri, MODEL) == before
    assert created.version not in before.values()
    # The retry adopts that version instead of creating another.
    assert _register(server, third) == {"version": created.version, "alias": "challenger", "reused": True}
    assert len(client.search_model_versions(f"name = '{MODEL}' AND run_id = '{third['run_id']}'")) == 1


def test_a_create_answered_with_503_after_it_committed_leaves_one_version(server, faulty_proxy, tmp_path):
    data = write_table(generate(800, seed=6), str(tmp_path / "train.parquet"))
    fourth = _train(server, data, {**TAGS, "airflow.run_id": "manual__4"})
    faulty_proxy.fault = "lose_first_create_answer"
    registered = _register(server, fourth, uri=faulty_proxy.uri)
    assert faulty_proxy.lost and registered["reused"] is False and registered["alias"] == "challenger"
    # MLflow's client sent the create again and the server committed it twice: one version is left.
    client = mlflow.MlflowClient(server.uri)
    versions = client.search_model_versions(f"name = '{MODEL}' AND run_id = '{fourth['run_id']}'")
    assert [v.version for v in versions] == [registered["version"]]
    assert registry.aliases(server.uri, MODEL)["challenger"] == registered["version"]


def test_steps_write_s3_artefacts_with_the_aws_connection_not_the_environment(s3, tmp_path, monkeypatch):
    # No ambient AWS identity for boto3 to fall back on: only the connection's keys can work.
    for variable in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "MLFLOW_S3_ENDPOINT_URL",
    ):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_MOTO",
        json.dumps(
            {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {"endpoint_url": s3["endpoint"], "region_name": "us-east-1"},
            }
        ),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_S3",
        json.dumps(
            {
                "conn_type": "mlflow",
                "host": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "extra": {"artifact_root": f"s3://{BUCKET}/client", "aws_conn_id": "aws_moto"},
            }
        ),
    )
    hook = MlflowHook(mlflow_conn_id="mlflow_s3")
    data = write_table(generate(600, seed=8), str(tmp_path / "train.parquet"))
    trained = train(
        {
            **hook.step_config(),
            "experiment": "client-s3",
            "data_uri": data,
            "estimator": "sklearn.linear_model.LogisticRegression",
            "reference_rows": 50,
        }
    )
    listed = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="client/").get("Contents", [])
    keys = [item["Key"] for item in listed]
    assert any(key.endswith("/MLmodel") for key in keys)
    assert any(key.endswith("holdout.parquet") for key in keys)
    with hook.session():
        model = load_model(hook.tracking_uri, trained["model_uri"])
    assert model.predict(generate(5, seed=1).drop(columns=["label"])).shape == (5,)
    # Outside a block MLflow has neither the keys nor the endpoint.
    with pytest.raises(Exception, match="credentials"):
        load_model(hook.tracking_uri, trained["model_uri"])


ADMIN = ("admin", "airloop-Admin-pw1")


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-auth")
    config = root / "basic_auth.ini"
    config.write_text(f"""[mlflow]
default_permission = READ
database_uri = sqlite:///{root / "auth.db"}
admin_username = {ADMIN[0]}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
""")
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "airloop-test",
    }
    mlflow_server = MlflowServer(root, str(root / "artefacts"), env, ("--app-name", "basic-auth"))
    mlflow_server.start()
    yield mlflow_server
    mlflow_server.stop()


def test_operators_reach_a_basic_auth_server_with_the_connections_login(auth_server, tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException

    from airloop.operators.mlflow import MlflowRegisterModelOperator, MlflowTrainModelOperator

    for variable in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    conn = {
        "conn_type": "mlflow",
        "host": auth_server.uri,
        "login": ADMIN[0],
        "password": ADMIN[1],
        "extra": {"artifact_root": "mlflow-artifacts:", **FAST_FAIL},
    }
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_AUTH", json.dumps(conn))
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_WRONG", json.dumps({**conn, "password": "not-it"}))

    ok, message = MlflowHook(mlflow_conn_id="mlflow_wrong").test_connection()
    assert not ok and "401" in message
    assert message.startswith(f"MLflow at {auth_server.uri} returned an error")
    hook = MlflowHook(mlflow_conn_id="mlflow_auth")
    assert hook.test_connection() == (True, f"Connected to MLflow at {auth_server.uri}")
    with pytest.raises(MlflowException, match="401"):
        mlflow.MlflowClient(auth_server.uri).search_experiments()

    watched = ("AWS_", "MLFLOW_TRACKING_")
    before = {k: v for k, v in os.environ.items() if k.startswith(watched)}
    data = write_table(generate(800, seed=9), str(tmp_path / "train.parquet"))
    trained = MlflowTrainModelOperator(
        task_id="train",
        mlflow_conn_id="mlflow_auth",
        data_uri=data,
        experiment="auth-test",
        estimator="sklearn.linear_model.LogisticRegression",
    ).execute(task_context("train", dag_id="auth"))
    registered = MlflowRegisterModelOperator(
        task_id="register",
        mlflow_conn_id="mlflow_auth",
        model_name="auth-model",
        run_id=trained["run_id"],
    ).execute(task_context("register", dag_id="auth"))
    assert registered == {"version": "1", "alias": "champion", "reused": False}
    assert {k: v for k, v in os.environ.items() if k.startswith(watched)} == before
    # The password is in the variables that define the connections here, and nowhere else.
    assert {key for key, value in os.environ.items() if ADMIN[1] in value} == {"AIRFLOW_CONN_MLFLOW_AUTH"}

    # Runs, proxied artefacts and the audit record, read back with the connection.
    assert hook.client.get_run(trained["run_id"]).data.tags["airflow.dag_id"] == "auth"
    with hook.session():
        audit = registry.read_audit(auth_server.uri, "auth-model", "1")
        model = load_model(auth_server.uri, trained["model_uri"])
    assert [stage["stage"] for stage in audit["stages"]] == ["trigger", "data", "validation", "training"]
    assert audit["stages"][1]["record"]["uri"] == data and audit["stages"][1]["record"]["rows"] == 800
    assert model.predict(generate(3, seed=1).drop(columns=["label"])).shape == (3,)
