"""The serving-target conformance suite (``airloop.serving.checks.check_target``) over every target
the package registers: the local one with real processes, Seldon and KServe against the Kubernetes
API and the Prometheus of ``tests.fakes`` (manifests validated against their CRDs' schemas)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from airloop import runtimes
from airloop.serving.base import TARGETS, get_target
from airloop.serving.checks import check_target
from airloop.serving.seldon import REQUESTS_METRIC
from tests.fakes.kubernetes import FakeKubernetes, serving
from tests.fakes.models import FEATURES, build_ir
from tests.fakes.prometheus import FakePrometheus, sample


def test_every_target_the_package_registers_is_checked_here():
    # Tests register targets of their own (test_rollout_trigger): only the package's are checked here.
    own = {name for name in TARGETS.available() if TARGETS.get(name).__module__.startswith("airloop.")}
    assert own == {"local", "seldon", "kserve"}


@pytest.fixture(scope="module")
def irs(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("irs")
    return [str(build_ir(root / f"v{seed}", seed=seed)) for seed in (1, 2, 3)]


def send_rows(state: dict[str, Any], n: int) -> None:
    """``n`` one-row predictions through the local gateway, as a Seldon-protocol client sends them."""
    rows = np.random.default_rng(0).normal(size=(n, len(FEATURES)))
    with httpx.Client(base_url=state["endpoint"], trust_env=False, timeout=10) as client:
        for row in rows:
            body = {"data": {"names": FEATURES, "ndarray": [row.tolist()]}}
            client.post("/api/v1.0/predictions", json=body).raise_for_status()


@pytest.mark.parametrize(("server", "runtime"), [("seldon", "serving"), ("mlserver", "mlserver")])
def test_the_local_target_conforms(irs, tmp_path, server, runtime):
    try:
        runtimes.python(runtime)
    except runtimes.RuntimeMissingError as exc:
        pytest.skip(f"needs the {runtime} runtime: {exc}")
    check_target(lambda: get_target("local", home=str(tmp_path), server=server), irs, send=send_rows)


@pytest.fixture
def seldon(monkeypatch) -> Iterator[tuple[FakeKubernetes, FakePrometheus]]:
    kube = FakeKubernetes()
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", kube.connection("conformance-token", "models"))
    with serving(kube), serving(FakePrometheus()) as prometheus:
        yield kube, prometheus


def test_the_seldon_target_conforms(seldon):
    kube, prometheus = seldon

    def send(state: dict[str, Any], n: int) -> None:
        """What Seldon's executors would report to Prometheus for ``n`` requests split by the stored
        SeldonDeployment's traffic (a shadow's mirrored requests are not counted here)."""
        (stored,) = kube.objects.values()
        live = {p["name"]: p["traffic"] for p in stored["spec"]["predictors"] if not p.get("shadow")}
        counts = {name: n * weight // 100 for name, weight in live.items()}
        counts[max(live, key=live.__getitem__)] += n - sum(counts.values())
        for name, count in counts.items():
            add(name, count)

    def add(name: str, count: int) -> None:
        for suffix, labels, value in [
            ("_count", {"code": "200"}, count),
            ("_bucket", {"le": "0.005"}, count),
            ("_bucket", {"le": "+Inf"}, count),
            ("_sum", {}, count * 0.002),
        ]:
            series = prometheus.series.setdefault(f"{REQUESTS_METRIC}{suffix}", [])
            series.append(sample({"predictor_name": name, **labels}, value))

    def make() -> Any:
        return get_target("seldon", namespace="models", prometheus_url=prometheus.url)

    # The predictors' model folders are paths in the pods; Seldon starts nothing here.
    check_target(make, ["/models/v1", "/models/v2", "/models/v3"], send=send)
    assert kube.authorizations == {"Bearer conformance-token"}
    assert prometheus.queries and all('namespace="models"' in query for query in prometheus.queries)


def test_the_kserve_target_conforms(seldon):
    kube, prometheus = seldon

    def send(state: dict[str, Any], n: int) -> None:
        """What Prometheus would hold for ``n`` requests split by the annotated weights."""
        live = {name: p["weight"] for name, p in state["predictors"].items() if p["weight"] > 0}
        counts = {name: n * weight // 100 for name, weight in live.items()}
        counts[max(live, key=live.__getitem__)] += n - sum(counts.values())
        for name, count in counts.items():
            series = prometheus.series.setdefault(f"{REQUESTS_METRIC}_count", [])
            series.append(sample({"predictor_name": name, "code": "200"}, count))

    def make() -> Any:
        return get_target("kserve", namespace="models", prometheus_url=prometheus.url)

    check_target(make, ["s3://models/v1", "s3://models/v2", "s3://models/v3"], send=send)
    assert kube.authorizations == {"Bearer conformance-token"}
    assert not kube.objects  # no SeldonDeployment: InferenceServices only
    # Every write was checked against KServe's CRD schema (where ../shared has it): none refused.
    assert not [entry for entry in kube.served if entry[2] == 422]
