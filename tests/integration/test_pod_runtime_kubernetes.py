"""The ``kubernetes`` runtime against a Kubernetes API served here and an S3 served by moto.

The API (``tests.fakes.kubernetes``) implements the core/v1 pod endpoints that KubernetesPodOperator
calls: create, read, list by label selector, patch labels, delete, and pod events. It has no nodes and
no scheduler, like an API server alone: a created pod stays Pending and never runs, so the step never
runs there. What is checked is everything up to that point: the pod the operator creates through the
Airflow ``kubernetes`` connection, its spec, and that the task fails naming the pod and the pod is
deleted afterwards.

The other half of the hop runs for real: the pod's entrypoint as a process with only the credentials a
pod would get (environment from a Secret), publishing the step's output folder to S3 (``moto_server``),
and the worker collecting it through its Airflow ``aws`` connection.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException

from airloop.embedded.demo import generate
from airloop.operators.great_expectations import GreatExpectationsValidateDataOperator
from airloop.runtimes import pod
from airloop.tables import write_table
from tests.fakes.context import task_context
from tests.fakes.kubernetes import FakeKubernetes, serving

TOKEN, NAMESPACE = "pod-test-token", "ml-steps"
SUITE = str(Path(__file__).resolve().parents[2] / "dags" / "expectations" / "training_data.json")
BUCKET = "airloop"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def kube(monkeypatch) -> Iterator[FakeKubernetes]:
    server = FakeKubernetes()
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", server.connection(TOKEN))
    with serving(server):
        yield server


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
    context = task_context("validate", dag_id="airloop_loop")
    ti = context["ti"]
    with pytest.raises(AirflowException, match=r"Pod validate-\w+ returned a failure") as failure:
        operator.execute(context)
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
    assert ("DELETE", f"/api/v1/namespaces/{NAMESPACE}/pods/{pod['metadata']['name']}", 200) in kube.served
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


def test_killing_the_task_deletes_its_pod(kube, monkeypatch):
    import threading
    import time

    from airloop.operators.base import StepOperator

    monkeypatch.setenv("AIRLOOP_ARTEFACTS", "s3://airloop/artefacts")
    operator = StepOperator(
        task_id="validate",
        runtime="kubernetes",
        # Long enough that only on_kill ends the wait for a node.
        pod_settings={
            "namespace": NAMESPACE,
            "schedule_timeout_seconds": 300,
            "startup_check_interval_seconds": 1,
        },
    )
    context = task_context("validate", dag_id="airloop_loop")
    outcome: dict[str, Any] = {}

    def execute() -> None:
        try:
            outcome["result"] = operator.run_step(
                "airloop.steps.data.validate:validate",
                {"data_uri": "s3://airloop/data/train.parquet"},
                context,
            )
        except Exception as error:  # what the task sees once its pod is gone
            outcome["error"] = error

    task = threading.Thread(target=execute)
    task.start()
    deadline = time.monotonic() + 60
    while not kube.pods and task.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    ((namespace, name),) = kube.pods
    operator.on_kill()
    assert ("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", 200) in kube.served
    assert kube.pods == {}
    task.join(timeout=120)
    assert not task.is_alive() and "result" not in outcome
