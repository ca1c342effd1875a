"""The Seldon serving target against a Kubernetes API and a Prometheus served by this test on 127.0.0.1.

The API implements the custom-objects endpoints for seldondeployments the way the API server does:
create, get, JSON merge patch and delete, a resourceVersion that changes on every write, 409 when a
patch carries a stale one, and validation against the CRD's schema when ``../shared/schemas`` has it.
The client side is the real one: the cncf-kubernetes provider's KubernetesHook with an Airflow
``kubernetes`` connection holding a kubeconfig.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from airloop.serving.base import get_target
from airloop.serving.seldon import (
    KubernetesApiError,
    SeldonKubernetesTarget,
    render_seldon_deployment,
    stats_from_prometheus,
)
from airloop.steps.rollout.canary import analyse

# CI has ../shared beside the checkout; a user's clone does not.
SHARED_SCHEMAS = Path(__file__).resolve().parents[3] / "shared" / "schemas"
NAMESPACE, DEPLOYMENT, TOKEN = "models", "churn", "test-token"
PATH = re.compile(r"^/apis/machinelearning\.seldon\.io/v1/namespaces/([^/]+)/seldondeployments(?:/([^/]+))?$")


def predictor(version: int, weight: int) -> dict[str, Any]:
    return {
        "name": f"v{version}",
        "model_version": str(version),
        "model_dir": f"/models/v{version}",
        "model_uri": f"s3://artefacts/models/churn/{version}/openvino",
        "weight": weight,
    }


@functools.cache
def crd_validator() -> Any:
    """A validator of the CRD's schema, or None without ../shared (checking the schema takes seconds)."""
    path = SHARED_SCHEMAS / "seldondeployment-v1.json"
    if not path.exists():
        return None
    import jsonschema

    schema = json.loads(path.read_text())["openAPIV3Schema"]
    return jsonschema.validators.validator_for(schema)(schema)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class FakeKubernetes(ThreadingHTTPServer):
    """Just enough of the Kubernetes API for SeldonDeployment custom objects."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _KubernetesHandler)
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.version = 0
        self.lock = threading.Lock()
        self.validator = crd_validator()
        self.conflicts_to_inject = 0  # writes by "someone else" right before the next patches
        self.served: list[tuple[str, int]] = []
        self.authorizations: set[str] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def bump(self, obj: dict[str, Any]) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        obj["metadata"]["generation"] = obj["metadata"].get("generation", 0) + 1

    def set_status(self, name: str, status: dict[str, Any]) -> None:
        """What Seldon's operator does once it has reconciled the resource."""
        with self.lock:
            obj = self.objects[(NAMESPACE, name)]
            obj["status"] = status
            self.bump(obj)


class _KubernetesHandler(BaseHTTPRequestHandler):
    server: FakeKubernetes

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, code: int, body: dict[str, Any]) -> None:
        self.server.served.append((self.command, code))  # before answering: the client goes on at once
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._answer(
            code,
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": message,
                "reason": reason,
                "code": code,
            },
        )

    def _body(self) -> Any:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")

    def _route(self) -> tuple[str, str | None] | None:
        self.server.authorizations.add(self.headers.get("Authorization", ""))
        match = PATH.match(urlparse(self.path).path)
        if not match:
            self._status(404, "NotFound", f"no route {self.path}")
            return None
        return match.group(1), match.group(2)

    def _invalid(self, obj: dict[str, Any]) -> str | None:
        if self.server.validator is None:
            return None
        error = next(iter(self.server.validator.iter_errors(obj)), None)
        return error and error.message

    def do_POST(self) -> None:
        route = self._route()
        if route is None:
            return
        namespace, _ = route
        obj = self._body()
        name = obj["metadata"]["name"]
        with self.server.lock:
            if (namespace, name) in self.server.objects:
                return self._status(409, "AlreadyExists", f'seldondeployments "{name}" already exists')
            problem = self._invalid(obj)
            if problem:
                return self._status(422, "Invalid", problem)
            obj["metadata"].update(namespace=namespace, uid=f"uid-{name}")
            self.server.bump(obj)
            self.server.objects[(namespace, name)] = obj
            self._answer(201, obj)

    def do_GET(self) -> None:
        route = self._route()
        if route is None:
            return
        with self.server.lock:
            obj = self.server.objects.get(route)
            if obj is None:
                return self._status(404, "NotFound", f'seldondeployments "{route[1]}" not found')
            self._answer(200, obj)

    def do_PATCH(self) -> None:
        route = self._route()
        if route is None:
            return
        if self.headers.get("Content-Type") != "application/merge-patch+json":
            return self._status(415, "UnsupportedMediaType", self.headers.get("Content-Type", ""))
        patch = self._body()
        with self.server.lock:
            obj = self.server.objects.get(route)
            if obj is None:
                return self._status(404, "NotFound", f'seldondeployments "{route[1]}" not found')
            if self.server.conflicts_to_inject:
                self.server.conflicts_to_inject -= 1
                self.server.bump(obj)  # another writer got there first
            wanted = (patch.get("metadata") or {}).get("resourceVersion")
            if wanted and wanted != obj["metadata"]["resourceVersion"]:
                return self._status(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes "
                    "to the latest version and try again",
                )
            updated = merge_patch(obj, patch)
            problem = self._invalid(updated)
            if problem:
                return self._status(422, "Invalid", problem)
            self.server.bump(updated)
            self.server.objects[route] = updated
            self._answer(200, updated)

    def do_DELETE(self) -> None:
        route = self._route()
        if route is None:
            return
        with self.server.lock:
            if self.server.objects.pop(route, None) is None:
                return self._status(404, "NotFound", f'seldondeployments "{route[1]}" not found')
            self._answer(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})


class FakePrometheus(ThreadingHTTPServer):
    """``/api/v1/query`` answering each query by the metric it names, from ``self.series``."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _PrometheusHandler)
        self.series: dict[str, list[dict[str, Any]]] = {}
        self.queries: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _PrometheusHandler(BaseHTTPRequestHandler):
    server: FakePrometheus

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        query = parse_qs(urlparse(self.path).query)["query"][0]
        self.server.queries.append(query)
        metric = re.search(r"\(([a-z_]+)\{", query).group(1)
        body = {
            "status": "success",
            "data": {"resultType": "vector", "result": self.server.series.get(metric, [])},
        }
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _serve(server: ThreadingHTTPServer) -> Iterator[ThreadingHTTPServer]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def kube(monkeypatch) -> Iterator[FakeKubernetes]:
    server = FakeKubernetes()
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server.url}}],
        "users": [{"name": "test", "user": {"token": TOKEN}}],
        "contexts": [
            {"name": "test", "context": {"cluster": "test", "user": "test", "namespace": NAMESPACE}}
        ],
    }
    monkeypatch.setenv(
        "AIRFLOW_CONN_KUBERNETES_DEFAULT",
        json.dumps({"conn_type": "kubernetes", "extra": {"kube_config": kubeconfig}}),
    )
    yield from _serve(server)


@pytest.fixture
def prometheus() -> Iterator[FakePrometheus]:
    yield from _serve(FakePrometheus())


@pytest.fixture
def target(prometheus) -> SeldonKubernetesTarget:
    return get_target(
        "seldon", namespace=NAMESPACE, prometheus_url=prometheus.url, image="airloop/serving:test"
    )


# -- the manifest --------------------------------------------------------------------------------------


def test_manifest_has_one_predictor_per_version_with_traffic_and_our_model_server():
    manifest = render_seldon_deployment(
        DEPLOYMENT,
        [predictor(3, 90), {**predictor(4, 10), "model_uri": None}],
        namespace=NAMESPACE,
        image="airloop/serving:test",
    )
    assert (manifest["apiVersion"], manifest["kind"]) == ("machinelearning.seldon.io/v1", "SeldonDeployment")
    assert manifest["metadata"] == {
        "name": DEPLOYMENT,
        "namespace": NAMESPACE,
        "labels": {"app.kubernetes.io/managed-by": "airloop"},
    }
    v3, v4 = manifest["spec"]["predictors"]
    assert [(p["name"], p["traffic"], p["labels"]["version"]) for p in (v3, v4)] == [
        ("v3", 90, "3"),
        ("v4", 10, "4"),
    ]
    (container,) = v3["componentSpecs"][0]["spec"]["containers"]
    assert (
        container["name"] == v3["graph"]["name"] == "model"
    )  # Seldon pairs container and graph node by name
    assert container["image"] == "airloop/serving:test"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MODEL_NAME"] == "airloop.serving.model.OpenVinoModel" and env["CI"] == "true"
    # With an artefact URI, Seldon's storage initializer fetches the IR into /mnt/models.
    assert v3["graph"]["modelUri"] == "s3://artefacts/models/churn/3/openvino"
    assert v3["graph"]["parameters"] == [{"name": "model_dir", "type": "STRING", "value": "/mnt/models"}]
    assert "modelUri" not in v4["graph"]
    assert v4["graph"]["parameters"][0]["value"] == "/models/v4"
    json.dumps(manifest)  # JSON-able as it goes over the wire


def test_a_shadow_predictor_is_seldons_own_with_the_mirrored_percentage_as_traffic():
    manifest = render_seldon_deployment(DEPLOYMENT, [predictor(3, 100), {**predictor(4, 25), "shadow": True}])
    live, shadow = manifest["spec"]["predictors"]
    assert "shadow" not in live and (shadow["shadow"], shadow["traffic"]) == (True, 25)
    # Seldon's rules: live traffic sums to 100 without the shadow; one shadow; never a shadow alone.
    with pytest.raises(ValueError, match="at most one shadow"):
        render_seldon_deployment(
            DEPLOYMENT,
            [predictor(3, 100), {**predictor(4, 25), "shadow": True}, {**predictor(5, 25), "shadow": True}],
        )
    with pytest.raises(ValueError, match="weights must sum to 100, got 0"):
        render_seldon_deployment(DEPLOYMENT, [{**predictor(4, 25), "shadow": True}])


@pytest.mark.parametrize(
    ("predictors", "problem"),
    [
        ([predictor(3, 90), predictor(4, 20)], "sum to 100"),
        ([predictor(3, 100), predictor(3, 0)], "distinct names"),
        ([{**predictor(3, 100), "name": "V3"}], "invalid predictor name"),
        ([{**predictor(3, 100), "weight": 100.0}], "integer from 0 to 100"),
        ([], "distinct names"),
    ],
)
def test_bad_predictors_are_refused_naming_the_problem(predictors, problem):
    with pytest.raises(ValueError, match=problem):
        render_seldon_deployment(DEPLOYMENT, predictors)


def test_manifest_validates_against_the_seldondeployment_crd_schema():
    validator = crd_validator()
    if validator is None:
        pytest.skip(
            f"the SeldonDeployment CRD schema is not at {SHARED_SCHEMAS} (CI has ../shared beside the "
            "checkout); the project's own manifest checks above still ran"
        )
    import jsonschema

    manifest = render_seldon_deployment(DEPLOYMENT, [predictor(3, 75), predictor(4, 25)], namespace=NAMESPACE)
    validator.validate(manifest)
    shadowed = render_seldon_deployment(
        DEPLOYMENT, [predictor(3, 100), {**predictor(4, 30), "shadow": True}], namespace=NAMESPACE
    )
    validator.validate(shadowed)
    assert shadowed["spec"]["predictors"][1]["shadow"] is True
    broken = copy.deepcopy(manifest)
    del broken["spec"]["predictors"][0]["graph"]
    with pytest.raises(jsonschema.ValidationError, match="'graph' is a required property"):
        validator.validate(broken)


# -- the target against the Kubernetes API ---------------------------------------------------------------


def test_deploy_set_traffic_status_and_remove_through_the_kubernetes_api(kube, target):
    state = target.deploy(DEPLOYMENT, [predictor(3, 100)])
    assert state["predictors"]["v3"]["weight"] == 100
    assert state["predictors"]["v3"]["healthy"] is False  # Seldon's operator has not reported yet
    assert kube.authorizations == {f"Bearer {TOKEN}"}  # credentials from the Airflow connection

    state = target.deploy(DEPLOYMENT, [predictor(4, 0)])
    assert {n: p["weight"] for n, p in state["predictors"].items()} == {"v3": 100, "v4": 0}
    stored = kube.objects[(NAMESPACE, DEPLOYMENT)]
    assert [p["name"] for p in stored["spec"]["predictors"]] == ["v3", "v4"]

    target.set_traffic(DEPLOYMENT, {"v3": 90, "v4": 10})
    assert [p["traffic"] for p in kube.objects[(NAMESPACE, DEPLOYMENT)]["spec"]["predictors"]] == [90, 10]

    kube.set_status(
        DEPLOYMENT,
        {
            "state": "Available",
            "address": {"url": f"http://{DEPLOYMENT}-{DEPLOYMENT}.{NAMESPACE}:8000/api/v1.0/predictions"},
            "deploymentStatus": {
                f"{DEPLOYMENT}-v3-0-model": {"replicas": 1, "availableReplicas": 1},
                f"{DEPLOYMENT}-v4-0-model": {"replicas": 1, "availableReplicas": 0},
            },
        },
    )
    state = target.state(DEPLOYMENT)
    assert state["status"] == "Available"
    assert state["endpoint"].startswith(f"http://{DEPLOYMENT}-{DEPLOYMENT}.{NAMESPACE}")
    assert (state["predictors"]["v3"]["healthy"], state["predictors"]["v4"]["healthy"]) == (True, False)
    assert state["predictors"]["v4"]["model_version"] == "4"

    with pytest.raises(ValueError, match="still receives 90%"):
        target.remove(DEPLOYMENT, "v3")
    with pytest.raises(ValueError, match="already serves model version 3"):
        target.deploy(DEPLOYMENT, [{**predictor(5, 0), "name": "v3"}])
    with pytest.raises(ValueError, match="unknown predictors"):
        target.set_traffic(DEPLOYMENT, {"v9": 10, "v3": 90})

    target.set_traffic(DEPLOYMENT, {"v3": 0, "v4": 100})
    state = target.remove(DEPLOYMENT, "v3")
    assert list(state["predictors"]) == ["v4"]
    assert [p["name"] for p in kube.objects[(NAMESPACE, DEPLOYMENT)]["spec"]["predictors"]] == ["v4"]

    target.delete(DEPLOYMENT)
    assert kube.objects == {}
    target.delete(DEPLOYMENT)  # idempotent
    with pytest.raises(ValueError, match="is not deployed"):
        target.state(DEPLOYMENT)


def test_a_shadow_is_mirrored_promoted_to_live_or_removed_through_the_kubernetes_api(kube, target):
    target.deploy(DEPLOYMENT, [predictor(3, 100)])
    state = target.deploy(DEPLOYMENT, [{**predictor(4, 50), "shadow": True}])
    stored = kube.objects[(NAMESPACE, DEPLOYMENT)]["spec"]["predictors"]
    assert [(p["name"], p["traffic"], p.get("shadow")) for p in stored] == [
        ("v3", 100, None),
        ("v4", 50, True),
    ]
    assert state["predictors"]["v4"]["shadow"] is True and state["predictors"]["v3"]["shadow"] is False

    target.set_traffic(DEPLOYMENT, {"v3": 100}, shadow={"v4": 20})
    assert kube.objects[(NAMESPACE, DEPLOYMENT)]["spec"]["predictors"][1]["traffic"] == 20
    # Named among the live weights, the shadow becomes a canary: the flag goes, traffic is its share.
    target.set_traffic(DEPLOYMENT, {"v3": 90, "v4": 10})
    stored = kube.objects[(NAMESPACE, DEPLOYMENT)]["spec"]["predictors"]
    assert [(p["traffic"], "shadow" in p) for p in stored] == [(90, False), (10, False)]

    target.set_traffic(DEPLOYMENT, {"v3": 100}, shadow={"v4": 100})
    state = target.remove(DEPLOYMENT, "v4")  # a shadow answers no client: it may go at once
    assert list(state["predictors"]) == ["v3"]


def test_a_conflicting_write_is_retried_from_a_fresh_read(kube, target):
    target.deploy(DEPLOYMENT, [predictor(3, 50), predictor(4, 50)])
    kube.conflicts_to_inject = 2
    target.set_traffic(DEPLOYMENT, {"v3": 25, "v4": 75})
    patches = [code for method, code in kube.served if method == "PATCH"]
    assert patches == [409, 409, 200]
    assert [p["traffic"] for p in kube.objects[(NAMESPACE, DEPLOYMENT)]["spec"]["predictors"]] == [25, 75]

    kube.conflicts_to_inject = 100
    with pytest.raises(KubernetesApiError, match="still conflicting after 5 attempts"):
        target.set_traffic(DEPLOYMENT, {"v3": 0, "v4": 100})


def test_an_api_that_is_down_gives_a_clear_error(kube, target):
    kube.shutdown()
    kube.server_close()
    with pytest.raises(KubernetesApiError, match="does not answer .*kubernetes_default"):
        target.deploy(DEPLOYMENT, [predictor(3, 100)])


def test_a_refused_manifest_names_the_api_servers_reason(kube, target):
    if kube.validator is None:
        pytest.skip(f"the fake API validates only with the CRD schema from {SHARED_SCHEMAS}")
    target.deploy(DEPLOYMENT, [predictor(3, 100)])
    # A shape the CRD rejects: traffic as a string, in a hand-made patch.
    with pytest.raises(KubernetesApiError, match="HTTP 422 .*'all' is not of type 'integer'"):
        target._call(
            "patch",
            DEPLOYMENT,
            lambda api: api.patch_namespaced_custom_object(
                "machinelearning.seldon.io",
                "v1",
                NAMESPACE,
                "seldondeployments",
                DEPLOYMENT,
                {"spec": {"predictors": [{"name": "v3", "traffic": "all", "graph": {"name": "model"}}]}},
            ),
        )


# -- metrics from Prometheus --------------------------------------------------------------------------------


def _vector(labels: dict[str, str], value: float) -> dict[str, Any]:
    return {"metric": labels, "value": [1700000000.0, str(value)]}


def test_metrics_come_from_prometheus_in_the_local_targets_shape(kube, prometheus, target):
    target.deploy(DEPLOYMENT, [predictor(3, 90), predictor(4, 10)])
    m = "seldon_api_executor_client_requests_seconds"
    prometheus.series = {
        f"{m}_count": [
            _vector({"predictor_name": "v3", "code": "200"}, 900),
            _vector({"predictor_name": "v4", "code": "200"}, 80),
            _vector({"predictor_name": "v4", "code": "500"}, 20),
            _vector({"predictor_name": "old", "code": "200"}, 5),
        ],
        f"{m}_sum": [_vector({"predictor_name": "v3"}, 1.8), _vector({"predictor_name": "v4"}, 0.5)],
        f"{m}_bucket": [
            _vector({"predictor_name": p, "le": le}, n)
            for p, counts in {"v3": (800, 900, 900), "v4": (50, 90, 100)}.items()
            for le, n in zip(("0.002", "0.01", "+Inf"), counts, strict=True)
        ],
        # The model server's own counters (airloop.serving.model): no gateway on Kubernetes.
        "airloop_model_feedback_total": [
            _vector({"predictor_name": "v3", "outcome": "correct"}, 95),
            _vector({"predictor_name": "v3", "outcome": "incorrect"}, 5),
            _vector({"predictor_name": "v4", "outcome": "correct"}, 30),
            _vector({"predictor_name": "v4", "outcome": "incorrect"}, 20),
        ],
        "airloop_model_predictions_total": [
            _vector({"predictor_name": "v3", "class": "0"}, 450),
            _vector({"predictor_name": "v3", "class": "1"}, 450),
            _vector({"predictor_name": "v4", "class": "1"}, 80),
        ],
    }
    stats = target.metrics(DEPLOYMENT)
    assert set(stats) == {"v3", "v4"}
    assert stats["v4"] == {
        "requests": 100,
        "errors": 20,
        "latency_ms_sum": pytest.approx(500.0),
        "feedback": 50,
        "feedback_correct": 30,
        "latency_ms_buckets": {"2": 50, "10": 90, "+Inf": 100},
        "predicted": {"1": 80},
    }
    assert stats["v3"]["requests"] == 900 and stats["v3"]["feedback_correct"] == 95
    assert stats["v3"]["predicted"] == {"0": 450, "1": 450}
    # Every query is scoped to the deployment and its namespace.
    assert len(prometheus.queries) == 5
    assert all(f'deployment_name="{DEPLOYMENT}",namespace="{NAMESPACE}"' in q for q in prometheus.queries)
    assert asyncio.run(target.ametrics(DEPLOYMENT)) == stats

    # The same canary analysis as on the local target reads these snapshots.
    empty = stats_from_prometheus(["v3", "v4"], {})
    verdict = analyse(
        {
            "before": empty,
            "after": stats,
            "champion": "v3",
            "challenger": "v4",
            "criteria": {"min_requests": 50, "min_feedback": 30},
        }
    )
    assert verdict["verdict"] == "fail"
    assert verdict["tests"]["errors"]["status"] == "fail" and verdict["tests"]["accuracy"]["status"] == "fail"


def test_the_namespace_label_is_the_prometheus_setups(kube, prometheus):
    target = SeldonKubernetesTarget(
        namespace=NAMESPACE, prometheus_url=prometheus.url, namespace_label="kubernetes_namespace"
    )
    target.deploy(DEPLOYMENT, [predictor(3, 100)])
    prometheus.series = {
        "airloop_model_feedback_total": [_vector({"predictor_name": "v3", "outcome": "correct"}, 7)]
    }
    assert target.metrics(DEPLOYMENT)["v3"]["feedback_correct"] == 7
    assert all(
        f',kubernetes_namespace="{NAMESPACE}"' in q and ",namespace=" not in q for q in prometheus.queries
    )


def test_metrics_without_prometheus_or_with_prometheus_down_fail_clearly(kube, prometheus):
    target = SeldonKubernetesTarget(namespace=NAMESPACE)
    target.deploy(DEPLOYMENT, [predictor(3, 100)])
    with pytest.raises(ValueError, match="needs 'prometheus_url'"):
        target.metrics(DEPLOYMENT)
    url = prometheus.url
    prometheus.shutdown()
    prometheus.server_close()
    down = SeldonKubernetesTarget(namespace=NAMESPACE, prometheus_url=url)
    with pytest.raises(RuntimeError, match="does not answer"):
        down.metrics(DEPLOYMENT)
