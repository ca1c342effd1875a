"""Serving targets: where a deployment's predictors run and how traffic is split between them.

A deployment (e.g. ``churn``) holds predictors named after model versions (``v3``, ``v4``); which one
is champion or challenger lives in MLflow aliases, not here. A target only starts predictors,
splits traffic by weight and reports cumulative metrics per predictor.

Implementations are registered under a kind (``register_target("local", LocalServingTarget)``, the
``airloop.backends`` idiom) and built by ``get_target(kind, **config)``; constructors only store their
parameters. ``airloop.serving.checks.check_target`` is the contract every implementation must pass.
"""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from typing import Any

from airloop.backends import Registry

# Kubernetes object names (DNS-1123 labels), so a deployment name is valid on every target.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class ServingTarget(ABC):
    """A place that serves deployments.

    Predictor dict: ``{"name": "v3", "model_version": "3", "model_dir": "/abs/ir/dir", "weight": 100}``,
    optionally ``"shadow": True``: then it answers no client, and ``weight`` is the percentage of
    requests mirrored to it (1-100). A deployment has at most one shadow; the weights of the live
    predictors sum to 100 (Seldon Core's rules for a SeldonDeployment's ``shadow`` predictor).
    State: ``{"deployment", "endpoint", "predictors": {name: {"model_version", "weight", "shadow",
    "healthy", ...}}}``.
    Metrics (cumulative since the target started serving the deployment): ``{name: {"requests",
    "errors", "latency_ms_buckets": {upper_bound_ms: cumulative_count, ..., "+Inf": n},
    "latency_ms_sum", "feedback", "feedback_correct", "predicted": {class: rows}}}``; a shadow's
    requests are the mirrored ones. Targets that see both answers to a mirrored request add
    ``"pairs"`` and ``"agreements"`` (rows both answered, rows with the same predicted class) to the
    shadow's entry. Targets that time labels add ``"labelled"`` (requests whose truth label came)
    and ``"label_lag_s_buckets"`` (``{upper_bound_s: cumulative_count, ..., "+Inf": n}``, seconds
    from the prediction to its label).
    """

    # Whether the target can mirror requests to a shadow predictor; one that cannot refuses shadows
    # with a ValueError (check_target checks either).
    supports_shadow: bool = True

    @abstractmethod
    def deploy(self, deployment: str, predictors: list[dict[str, Any]]) -> dict[str, Any]:
        """Start the predictors that are not running, keep those that are (same name), apply weights.

        Predictors not listed keep running with their current weight; the resulting weights must
        sum to 100. Returns the state.
        """

    @abstractmethod
    def set_traffic(
        self, deployment: str, weights: dict[str, int], *, shadow: dict[str, int] | None = None
    ) -> dict[str, Any]:
        """Set the weights of the predictors named in ``weights`` (live, answering clients) and the
        mirror percentage of the one named in ``shadow``; others keep their role and weight.

        A shadow named in ``weights`` becomes live; see ``merge_traffic`` for the rules.
        """

    @abstractmethod
    def remove(self, deployment: str, predictor: str) -> dict[str, Any]:
        """Stop a predictor; a live one must receive no traffic (weight 0) first, a shadow may go at once."""

    @abstractmethod
    def state(self, deployment: str) -> dict[str, Any]:
        """The deployment's endpoint and predictors, with a live health check of each."""

    @abstractmethod
    def metrics(self, deployment: str) -> dict[str, dict[str, Any]]:
        """Cumulative request, error, latency and feedback counts per predictor."""

    async def ametrics(self, deployment: str) -> dict[str, dict[str, Any]]:
        """``metrics()`` for an asyncio loop (Airflow triggers); targets with an async client override it."""
        return await asyncio.to_thread(self.metrics, deployment)

    @abstractmethod
    def delete(self, deployment: str) -> None:
        """Stop everything the deployment runs."""


def check_deployment_name(deployment: str) -> None:
    if not isinstance(deployment, str) or not _NAME.match(deployment):
        raise ValueError(
            f"invalid deployment name {deployment!r}: use lowercase letters, digits and '-' "
            "(at most 63 characters, starting and ending with a letter or digit)"
        )


def check_predictor(predictor: dict[str, Any]) -> None:
    """Raise ValueError naming the problem in a predictor dict."""
    missing = {"name", "model_version", "model_dir", "weight"} - predictor.keys()
    if missing:
        raise ValueError(f"predictor {predictor!r} lacks {sorted(missing)}")
    if not isinstance(predictor["name"], str) or not _NAME.match(predictor["name"]):
        raise ValueError(f"invalid predictor name {predictor['name']!r}: use e.g. 'v3'")
    if not isinstance(predictor.get("shadow", False), bool):
        raise ValueError(
            f"'shadow' of predictor {predictor['name']!r} must be true or false, got {predictor['shadow']!r}"
        )
    (check_mirror if predictor.get("shadow") else check_weight)(predictor["name"], predictor["weight"])


def check_weight(name: str, weight: Any) -> None:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
        raise ValueError(f"weight of predictor {name!r} must be an integer from 0 to 100, got {weight!r}")


def check_mirror(name: str, percent: Any) -> None:
    # Seldon reads a shadow's traffic 0 as "mirror everything": 0 is refused rather than ambiguous.
    if isinstance(percent, bool) or not isinstance(percent, int) or not 1 <= percent <= 100:
        raise ValueError(
            f"mirrored percentage of shadow predictor {name!r} must be an integer from 1 to 100 "
            f"(remove the shadow to stop mirroring), got {percent!r}"
        )


def check_traffic(traffic: dict[str, dict[str, Any]]) -> None:
    """``{name: {"weight", "shadow"}}``: at most one shadow, live weights summing to 100."""
    shadows = sorted(name for name, t in traffic.items() if t.get("shadow"))
    if len(shadows) > 1:
        raise ValueError(f"a deployment has at most one shadow predictor, got {shadows}")
    live = {name: t["weight"] for name, t in traffic.items() if not t.get("shadow")}
    if sum(live.values()) != 100:
        raise ValueError(
            f"weights must sum to 100, got {sum(live.values())} for {live}"
            + (f" (shadow {shadows[0]} not counted)" if shadows else "")
        )


def merge_traffic(
    current: dict[str, dict[str, Any]], weights: dict[str, int], shadow: dict[str, int] | None = None
) -> dict[str, dict[str, Any]]:
    """``current`` (``{name: {"weight", "shadow"}}``) with the live ``weights`` and the ``shadow``
    mirror percentage applied; every name must exist, and the result must pass ``check_traffic``."""
    shadow = shadow or {}
    both = sorted(set(weights) & set(shadow))
    if both:
        raise ValueError(f"predictors {both} are named both live and shadow")
    unknown = sorted((set(weights) | set(shadow)) - set(current))
    if unknown:
        raise ValueError(f"unknown predictors {unknown}: the deployment has {sorted(current)}")
    merged = {name: {"weight": t["weight"], "shadow": bool(t.get("shadow"))} for name, t in current.items()}
    for name, weight in weights.items():
        check_weight(name, weight)
        merged[name] = {"weight": weight, "shadow": False}
    for name, percent in shadow.items():
        check_mirror(name, percent)
        merged[name] = {"weight": percent, "shadow": True}
    check_traffic(merged)
    return merged


# By path, imported on first use: the local target needs httpx, which the serving runtime (importing
# this package for the model class) does not have.
TARGETS: Registry[ServingTarget] = Registry(
    ServingTarget,
    "serving target",
    {
        "local": "airloop.serving.local:LocalServingTarget",
        "seldon": "airloop.serving.seldon:SeldonKubernetesTarget",
        "kserve": "airloop.serving.kserve:KServeTarget",
    },
    business_source=frozenset({"seldon"}),
)


def register_target(kind: str, cls: type[ServingTarget] | str) -> None:
    """Make ``get_target(kind)`` build ``cls`` (a ServingTarget subclass or its ``"module:Class"``)."""
    TARGETS.register(kind, cls)


def get_target(kind: str, **config: Any) -> ServingTarget:
    """The target registered as ``kind``, built with ``config`` (its constructor's arguments)."""
    return TARGETS.get(kind)(**config)
