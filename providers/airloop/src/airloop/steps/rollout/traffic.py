"""A deployment's traffic moved by writes that a retry can repeat: each names only predictors the
deployment has, starts those it lacks, and leaves weights that sum to 100 from any valid state (the
split a killed rollout left included)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from airloop.serving.base import ServingTarget


def predictor_name(version: str | int) -> str:
    return f"v{version}"


class Deployment:
    """One deployment of a serving target; ``predictor(version)`` builds a predictor to deploy, and
    ``before_write()`` runs before each write (it raises to stop a rollout that was aborted)."""

    def __init__(
        self,
        target: ServingTarget,
        name: str,
        predictor: Callable[[str], dict[str, Any]],
        before_write: Callable[[], None],
    ) -> None:
        self.target = target
        self.name = name
        self.predictor = predictor
        self.before_write = before_write

    def roles(self) -> dict[str, dict[str, Any]]:
        """``{predictor: {"weight", "shadow"}}``; empty when the deployment is not deployed."""
        try:
            state = self.target.state(self.name)
        except ValueError:
            # The rollout checked the name: a ValueError is the targets' "not deployed".
            return {}
        return {
            n: {"weight": p["weight"], "shadow": bool(p.get("shadow"))}
            for n, p in state["predictors"].items()
        }

    def ensure(self, *versions: str) -> None:
        """Start the predictors of ``versions`` that the deployment lacks, with no traffic."""
        roles = self.roles()
        missing = [v for v in dict.fromkeys(versions) if predictor_name(v) not in roles]
        if not missing:
            return
        predictors = [{**self.predictor(v), "weight": 0} for v in missing]
        if not any(not role["shadow"] for role in roles.values()):
            predictors[0]["weight"] = 100  # nothing live yet: the first one takes all traffic
        self.before_write()
        self.target.deploy(self.name, predictors)

    def route(self, weights: dict[str, int], *, shadow: dict[str, int] | None = None) -> None:
        """Apply ``weights`` (and the ``shadow``); other live predictors get none, another shadow goes."""
        roles = self.roles()
        named = set(weights) | set(shadow or {})
        for name in [n for n, role in roles.items() if role["shadow"] and n not in named and shadow]:
            self.before_write()
            self.target.remove(self.name, name)  # a deployment has one shadow at most
        others = {n: 0 for n, role in roles.items() if n not in named and not role["shadow"]}
        self.before_write()
        self.target.set_traffic(self.name, {**others, **weights}, shadow=shadow)

    def route_all(self, version: str) -> None:
        """All traffic to ``version``, started first if the deployment lacks it."""
        self.ensure(version)
        self.route({predictor_name(version): 100})

    def remove_others(self, *, keep: set[str]) -> None:
        for name in sorted(set(self.roles()) - keep):
            self.before_write()
            self.target.remove(self.name, name)

    def metrics(self) -> dict[str, dict[str, Any]]:
        return self.target.metrics(self.name)
