"""The ``kubernetes`` runtime without a cluster: its entrypoint run as a process, the pod it asks for.

The entrypoint runs the real validate step in a subprocess, as the pod's container would, with a
file:// artefact store standing for the store pod and worker share (S3 in production). The pod spec
is the real KubernetesPodOperator's ``build_pod_request_obj``; no pod is started here (see
tests/integration/test_pod_runtime_kubernetes.py for the pod created through a Kubernetes API).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import airflow.sdk.log  # noqa: F401  # configures logging on first import: here, not mid-test under caplog
import pytest

from airloop import runtimes, settings
from airloop.embedded.demo import generate
from airloop.runtimes import pod
from airloop.steps.data.validate import validate
from airloop.tables import write_table
from tests.fakes.context import task_context

SUITE = str(Path(__file__).resolve().parents[2] / "dags" / "expectations" / "training_data.json")
STEP = "airloop.steps.data.validate:validate"
SECRET = "worker-only-secret-value"


def _entrypoint(envelope: dict[str, Any], store: Path, xcom: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "AIRLOOP_ARTEFACTS": store.as_uri(), "AIRLOOP_POD_XCOM_PATH": str(xcom)}
    return subprocess.run(
        [sys.executable, "-m", "airloop.runtimes.pod", json.dumps(envelope)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture
def worker(tmp_path, monkeypatch) -> dict[str, Path]:
    """A worker whose temp folder and artefact store are apart from the data the 'pod' reads."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "worker-tmp"))
    (tmp_path / "worker-tmp").mkdir()
    store = tmp_path / "store"
    monkeypatch.setenv("AIRLOOP_ARTEFACTS", store.as_uri())
    return {"store": store, "shared": tmp_path / "shared", "folder": tmp_path / "worker" / "data_docs"}


def test_the_entrypoint_runs_the_step_and_its_output_folder_comes_back_to_the_worker(
    worker, tmp_path, caplog
):
    data = write_table(generate(300, seed=1), str(worker["shared"] / "data.parquet"))
    request = {"data_uri": data, "suite_path": SUITE, "docs_dir": str(worker["folder"])}
    with caplog.at_level(logging.WARNING, logger="airloop.runtimes.pod"):
        envelope = pod.pod_request(STEP, request, "pods/airloop_loop/manual__1/validate/try-2")
    # The data is a worker path: allowed (a shared volume here), but said out loud.
    assert f"names {data}, a path on the Airflow worker" in caplog.text
    assert envelope == {
        "step": STEP,
        "request": {"data_uri": data, "suite_path": SUITE},
        "outputs": {"docs_dir": "pods/airloop_loop/manual__1/validate/try-2/docs_dir"},
    }

    xcom = tmp_path / "xcom" / "return.json"
    done = _entrypoint(envelope, worker["store"], xcom)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(xcom.read_text())
    transfer = worker["store"] / "pods/airloop_loop/manual__1/validate/try-2/docs_dir"
    published = answer["outputs"]["docs_dir"]
    assert published["uri"] == transfer.as_uri()
    assert "index.html" in published["files"]
    assert (
        sorted(p.relative_to(transfer).as_posix() for p in transfer.rglob("*") if p.is_file())
        == published["files"]
    )
    # In the pod the step wrote into a folder of its own; the result names the published copy.
    assert answer["result"]["docs_index"] == f"{transfer.as_uri()}/index.html"

    result = pod.collect(answer, request)
    here = validate({"data_uri": data, "suite_path": SUITE})
    assert {k: v for k, v in result.items() if k != "docs_index"} == {
        k: v for k, v in here.items() if k != "docs_index"
    }
    assert result["docs_index"] == str(worker["folder"] / "index.html")
    assert "training_data" in Path(result["docs_index"]).read_text()
    assert (
        sorted(p.relative_to(worker["folder"]).as_posix() for p in worker["folder"].rglob("*") if p.is_file())
        == published["files"]
    )
    assert not transfer.exists()  # the transfer copy is removed once the worker has it


def test_a_failing_step_exits_non_zero_and_writes_no_result(worker, tmp_path):
    envelope = {
        "step": STEP,
        "request": {"data_uri": "s3://airloop/none.parquet", "suite_path": str(tmp_path / "missing.json")},
        "outputs": {"docs_dir": "pods/d/r/t/try-1/docs_dir"},
    }
    xcom = tmp_path / "xcom" / "return.json"
    done = _entrypoint(envelope, worker["store"], xcom)
    assert done.returncode == 1
    assert "suite file" in done.stderr and "missing.json cannot be read" in done.stderr
    assert not xcom.parent.exists() or not any(xcom.parent.iterdir())
    assert not [p for p in worker["store"].rglob("*") if p.is_file()]


def test_the_entrypoint_refuses_a_request_without_a_step(tmp_path):
    done = _entrypoint({"request": {}}, tmp_path / "store", tmp_path / "return.json")
    assert done.returncode == 1 and "needs 'step' ('module:function')" in done.stderr
    done = subprocess.run([sys.executable, "-m", "airloop.runtimes.pod"], capture_output=True, text=True)
    assert done.returncode != 0 and "usage: python -m airloop.runtimes.pod" in done.stderr


# -- the pod it asks for -------------------------------------------------------------------------------------


@pytest.fixture
def cluster(monkeypatch) -> None:
    """A ``kubernetes`` connection (never called here) and worker credentials that must stay on the worker."""
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "test", "user": {"token": SECRET}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }
    monkeypatch.setenv(
        "AIRFLOW_CONN_KUBERNETES_DEFAULT",
        json.dumps(
            {"conn_type": "kubernetes", "extra": {"kube_config": kubeconfig, "namespace": "from-connection"}}
        ),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT", json.dumps({"conn_type": "aws", "login": "key", "password": SECRET})
    )
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AIRLOOP_ARTEFACTS", "s3://airloop/artefacts")
    monkeypatch.setenv("AIRLOOP_ARTEFACTS_CONN_ID", "aws_default")


def _pod(pod_settings: dict[str, Any] | None) -> dict[str, Any]:
    context = task_context("validate", dag_id="airloop_loop", try_number=2)
    request = {
        "data_uri": "s3://airloop/data.parquet",
        "suite_path": "/opt/airflow/dags/suite.json",
        "docs_dir": "/somewhere/on/the/worker/data_docs",
    }
    hop = pod.pod_operator(STEP, request, pod_settings=pod_settings, context=context, task_id="validate")
    obj = hop.build_pod_request_obj(context)
    return hop.client.api_client.sanitize_for_serialization(obj)


def test_the_pod_runs_the_entrypoint_in_the_default_image_with_an_xcom_sidecar(cluster, monkeypatch):
    monkeypatch.delenv("AIRLOOP_POD_IMAGE", raising=False)
    spec = _pod(None)
    assert spec["metadata"]["namespace"] == "from-connection"
    assert spec["metadata"]["name"].startswith("validate-")
    assert spec["metadata"]["labels"]["try_number"] == "2"
    container, sidecar = spec["spec"]["containers"]
    assert container["image"] == "airloop/airflow:0.1.0"  # the release's Airflow image
    assert container["command"] == ["python", "-m", "airloop.runtimes.pod"]
    (argument,) = container["args"]
    assert json.loads(argument) == {
        "step": STEP,
        "request": {"data_uri": "s3://airloop/data.parquet", "suite_path": "/opt/airflow/dags/suite.json"},
        "outputs": {"docs_dir": "pods/airloop_loop/manual__1/validate/try-2/docs_dir"},
    }
    assert {e["name"]: e["value"] for e in container["env"]} == {
        "CI": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "AIRLOOP_ARTEFACTS": "s3://airloop/artefacts",
    }
    assert "resources" not in container
    assert sidecar["name"] == "airflow-xcom-sidecar"
    mount = {"mountPath": "/airflow/xcom", "name": "xcom"}
    assert mount in container["volumeMounts"] and mount in sidecar["volumeMounts"]
    assert spec["spec"]["restartPolicy"] == "Never"
    assert SECRET not in json.dumps(spec)
    assert "AIRFLOW_CONN_AWS_DEFAULT" not in json.dumps(spec) and "AWS_SECRET" not in json.dumps(spec)


def test_pod_settings_choose_image_namespace_resources_identity_and_environment(cluster, monkeypatch):
    monkeypatch.setenv("AIRLOOP_POD_IMAGE", "registry.example/airloop/airflow:env")
    assert _pod(None)["spec"]["containers"][0]["image"] == "registry.example/airloop/airflow:env"
    spec = _pod(
        {
            "image": "registry.example/airloop/airflow:pinned",
            "namespace": "ml-steps",
            "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "4Gi"}},
            "env": {"AWS_ENDPOINT_URL": "http://minio.storage:9000"},
            "service_account_name": "airloop-steps",
            "env_from": [{"secretRef": {"name": "airloop-s3"}}],
            "node_selector": {"pool": "cpu"},
        }
    )
    container = spec["spec"]["containers"][0]
    assert container["image"] == "registry.example/airloop/airflow:pinned"
    assert spec["metadata"]["namespace"] == "ml-steps"
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["AWS_ENDPOINT_URL"] == "http://minio.storage:9000" and env["CI"] == "true"
    assert container["envFrom"] == [{"secretRef": {"name": "airloop-s3"}}]  # credentials by reference
    assert spec["spec"]["serviceAccountName"] == "airloop-steps"
    assert spec["spec"]["nodeSelector"] == {"pool": "cpu"}
    assert SECRET not in json.dumps(spec)


@pytest.mark.parametrize(
    ("pod_settings", "problem"),
    [
        ({"namepsace": "ml"}, r"unknown pod_settings \['namepsace'\]"),
        ({"retries": 3}, r"unknown pod_settings \['retries'\]"),
        ({"cmds": ["bash"]}, r"pod_settings \['cmds'\] are set by the kubernetes runtime"),
        ({"env_vars": {"A": "b"}}, r"pod_settings \['env_vars'\] are set by the kubernetes runtime"),
        ({"resources": {"cpu": "1"}}, r"\['resources'\] must be \{'requests'"),
        ({"env": {"WORKERS": 4}}, r"\['env'\] must map names to string values"),
    ],
)
def test_bad_pod_settings_are_refused_before_any_pod_starts(pod_settings, problem):
    with pytest.raises(ValueError, match=problem):
        pod.pod_arguments(pod_settings)


def test_pod_settings_without_the_kubernetes_runtime_are_refused():
    with pytest.raises(ValueError, match="pod_settings apply to runtime='kubernetes' only, not 'worker'"):
        runtimes.run_step(
            "importlib.metadata:version",
            {},
            runtime=runtimes.WORKER,
            context={},
            task_id="t",
            pod_settings={"image": "x"},
        )


# -- what a pod cannot see -----------------------------------------------------------------------------------


def test_files_only_the_worker_has_are_refused_with_each_key_named(tmp_path, monkeypatch):
    home = settings.home()
    request = {
        "data_uri": (home / "artefacts" / "data" / "train.parquet").as_uri(),
        "tracking_uri": settings.mlflow_tracking_uri(),
        "current_uri": str(tmp_path / "out" / "window.parquet"),
        "reference_uri": os.path.join(tempfile.gettempdir(), "reference.parquet"),
        "report_dir": str(tmp_path / "out"),
        "holdout_uri": "s3://airloop/holdout.parquet",
        "model_uri": "runs:/abc/model",
    }
    with pytest.raises(ValueError) as error:
        pod.check_inputs(request)
    message = str(error.value)
    assert "data_uri='file://" in message and "(AIRLOOP_HOME)" in message
    assert "tracking_uri='sqlite:///" in message
    assert "current_uri=" in message and "(an output folder)" in message
    assert "reference_uri=" in message and "(the worker's temp folder)" in message
    assert "report_dir" not in message and "holdout_uri" not in message and "model_uri" not in message
    assert "Pass URIs the pod can reach" in message


def test_uris_and_paths_the_worker_does_not_have_pass_quietly(caplog):
    with caplog.at_level(logging.WARNING, logger="airloop.runtimes.pod"):
        pod.check_inputs(
            {
                "data_uri": "s3://airloop/train.parquet",
                "model_path": "/mnt/models",
                "suite_path": "/opt/airflow/dags/not-on-this-worker.json",
                "params": {"hidden_layer_sizes": [16, 8]},
                "tracking_uri": "http://mlflow:5000",
            }
        )
    assert caplog.text == ""


def test_a_request_carrying_credentials_is_refused_naming_the_keys():
    from airflow.sdk.log import mask_secret

    request = {
        "tracking_uri": "http://mlflow:5000",
        "data_uri": "s3://airloop/train.parquet",
        "auth": {"username": "airloop", "password": "mlflow-password-1"},
        "s3": {"endpoint_url": "http://minio:9000", "aws_secret_access_key": "minio-secret-1"},
        "params": {"max_iter": 5},
    }
    with pytest.raises(ValueError, match=r"carries credentials in \['auth', 's3'\], which a pod spec"):
        pod.pod_request(STEP, request, "pods/t")
    # A secret Airflow masks (a connection's password) is found under any key.
    mask_secret("pod-runtime-test-connection-password")
    with pytest.raises(ValueError, match=r"credentials in \['estimator_params'\]"):
        pod.check_no_credentials({"estimator_params": {"note": "pod-runtime-test-connection-password"}})
    pod.check_no_credentials({key: value for key, value in request.items() if key not in ("auth", "s3")})


def test_a_pod_that_wrote_no_result_is_an_error():
    with pytest.raises(RuntimeError, match="the pod wrote no step result to /airflow/xcom/return.json"):
        pod.collect(None, {})
