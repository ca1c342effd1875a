"""The Seldon serving target against the Kubernetes API and the Prometheus of ``tests.fakes``.

The API implements the custom-objects endpoints for seldondeployments the way the API server does
(see ``tests.fakes.kubernetes``); the client side is the real one: the cncf-kubernetes provider's
KubernetesHook with an Airflow ``kubernetes`` connection holding a kubeconfig.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest

from airloop.serving.base import get_target
from airloop.serving.seldon import (
    KubernetesApiError,
    SeldonKubernetesTarget,
    render_seldon_deployment,
    stats_from_prometheus,
)
from airloop.steps.rollout.canary import analyse
from tests.fakes.kubernetes import SHARED_SCHEMAS, FakeKubernetes, crd_validator, serving
from tests.fakes.prometheus import FakePrometheus, sample

NAMESPACE, DEPLOYMENT, TOKEN = "models", "churn", "test-token"


def predictor(version: int, weight: int) -> dict[str, Any]:
    return {
        "name": f"v{version}",
        "model_version": str(version),
        "model_dir": f"/models/v{version}",
        "model_uri": f"s3://artefacts/models/churn/{version}/openvino",
        "weight": weight,
    }


@pytest.fixture
def kube(monkeypatch) -> Iterator[FakeKubernetes]:
    server = FakeKubernetes()
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", server.connection(TOKEN, NAMESPACE))
    with serving(server):
        yield server


@pytest.fixture
def prometheus() -> Iterator[FakePrometheus]:
    with serving(FakePrometheus()) as server:
        yield server


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
        NAMESPACE,
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
    patches = [code for method, _, code in kube.served if method == "PATCH"]
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
    if kube.validators["seldondeployments"] is None:
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


def test_metrics_come_from_prometheus_in_the_local_targets_shape(kube, prometheus, target):
    target.deploy(DEPLOYMENT, [predictor(3, 90), predictor(4, 10)])
    m = "seldon_api_executor_client_requests_seconds"
    prometheus.series = {
        f"{m}_count": [
            sample({"predictor_name": "v3", "code": "200"}, 900),
            sample({"predictor_name": "v4", "code": "200"}, 80),
            sample({"predictor_name": "v4", "code": "500"}, 20),
            sample({"predictor_name": "old", "code": "200"}, 5),
        ],
        f"{m}_sum": [sample({"predictor_name": "v3"}, 1.8), sample({"predictor_name": "v4"}, 0.5)],
        f"{m}_bucket": [
            sample({"predictor_name": p, "le": le}, n)
            for p, counts in {"v3": (800, 900, 900), "v4": (50, 90, 100)}.items()
            for le, n in zip(("0.002", "0.01", "+Inf"), counts, strict=True)
        ],
        # The model server's own counters (airloop.serving.model): no gateway on Kubernetes.
        "airloop_model_feedback_total": [
            sample({"predictor_name": "v3", "outcome": "correct"}, 95),
            sample({"predictor_name": "v3", "outcome": "incorrect"}, 5),
            sample({"predictor_name": "v4", "outcome": "correct"}, 30),
            sample({"predictor_name": "v4", "outcome": "incorrect"}, 20),
        ],
        "airloop_model_predictions_total": [
            sample({"predictor_name": "v3", "class": "0"}, 450),
            sample({"predictor_name": "v3", "class": "1"}, 450),
            sample({"predictor_name": "v4", "class": "1"}, 80),
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
        "airloop_model_feedback_total": [sample({"predictor_name": "v3", "outcome": "correct"}, 7)]
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
