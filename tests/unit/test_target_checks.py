"""The serving-target conformance suite itself: a target that keeps the contract passes it, and each
way of breaking the contract fails it, naming the broken rule."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from airloop.serving.base import ServingTarget, check_deployment_name, check_predictor, merge_traffic
from airloop.serving.checks import check_target

MODELS = ["/models/v1", "/models/v2", "/models/v3"]


class MemoryTarget(ServingTarget):
    """A target keeping deployments in ``store`` (shared by its instances, as a remote system is),
    built on the base module's checks as the package's targets are."""

    def __init__(self, store: dict[str, Any]) -> None:
        self.store = store

    def deploy(self, deployment: str, predictors: list[dict[str, Any]]) -> dict[str, Any]:
        check_deployment_name(deployment)
        wanted: dict[str, dict[str, Any]] = {}
        for predictor in predictors:
            check_predictor(predictor)
            if predictor["name"] in wanted:
                raise ValueError(f"predictor {predictor['name']!r} is listed twice")
            wanted[predictor["name"]] = predictor
        running = copy.deepcopy(self.store.get(deployment, {}))
        for name, predictor in wanted.items():
            if name in running and running[name]["model_version"] != predictor["model_version"]:
                raise ValueError(
                    f"predictor {name!r} already serves model version {running[name]['model_version']}"
                )
        traffic = merge_traffic(
            {**{n: {"weight": 0} for n in wanted}, **running},
            {n: p["weight"] for n, p in wanted.items() if not p.get("shadow")},
            {n: p["weight"] for n, p in wanted.items() if p.get("shadow")},
        )
        for name, role in traffic.items():
            if name not in running:
                running[name] = {"model_version": wanted[name]["model_version"], "requests": 0}
            running[name].update(role)
        self.store[deployment] = running
        return self.state(deployment)

    def set_traffic(
        self, deployment: str, weights: dict[str, int], *, shadow: dict[str, int] | None = None
    ) -> dict[str, Any]:
        current = self._read(deployment)
        for name, role in merge_traffic(current, weights, shadow).items():
            current[name].update(role)
        return self.state(deployment)

    def remove(self, deployment: str, predictor: str) -> dict[str, Any]:
        current = self._read(deployment)
        if predictor not in current:
            raise ValueError(f"deployment {deployment!r} has no predictor {predictor!r}")
        if current[predictor]["weight"] and not current[predictor]["shadow"]:
            raise ValueError(f"predictor {predictor!r} receives traffic: set its weight to 0 first")
        del current[predictor]
        return self.state(deployment)

    def state(self, deployment: str) -> dict[str, Any]:
        predictors = {
            name: {
                "model_version": p["model_version"],
                "weight": p["weight"],
                "shadow": p["shadow"],
                "healthy": True,
            }
            for name, p in self._read(deployment).items()
        }
        return {"deployment": deployment, "endpoint": f"memory://{deployment}", "predictors": predictors}

    def metrics(self, deployment: str) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "requests": p["requests"],
                "errors": 0,
                "latency_ms_sum": 0.5 * p["requests"],
                "latency_ms_buckets": {"1": p["requests"], "+Inf": p["requests"]},
                "feedback": 0,
                "feedback_correct": 0,
                "predicted": {},
            }
            for name, p in self._read(deployment).items()
        }

    def delete(self, deployment: str) -> None:
        check_deployment_name(deployment)
        self.store.pop(deployment, None)

    def _read(self, deployment: str) -> dict[str, Any]:
        check_deployment_name(deployment)
        if deployment not in self.store:
            raise ValueError(f"deployment {deployment!r} is not deployed")
        return self.store[deployment]


def send(store: dict[str, Any]) -> Any:
    """Requests split by weight, as a gateway would count them."""

    def to(state: dict[str, Any], n: int) -> None:
        live = {name: p for name, p in store[state["deployment"]].items() if not p["shadow"]}
        for p in live.values():
            p["requests"] += n * p["weight"] // 100
        max(live.values(), key=lambda p: p["weight"])["requests"] += n - sum(
            n * p["weight"] // 100 for p in live.values()
        )

    return to


def test_a_target_keeping_the_contract_passes():
    store: dict[str, Any] = {}
    check_target(lambda: MemoryTarget(store), MODELS, send=send(store))
    assert store == {}  # the suite deletes what it deployed


class SumUnchecked(MemoryTarget):
    def set_traffic(self, deployment, weights, *, shadow=None):
        for name, weight in weights.items():
            self._read(deployment)[name].update(weight=weight, shadow=False)
        return self.state(deployment)


class RemovesLive(MemoryTarget):
    def remove(self, deployment, predictor):
        self._read(deployment).pop(predictor, None)
        return self.state(deployment)


class HalfApplied(MemoryTarget):
    def set_traffic(self, deployment, weights, *, shadow=None):
        current = self._read(deployment)
        for name, weight in weights.items():
            if name in current:
                current[name].update(weight=weight, shadow=False)
        return super().set_traffic(deployment, {}, shadow=shadow)


class KeyErrors(MemoryTarget):
    def _read(self, deployment):
        check_deployment_name(deployment)
        return self.store[deployment]


class NoIdleMetrics(MemoryTarget):
    def metrics(self, deployment):
        return {n: m for n, m in super().metrics(deployment).items() if m["requests"]}


class Uncounted(MemoryTarget):
    def metrics(self, deployment):
        stats = super().metrics(deployment)
        for m in stats.values():
            m.update(requests=0, latency_ms_buckets={"+Inf": 0})
        return stats


class Forgetful(MemoryTarget):
    """Each instance with a store of its own: what one Airflow task deploys, the next cannot see."""

    def __init__(self, store):
        super().__init__({})


BROKEN = [
    (Forgetful, "a new instance cannot read it: deployment 'airloop-conformance' is not deployed"),
    (SumUnchecked, "set_traffic() with weights summing to 110 was accepted"),
    (RemovesLive, "remove() of a predictor at weight 80 was accepted"),
    (HalfApplied, "set_traffic() with weights summing to 110 was refused but changed"),
    (KeyErrors, "state() raised KeyError"),
    (NoIdleMetrics, "has no entry for predictor 'v1'"),
    (Uncounted, "after 200 were sent"),
]


@pytest.mark.parametrize(("broken", "message"), BROKEN, ids=[broken.__name__ for broken, _ in BROKEN])
def test_a_target_breaking_the_contract_fails_naming_the_rule(broken, message):
    store: dict[str, Any] = {}
    with pytest.raises(AssertionError) as failure:
        check_target(lambda: broken(store), MODELS, send=send(store))
    assert message in str(failure.value)
    assert store == {}  # deleted even after a failure


def test_the_suite_needs_three_models():
    with pytest.raises(ValueError, match="three model folders"):
        check_target(lambda: MemoryTarget({}), MODELS[:2])
