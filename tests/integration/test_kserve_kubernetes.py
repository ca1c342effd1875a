"""The KServe target's InferenceService through a canary: what KServe is told at each step, against
the tests' Kubernetes API (manifests validated against KServe's CRD schema from ../shared)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from airloop.serving.kserve import KServeTarget, render_inference_service
from tests.fakes.kubernetes import FakeKubernetes, crd_validator, serving

NAMESPACE = "models"


@pytest.fixture
def kube(monkeypatch) -> Iterator[FakeKubernetes]:
    api = FakeKubernetes()
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", api.connection("kserve-token", NAMESPACE))
    with serving(api):
        yield api


def predictor(version: int, weight: int) -> dict:
    return {
        "name": f"v{version}",
        "model_version": str(version),
        "model_dir": f"/unused/{version}",
        "model_uri": f"s3://airloop/ir/v{version}",
        "weight": weight,
    }


def spec(kube: FakeKubernetes) -> dict:
    return kube.inference_services[(NAMESPACE, "churn")]["spec"]["predictor"]


def test_the_manifest_speaks_v2_from_the_irs_storage_uri_and_passes_the_crd_schema():
    manifest = render_inference_service(
        "churn",
        {
            "v3": {"model_version": "3", "storage_uri": "s3://a/v3", "weight": 90},
            "v4": {"model_version": "4", "storage_uri": "s3://a/v4", "weight": 10},
        },
        "v3",
        "v4",
        runtime="airloop-openvino",
    )
    model = manifest["spec"]["predictor"]["model"]
    assert model == {
        "modelFormat": {"name": "openvino"},
        "protocolVersion": "v2",
        "storageUri": "s3://a/v4",
        "runtime": "airloop-openvino",
    }
    assert manifest["spec"]["predictor"]["canaryTrafficPercent"] == 10
    validator = crd_validator("inferenceservices")
    if validator is None:
        pytest.skip("needs ../shared/schemas/inferenceservice-v1beta1.json")
    validator.validate(manifest)
    with pytest.raises(Exception, match="canaryTrafficPercent|not of type"):
        validator.validate(
            {
                **manifest,
                "spec": {"predictor": {**manifest["spec"]["predictor"], "canaryTrafficPercent": "ten"}},
            }
        )


def test_a_canary_promoted_and_one_rolled_back(kube):
    target = KServeTarget(namespace=NAMESPACE)
    target.deploy("churn", [predictor(3, 100)])
    assert "canaryTrafficPercent" not in spec(kube) and spec(kube)["model"]["storageUri"].endswith("v3")
    target.deploy("churn", [predictor(4, 0)])  # deployed, no traffic yet
    assert (spec(kube)["model"]["storageUri"], spec(kube)["canaryTrafficPercent"]) == (
        "s3://airloop/ir/v4",
        0,
    )
    target.set_traffic("churn", {"v3": 75, "v4": 25})
    assert spec(kube)["canaryTrafficPercent"] == 25
    target.deploy("churn", [predictor(5, 0)])
    with pytest.raises(ValueError, match="two revisions at most"):
        target.set_traffic("churn", {"v3": 50, "v4": 25, "v5": 25})
    target.remove("churn", "v5")
    # Promotion: the latest revision takes everything, canaryTrafficPercent goes.
    state = target.set_traffic("churn", {"v3": 0, "v4": 100})
    assert "canaryTrafficPercent" not in spec(kube) and spec(kube)["labels"]["airloop.io/predictor"] == "v4"
    assert {n: p["weight"] for n, p in state["predictors"].items()} == {"v3": 0, "v4": 100}
    target.remove("churn", "v3")
    # A canary rolled back: the stable revision gets it all, the canary stays at 0 until removed.
    target.deploy("churn", [predictor(6, 0)])
    target.set_traffic("churn", {"v4": 90, "v6": 10})
    target.set_traffic("churn", {"v4": 100, "v6": 0})
    assert (spec(kube)["canaryTrafficPercent"], spec(kube)["labels"]["airloop.io/predictor"]) == (0, "v6")
    target.remove("churn", "v6")
    assert "canaryTrafficPercent" not in spec(kube) and spec(kube)["labels"]["airloop.io/predictor"] == "v4"
    with pytest.raises(ValueError, match="no shadow predictor"):
        target.deploy("churn", [{**predictor(7, 10), "shadow": True}])
    # Health from KServe's Ready condition.
    assert target.state("churn")["predictors"]["v4"]["healthy"] is False
    kube.set_status(
        NAMESPACE,
        "churn",
        {"url": "http://churn.models.example.com", "conditions": [{"type": "Ready", "status": "True"}]},
        plural="inferenceservices",
    )
    state = target.state("churn")
    assert state["endpoint"] == "http://churn.models.example.com" and state["predictors"]["v4"]["healthy"]
    assert not [entry for entry in kube.served if entry[2] == 422]
