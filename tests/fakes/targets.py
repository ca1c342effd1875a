"""A serving target held in memory: traffic rules as the real targets apply them (``merge_traffic``),
and metrics that a test sets, for driving the rollout's state machine without model servers."""

from __future__ import annotations

from typing import Any

from airloop.serving.base import ServingTarget, check_predictor, merge_traffic


class MemoryTarget(ServingTarget):
    """Deployments as dicts; ``counts[deployment]`` is what ``metrics`` answers (cumulative snapshots)."""

    def __init__(self) -> None:
        self.predictors: dict[str, dict[str, dict[str, Any]]] = {}
        self.counts: dict[str, dict[str, dict[str, Any]]] = {}

    def deploy(self, deployment: str, predictors: list[dict[str, Any]]) -> dict[str, Any]:
        current = self.predictors.setdefault(deployment, {})
        for predictor in predictors:
            check_predictor(predictor)
            current.setdefault(predictor["name"], {**predictor, "shadow": bool(predictor.get("shadow"))})
        return self.state(deployment)

    def set_traffic(
        self, deployment: str, weights: dict[str, int], *, shadow: dict[str, int] | None = None
    ) -> dict[str, Any]:
        current = self.predictors[deployment]
        roles = {n: {"weight": p["weight"], "shadow": p["shadow"]} for n, p in current.items()}
        for name, role in merge_traffic(roles, weights, shadow).items():
            current[name].update(role)
        return self.state(deployment)

    def remove(self, deployment: str, predictor: str) -> dict[str, Any]:
        self.predictors[deployment].pop(predictor, None)
        return self.state(deployment)

    def state(self, deployment: str) -> dict[str, Any]:
        if deployment not in self.predictors:
            raise ValueError(f"deployment {deployment!r} is not deployed")
        return {
            "deployment": deployment,
            "endpoint": f"memory://{deployment}",
            "predictors": {n: {**p, "healthy": True} for n, p in self.predictors[deployment].items()},
        }

    def metrics(self, deployment: str) -> dict[str, dict[str, Any]]:
        return self.counts.get(deployment, {})

    def delete(self, deployment: str) -> None:
        self.predictors.pop(deployment, None)

    def weights(self, deployment: str) -> dict[str, int]:
        return {n: p["weight"] for n, p in self.predictors[deployment].items()}
