"""The ``kubernetes`` runtime against a Kubernetes API served here and an S3 served by moto.

The API (the pattern of test_seldon_kubernetes.py) implements the core/v1 pod endpoints that
KubernetesPodOperator calls: create, read, list by label selector, patch labels, delete, and pod events.
It has no nodes and no scheduler, like an API server alone: a created pod stays Pending and never runs,
so the step never runs there. What is checked is everything up to that point: the pod the operator
creates through the Airflow ``kubernetes`` connection, its spec, and that the task fails naming the pod
and the pod is deleted afterwards.

The other half of the hop runs for real: the pod's entrypoint as a process with only the credentials a
pod would get (environment from a Secret), publishing the step's output folder to S3 (``moto_server``),
and the worker collecting it through its Airflow ``aws`` connection.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from airflow.sdk.exceptions import AirflowException

from airloop.embedded.demo import generate
from airloop.operators.great_expectations import GreatExpectationsValidateDataOperator
from airloop.runtimes import pod
from airloop.tables import write_table

TOKEN, NAMESPACE = "pod-test-token", "ml-steps"
SUITE = str(Path(__file__).resolve().parents[2] / "dags" / "expectations" / "training_data.json")
BUCKET = "airloop"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/(pods|events)(?:/([^/]+))?$")


class FakeKubernetes(ThreadingHTTPServer):
    """Pods that are accepted and stay Pending: an API server with no node to run them."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _PodHandler)
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.created: list[dict[str, Any]] = []
        self.calls: list[tuple[str, str]] = []
        self.authorizations: set[str] = set()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def _selected(labels: dict[str, str], selector: str) -> bool:
    """Equality, inequality and absence terms of a label selector, as KubernetesPodOperator writes them."""
    for term in filter(None, selector.split(",")):
        if term.startswith("!"):
            if term[1:] in labels:
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        else:
            key, value = term.split("=", 1)
            if labels.get(key) != value:
                return False
    return True


class _PodHandler(BaseHTTPRequestHandler):
    server: FakeKubernetes

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self) -> tuple[str, str, str | None, dict[str, list[str]]] | None:
        url = urlparse(self.path)
        self.server.calls.append((self.command, url.path))
        self.server.authorizations.add(self.headers.get("Authorization", ""))
        match = PODS.match(url.path)
        if not match:
            self._answer(404, {"kind": "Status", "code": 404, "message": f"no route {url.path}"})
            return None
        return match.group(1), match.group(2), match.group(3), parse_qs(url.query)

    def _body(self) -> Any:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")

    def _missing(self, name: str) -> None:
        self._answer(
            404, {"kind": "Status", "code": 404, "reason": "NotFound", "message": f'pods "{name}" not found'}
        )

    def do_POST(self) -> None:
        route = self._route()
        if route is None:
            return
        namespace, _, _, _ = route
        pod = self._body()
        with self.server.lock:
            self.server.created.append(json.loads(json.dumps(pod)))
            name = pod["metadata"]["name"]
            pod["metadata"].update(namespace=namespace, uid=f"uid-{name}", resourceVersion="1")
            pod["status"] = {"phase": "Pending"}  # no node, no scheduler: never PodScheduled
            self.server.pods[(namespace, name)] = pod
        self._answer(201, pod)

    def do_GET(self) -> None:
        route = self._route()
        if route is None:
            return
        namespace, kind, name, query = route
        if kind == "events":
            return self._answer(200, {"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": []})
        with self.server.lock:
            if name is None:
                selector = query.get("labelSelector", [""])[0]
                items = [
                    pod
                    for (ns, _), pod in self.server.pods.items()
                    if ns == namespace and _selected(pod["metadata"].get("labels", {}), selector)
                ]
                return self._answer(
                    200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
                )
            pod = self.server.pods.get((namespace, name))
        if pod is None:
            return self._missing(name)
        self._answer(200, pod)

    def do_PATCH(self) -> None:
        route = self._route()
        if route is None:
            return
        namespace, _, name, _ = route
        patch = self._body()
        with self.server.lock:
            pod = self.server.pods.get((namespace, name))
            if pod is not None:
                pod["metadata"].setdefault("labels", {}).update(patch.get("metadata", {}).get("labels", {}))
        if pod is None:
            return self._missing(name)
        self._answer(200, pod)

    def do_DELETE(self) -> None:
        route = self._route()
        if route is None:
            return
        namespace, _, name, _ = route
        with self.server.lock:
            pod = self.server.pods.pop((namespace, name), None)
        if pod is None:
            return self._missing(name)
        self._answer(200, pod)


@pytest.fixture
def kube(monkeypatch) -> Iterator[FakeKubernetes]:
    server = FakeKubernetes()
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server.url}}],
        "users": [{"name": "test", "user": {"token": TOKEN}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }
    monkeypatch.setenv(
        "AIRFLOW_CONN_KUBERNETES_DEFAULT",
        json.dumps({"conn_type": "kubernetes", "extra": {"kube_config": kubeconfig}}),
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class _TaskInstance:
    dag_id, task_id, run_id, map_index, try_number = "airloop_loop", "validate", "manual__1", -1, 1

    def __init__(self) -> None:
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


def test_a_step_operator_starts_its_step_as_a_pod_through_kubernetes_pod_operator(kube, monkeypatch):
    monkeypatch.setenv("AIRLOOP_ARTEFACTS", "s3://airloop/artefacts")
    monkeypatch.setenv("AIRLOOP_POD_IMAGE", "registry.example/airloop/airflow:0.1.0")
    operator = GreatExpectationsValidateDataOperator(
        task_id="validate",
        data_uri="s3://airloop/data/train.parquet",
        suite_path=SUITE,
        runtime="kubernetes",
        pod_settings={
            "namespace": NAMESPACE,
            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
            # No node will take the pod: give up after a second instead of two minutes.
            "schedule_timeout_seconds": 1,
            "startup_check_interval_seconds": 1,
        },
    )
    ti = _TaskInstance()
    with pytest.raises(AirflowException, match=r"Pod validate-\w+ returned a failure") as failure:
        operator.execute({"ti": ti, "run_id": ti.run_id, "dag": None})
    assert "'phase': 'Pending'" in str(failure.value)  # it never left Pending: nothing ran

    assert kube.authorizations == {f"Bearer {TOKEN}"}  # the Airflow kubernetes connection's credentials
    (pod,) = kube.created
    assert pod["metadata"]["namespace"] == NAMESPACE
    assert ti.xcom["pod_name"] == pod["metadata"]["name"] and ti.xcom["pod_namespace"] == NAMESPACE
    labels = pod["metadata"]["labels"]
    assert (labels["dag_id"], labels["task_id"], labels["run_id"], labels["try_number"]) == (
        "airloop_loop",
        "validate",
        "manual__1",
        "1",
    )
    step, sidecar = pod["spec"]["containers"]
    assert step["image"] == "registry.example/airloop/airflow:0.1.0"
    assert step["command"] == ["python", "-m", "airloop.runtimes.pod"]
    request = json.loads(step["args"][0])
    assert request["step"] == "airloop.steps.data.validate:validate"
    assert request["request"]["data_uri"] == "s3://airloop/data/train.parquet"
    # The operator's local Data Docs folder is not in the pod's request: the pod publishes it here.
    assert "docs_dir" not in request["request"]
    assert request["outputs"] == {"docs_dir": "pods/airloop_loop/manual__1/validate/try-1/docs_dir"}
    assert step["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"}}
    assert {e["name"]: e["value"] for e in step["env"]} == {
        "CI": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "AIRLOOP_ARTEFACTS": "s3://airloop/artefacts",
    }
    assert sidecar["name"] == "airflow-xcom-sidecar"
    assert {"mountPath": "/airflow/xcom", "name": "xcom"} in step["volumeMounts"]
    assert TOKEN not in json.dumps(pod)
    # The pod that never ran is cleaned up: KubernetesPodOperator's default on_finish_action.
    assert ("DELETE", f"/api/v1/namespaces/{NAMESPACE}/pods/{pod['metadata']['name']}") in kube.calls
    assert kube.pods == {}


# -- the pod's side, for real: the entrypoint publishing to S3 -----------------------------------------------


@pytest.fixture
def s3(moto_s3: dict) -> Iterator[dict]:
    moto_s3["client"].create_bucket(Bucket=BUCKET)
    yield moto_s3
    for item in moto_s3["client"].list_objects_v2(Bucket=BUCKET).get("Contents", []):
        moto_s3["client"].delete_object(Bucket=BUCKET, Key=item["Key"])
    moto_s3["client"].delete_bucket(Bucket=BUCKET)


def _keys(s3: dict[str, Any], prefix: str) -> list[str]:
    listing = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def test_the_entrypoint_publishes_to_s3_and_the_worker_collects_through_its_connection(
    s3, tmp_path, monkeypatch
):
    # The worker: the artefact store on S3 through an Airflow connection; no AWS variables of its own.
    for name in AWS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AIRLOOP_ARTEFACTS", f"s3://{BUCKET}/artefacts")
    monkeypatch.setenv("AIRLOOP_ARTEFACTS_CONN_ID", "aws_artefacts")
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_ARTEFACTS",
        json.dumps(
            {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {"endpoint_url": s3["endpoint"], "region_name": "us-east-1"},
            }
        ),
    )
    local = write_table(generate(300, seed=4), str(tmp_path / "data.parquet"))
    s3["client"].upload_file(local, BUCKET, "data/train.parquet")
    folder = tmp_path / "worker" / "data_docs"
    # Data on S3; the suite travels in the request, as the operator sends it (read on the worker).
    suite = json.loads(Path(SUITE).read_text())
    request = {"data_uri": f"s3://{BUCKET}/data/train.parquet", "suite": suite, "docs_dir": str(folder)}
    envelope = pod.pod_request(
        "airloop.steps.data.validate:validate", request, "pods/loop/manual__1/validate/try-1"
    )

    # The pod: credentials and endpoint from its own environment (a Secret, pod_settings["env"]).
    xcom = tmp_path / "xcom" / "return.json"
    pod_env = {**os.environ, **AWS, "AWS_ENDPOINT_URL": s3["endpoint"], "AIRLOOP_POD_XCOM_PATH": str(xcom)}
    pod_env.pop("AIRLOOP_ARTEFACTS_CONN_ID")
    done = subprocess.run(
        [sys.executable, "-m", "airloop.runtimes.pod", json.dumps(envelope)],
        env=pod_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(xcom.read_text())
    prefix = "artefacts/pods/loop/manual__1/validate/try-1/docs_dir"
    assert _keys(s3, prefix) == [f"{prefix}/{name}" for name in answer["outputs"]["docs_dir"]["files"]]
    assert f"{prefix}/index.html" in _keys(s3, prefix)
    assert answer["result"]["docs_index"] == f"s3://{BUCKET}/{prefix}/index.html"

    result = pod.collect(answer, request)
    assert result["success"] is True and result["fingerprint"]["rows"] == 300
    assert result["docs_index"] == str(folder / "index.html")
    assert "training_data" in (folder / "index.html").read_text()
    assert _keys(s3, "artefacts/") == []  # the transfer copy is gone once the worker has the files
