"""Canary analysis: is the challenger at least as good as the champion over one traffic window?

Request::

    {"before": metrics_snapshot, "after": metrics_snapshot, "champion": "v3", "challenger": "v4",
     "criteria": {"min_requests": 50, "min_feedback": 30, "max_error_rate_increase": 0.01,
                  "max_p99_latency_ratio": 1.5, "min_p99_latency_increase_ms": 25,
                  "max_accuracy_drop": 0.02, "alpha": 0.05}}

Snapshots have the shape of ``ServingTarget.metrics()``; the window is ``after - before``.
Result: ``{"verdict": "pass" | "fail" | "wait", "reasons": [...], "champion": {...},
"challenger": {...}, "tests": {"errors": {...}, "latency": {...}, "accuracy": {...}}}``.

Each check needs its own minimum of data; with less it waits, and the verdict is never "pass" while
a check waits. Errors and accuracy fail only when the challenger is significantly worse (one-sided
z-tests at ``alpha``) by more than the allowance, so noise alone does not roll a good model back.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

DEFAULT_CRITERIA: dict[str, float] = {
    "min_requests": 50,
    "min_feedback": 30,
    "max_error_rate_increase": 0.01,
    "max_p99_latency_ratio": 1.5,
    # p99 over a short window of a busy machine jitters by tens of ms: a slower challenger fails only
    # when it is both max_p99_latency_ratio times and this many ms slower.
    "min_p99_latency_increase_ms": 25.0,
    "max_accuracy_drop": 0.02,
    "alpha": 0.05,
}
_COUNTS = ("requests", "errors", "latency_ms_sum", "feedback", "feedback_correct")


def analyse(request: dict[str, Any]) -> dict[str, Any]:
    criteria = _criteria(request.get("criteria") or {})
    names: dict[str, str] = {}
    for role in ("champion", "challenger"):
        name = request.get(role)
        if not isinstance(name, str) or not name:
            raise ValueError(f"{role!r} must name a predictor, got {name!r}")
        names[role] = name
    if names["champion"] == names["challenger"]:
        raise ValueError(f"champion and challenger are the same predictor {names['champion']!r}")
    windows = {role: _window(request, name) for role, name in names.items()}
    summary = {role: _summary(window) for role, window in windows.items()}

    reset = [names[r] for r, w in windows.items() if any(w[k] < 0 for k in _COUNTS)]
    if reset:
        tests = {"reset": {"status": "wait", "reason": f"counters of {reset} went down during the window "
                                                       "(the gateway restarted): analyse the next window"}}
    else:
        tests = {
            "errors": _errors_test(summary["champion"], summary["challenger"], criteria),
            "latency": _latency_test(summary["champion"], summary["challenger"], criteria),
            "accuracy": _accuracy_test(summary["champion"], summary["challenger"], criteria),
        }
    statuses = {t["status"] for t in tests.values()}
    verdict = "fail" if "fail" in statuses else "wait" if "wait" in statuses else "pass"
    # A pass explains every check; a fail or a wait names the checks that caused it.
    reasons = [f"{name}: {t['reason']}" for name, t in tests.items()
               if verdict == "pass" or t["status"] == verdict]
    return {"verdict": verdict, "reasons": reasons, **summary, "tests": tests}


def _criteria(given: dict[str, Any]) -> dict[str, float]:
    unknown = sorted(set(given) - set(DEFAULT_CRITERIA))
    if unknown:
        raise ValueError(f"unknown canary criteria {unknown}: known are {sorted(DEFAULT_CRITERIA)}")
    criteria = {**DEFAULT_CRITERIA, **given}
    for key, value in criteria.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"canary criterion {key!r} must be a non-negative number, got {value!r}")
    if not 0 < criteria["alpha"] < 1:
        raise ValueError(f"canary criterion 'alpha' must be between 0 and 1, got {criteria['alpha']}")
    return criteria


def _window(request: dict[str, Any], name: str) -> dict[str, Any]:
    """``after - before`` for one predictor; absent before means it started during the window."""
    before, after = request.get("before"), request.get("after")
    if not isinstance(before, dict) or not isinstance(after, dict):
        raise ValueError("'before' and 'after' must be metrics snapshots {predictor: {...}}")
    if name not in after:
        raise ValueError(f"predictor {name!r} is not in the 'after' snapshot (it has {sorted(after)})")
    old, new = before.get(name) or {}, after[name]
    window = {k: new.get(k, 0) - old.get(k, 0) for k in _COUNTS}
    old_buckets = old.get("latency_ms_buckets") or {}
    window["latency_ms_buckets"] = {le: n - old_buckets.get(le, 0)
                                    for le, n in (new.get("latency_ms_buckets") or {}).items()}
    return window


def _summary(window: dict[str, Any]) -> dict[str, Any]:
    requests, feedback = window["requests"], window["feedback"]
    return {
        "requests": requests,
        "errors": window["errors"],
        "error_rate": window["errors"] / requests if requests > 0 else None,
        "p99_ms": histogram_quantile(0.99, window["latency_ms_buckets"]),
        "feedback": feedback,
        "accuracy": window["feedback_correct"] / feedback if feedback > 0 else None,
    }


def histogram_quantile(q: float, buckets: dict[str, float]) -> float | None:
    """The q-quantile of cumulative buckets ``{upper_bound: count}``, interpolated like Prometheus'.

    Falls on the highest finite bound when the quantile lies in the ``+Inf`` bucket.
    """
    bounds = sorted((math.inf if le == "+Inf" else float(le), n) for le, n in buckets.items())
    total = bounds[-1][1] if bounds else 0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in bounds:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def _one_sided_z(p_worse: float, n_worse: int, p_better: float, n_better: int,
                 margin: float) -> tuple[float, float]:
    """z and p-value for H1: p_worse - p_better > margin (unpooled two-proportion z-test)."""
    se = math.sqrt(p_worse * (1 - p_worse) / n_worse + p_better * (1 - p_better) / n_better)
    excess = p_worse - p_better - margin
    if se == 0:  # all-or-nothing rates: the difference is exact
        return (math.inf if excess > 0 else -math.inf), (0.0 if excess > 0 else 1.0)
    z = excess / se
    return z, 1 - NormalDist().cdf(z)


def _errors_test(champion: dict, challenger: dict, criteria: dict) -> dict[str, Any]:
    minimum = criteria["min_requests"]
    if min(champion["requests"], challenger["requests"]) < minimum:
        return {"status": "wait", "reason": f"fewer than {minimum:g} requests per predictor (champion "
                                            f"{champion['requests']}, challenger {challenger['requests']})"}
    allowance = criteria["max_error_rate_increase"]
    z, p = _one_sided_z(challenger["error_rate"], challenger["requests"], champion["error_rate"],
                        champion["requests"], allowance)
    failed = p < criteria["alpha"]
    return {
        "status": "fail" if failed else "pass", "z": _finite(z), "p_value": p, "allowance": allowance,
        "difference": challenger["error_rate"] - champion["error_rate"],
        "reason": (f"error rate {challenger['error_rate']:.4f} vs champion {champion['error_rate']:.4f}: "
                   f"{'significantly' if failed else 'not significantly'} more than {allowance:g} higher "
                   f"(p={p:.3g})"),
    }


def _latency_test(champion: dict, challenger: dict, criteria: dict) -> dict[str, Any]:
    minimum = criteria["min_requests"]
    if min(champion["requests"], challenger["requests"]) < minimum:
        return {"status": "wait", "reason": f"fewer than {minimum:g} requests per predictor for a p99"}
    if champion["p99_ms"] is None or challenger["p99_ms"] is None:
        return {"status": "wait", "reason": "no latency histogram in the snapshots"}
    limit, slack = criteria["max_p99_latency_ratio"], criteria["min_p99_latency_increase_ms"]
    ratio = challenger["p99_ms"] / champion["p99_ms"] if champion["p99_ms"] > 0 else math.inf
    failed = ratio > limit and challenger["p99_ms"] - champion["p99_ms"] > slack
    return {"status": "fail" if failed else "pass", "ratio": _finite(ratio), "limit": limit,
            "reason": f"p99 {challenger['p99_ms']:.2f} ms vs champion {champion['p99_ms']:.2f} ms "
                      f"(ratio {ratio:.2f}, limit {limit:g} and +{slack:g} ms)"}


def _accuracy_test(champion: dict, challenger: dict, criteria: dict) -> dict[str, Any]:
    minimum = criteria["min_feedback"]
    if min(champion["feedback"], challenger["feedback"]) < minimum:
        return {"status": "wait", "reason": f"fewer than {minimum:g} feedback labels per predictor (champion "
                                            f"{champion['feedback']}, challenger {challenger['feedback']})"}
    max_drop = criteria["max_accuracy_drop"]
    # A drop in accuracy is a rise in the error proportion 1 - accuracy.
    z, p = _one_sided_z(1 - challenger["accuracy"], challenger["feedback"], 1 - champion["accuracy"],
                        champion["feedback"], max_drop)
    failed = p < criteria["alpha"]
    return {
        "status": "fail" if failed else "pass", "z": _finite(z), "p_value": p, "max_drop": max_drop,
        "difference": challenger["accuracy"] - champion["accuracy"],
        "reason": (f"accuracy {challenger['accuracy']:.4f} vs champion {champion['accuracy']:.4f}: "
                   f"{'significantly' if failed else 'not significantly'} more than {max_drop:g} lower "
                   f"(p={p:.3g})"),
    }


def _finite(value: float) -> float | None:
    """JSON has no infinity."""
    return value if math.isfinite(value) else None
