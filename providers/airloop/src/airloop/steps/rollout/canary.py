"""Rollout analysis: is the challenger at least as good as the champion over one window?

Request (``AnalysisRequest``, or the same fields in a dict)::

    {"mode": "canary" | "shadow", "before": metrics_snapshot, "after": metrics_snapshot,
     "champion": "v3", "challenger": "v4",
     "criteria": {"min_requests": 50, "min_feedback": 30, "max_error_rate_increase": 0.01,
                  "max_p99_latency_ratio": 1.5, "min_p99_latency_increase_ms": 25,
                  "max_accuracy_drop": 0.02, "min_pairs": 100, "min_agreement": 0.8,
                  "max_distribution_distance": 0.1, "alpha": 0.05}}

Snapshots have the shape of ``ServingTarget.metrics()``; the window is ``after - before``.
Result (``Verdict``): ``{"verdict": "pass" | "fail" | "wait", "reasons": [...], "champion": {...},
"challenger": {...}, "tests": {name: {"status", "reason", ...}}}``.

``canary`` (the challenger answers a share of the clients): errors, p99 latency and accuracy from
feedback labels. Quality is judged on matured labels only: the labels that came during the window,
for requests of each predictor (a label may take hours: it counts when it comes). Per predictor the
verdict reports ``requests``, ``labelled`` (requests whose label came, where the target times labels)
and the label lag (``label_lag_p50_s``, ``label_lag_p90_s``). With ``labels`` (per predictor, from
the labels log: ``airloop.labels.window_quality``) quality is judged on the labels come so far for
the requests each predictor answered in the window, whenever they came (feedback long after the
gateway forgot the prediction, ground truth ingested from files or tables). With fewer than ``min_feedback``
labelled rows on either predictor the accuracy check waits: the window never passes, and a window
still short of labels when its wait ends is ``inconclusive`` (``airloop.steps.rollout.rollout``:
the plan's ``on_inconclusive`` says what follows).

``shadow`` (the challenger gets mirrored requests, its answers go nowhere): the diff of the two
predictors' answers to the same traffic: errors, p99 latency, the agreement rate over mirrored rows
both answered (where the target records them: ``"pairs"`` in the snapshot) and the distance between
the distributions of predicted classes.

Each check needs its own minimum of data; with less it waits, and the verdict is never "pass" while
a check waits. Checks fail only when the challenger is significantly worse (one-sided tests at
``alpha``) by more than the allowance, so noise alone does not roll a good model back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist
from typing import Any, cast

from airloop.steps.rollout.requests import AnalysisRequest, PredictorStats, Verdict

DEFAULT_CRITERIA: dict[str, float] = {
    "min_requests": 50,
    "min_feedback": 30,
    "max_error_rate_increase": 0.01,
    "max_p99_latency_ratio": 1.5,
    # p99 over a short window of a busy machine jitters by tens of ms: a slower challenger fails only
    # when it is both max_p99_latency_ratio times and this many ms slower.
    "min_p99_latency_increase_ms": 25.0,
    "max_accuracy_drop": 0.02,
    # Shadow mode. Mirrored rows both predictors answered, and predicted rows per predictor, needed.
    "min_pairs": 100,
    # Lower than 1: a better model disagrees where the champion is wrong. Set it from the champion's
    # accuracy (a challenger right where the champion is right agrees at least that often).
    "min_agreement": 0.8,
    # Total variation distance between the predicted-class distributions (0: same, 1: disjoint).
    "max_distribution_distance": 0.1,
    "alpha": 0.05,
}
MODES = ("canary", "shadow")
_COUNTS = ("requests", "errors", "latency_ms_sum", "feedback", "feedback_correct", "labelled")
# Requests a latency quantile must leave above it. The p99 of 55 requests is their slowest one, so a
# single stall would decide a 10% canary step: with fewer than 100 x this many requests the check
# compares the highest quantile the window supports (p91 for 55 requests) and says which.
_LATENCY_TAIL = 5
# How clear an estimate's gap must be to roll a challenger back before its labels come: NannyML's own
# threshold, three sampling errors.
ESTIMATE_SIGMAS = 3


def analyse(request: Mapping[str, Any] | AnalysisRequest) -> Verdict:
    request = AnalysisRequest.parse(request)
    if request.mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {request.mode!r}")
    criteria = check_criteria(request.criteria)
    for role, name in (("champion", request.champion), ("challenger", request.challenger)):
        if not isinstance(name, str) or not name:
            raise ValueError(f"{role!r} must name a predictor, got {name!r}")
    if request.champion == request.challenger:
        raise ValueError(f"champion and challenger are the same predictor {request.champion!r}")
    names = {"champion": request.champion, "challenger": request.challenger}
    windows = {role: _window(request, name) for role, name in names.items()}
    champion, challenger = _summary(windows["champion"]), _summary(windows["challenger"])
    if request.labels is not None:
        if not isinstance(request.labels, dict):
            raise ValueError(f"'labels' must be {{predictor: matured labels}}, got {request.labels!r:.100}")
        for summary, name in ((champion, request.champion), (challenger, request.challenger)):
            _from_labels_log(summary, request.labels.get(name))

    reset = [names[r] for r, w in windows.items() if _went_down(w)]
    if reset:
        tests = {
            "reset": {
                "status": "wait",
                "reason": f"counters of {reset} went down during the window "
                "(the gateway restarted): analyse the next window",
            }
        }
    elif request.mode == "canary":
        tests = {
            "errors": _errors_test(champion, challenger, criteria),
            "latency": _latency_test(champion, challenger, criteria),
            "accuracy": _accuracy_test(champion, challenger, criteria),
        }
    else:
        tests = {
            "errors": _errors_test(champion, challenger, criteria),
            "latency": _latency_test(champion, challenger, criteria),
            "agreement": _agreement_test(challenger, criteria),
            "distribution": _distribution_test(champion, challenger, criteria),
        }
    # A skipped check (data the target cannot give) neither passes nor holds the verdict.
    statuses = {t["status"] for t in tests.values()} - {"skipped"}
    verdict = "fail" if "fail" in statuses else "wait" if "wait" in statuses else "pass"
    # A pass explains every check; a fail or a wait names the checks that caused it.
    reasons = [
        f"{name}: {t['reason']}" for name, t in tests.items() if verdict == "pass" or t["status"] == verdict
    ]
    return {
        "verdict": verdict,
        "mode": request.mode,
        "reasons": reasons,
        "champion": cast(PredictorStats, champion),
        "challenger": cast(PredictorStats, challenger),
        "tests": tests,
    }


def check_criteria(given: Mapping[str, Any]) -> dict[str, float]:
    """The criteria with the defaults filled in; ValueError names an unknown or invalid one."""
    unknown = sorted(set(given) - set(DEFAULT_CRITERIA))
    if unknown:
        raise ValueError(f"unknown canary criteria {unknown}: known are {sorted(DEFAULT_CRITERIA)}")
    criteria = {**DEFAULT_CRITERIA, **given}
    for key, value in criteria.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"canary criterion {key!r} must be a non-negative number, got {value!r}")
    if not 0 < criteria["alpha"] < 1:
        raise ValueError(f"canary criterion 'alpha' must be between 0 and 1, got {criteria['alpha']}")
    for key in ("min_agreement", "max_distribution_distance"):
        if criteria[key] > 1:
            raise ValueError(f"canary criterion {key!r} is a fraction from 0 to 1, got {criteria[key]}")
    return criteria


def _window(request: AnalysisRequest, name: str) -> dict[str, Any]:
    """``after - before`` for one predictor; absent before means it started during the window."""
    before, after = request.before, request.after
    if not isinstance(before, dict) or not isinstance(after, dict):
        raise ValueError("'before' and 'after' must be metrics snapshots {predictor: {...}}")
    if name not in after:
        raise ValueError(f"predictor {name!r} is not in the 'after' snapshot (it has {sorted(after)})")
    old, new = before.get(name) or {}, after[name]
    window = {k: new.get(k, 0) - old.get(k, 0) for k in _COUNTS}
    old_buckets = old.get("latency_ms_buckets") or {}
    window["latency_ms_buckets"] = {
        le: n - old_buckets.get(le, 0) for le, n in (new.get("latency_ms_buckets") or {}).items()
    }
    old_lags = old.get("label_lag_s_buckets") or {}
    window["label_lag_s_buckets"] = {
        le: n - old_lags.get(le, 0) for le, n in (new.get("label_lag_s_buckets") or {}).items()
    }
    old_predicted = old.get("predicted") or {}
    window["predicted"] = {c: n - old_predicted.get(c, 0) for c, n in (new.get("predicted") or {}).items()}
    # None: the target records no mirrored pairs (not: none happened).
    for key in ("pairs", "agreements"):
        window[key] = new[key] - old.get(key, 0) if key in new else None
    return window


def _went_down(window: dict[str, Any]) -> bool:
    counts = [
        *(window[k] for k in _COUNTS),
        *window["predicted"].values(),
        *(window[k] for k in ("pairs", "agreements") if window[k] is not None),
    ]
    return any(n < 0 for n in counts)


def _summary(window: dict[str, Any]) -> dict[str, Any]:
    requests, feedback, pairs = window["requests"], window["feedback"], window["pairs"]
    return {
        "requests": requests,
        "errors": window["errors"],
        "error_rate": window["errors"] / requests if requests > 0 else None,
        "p99_ms": histogram_quantile(0.99, window["latency_ms_buckets"]),
        "latency_ms_buckets": window["latency_ms_buckets"],
        "feedback": feedback,
        "accuracy": window["feedback_correct"] / feedback if feedback > 0 else None,
        "labelled": window["labelled"],
        "label_lag_p50_s": histogram_quantile(0.5, window["label_lag_s_buckets"]),
        "label_lag_p90_s": histogram_quantile(0.9, window["label_lag_s_buckets"]),
        "predicted": window["predicted"],
        "pairs": pairs,
        "agreement": window["agreements"] / pairs if pairs else None,
    }


def _from_labels_log(summary: dict[str, Any], arm: Mapping[str, Any] | None) -> None:
    """The summary's quality figures from the labels log instead of the feedback counters."""
    arm = arm or {}
    summary.update(
        {
            "feedback": arm.get("rows", 0),
            "accuracy": arm.get("accuracy"),
            "labelled": arm.get("labelled", 0),
            "label_lag_p50_s": arm.get("label_lag_p50_s"),
            "label_lag_p90_s": arm.get("label_lag_p90_s"),
        }
    )


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


def _one_sided_z(
    p_worse: float, n_worse: int, p_better: float, n_better: int, margin: float
) -> tuple[float, float]:
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
        return {
            "status": "wait",
            "reason": f"fewer than {minimum:g} requests per predictor (champion "
            f"{champion['requests']}, challenger {challenger['requests']})",
        }
    allowance = criteria["max_error_rate_increase"]
    z, p = _one_sided_z(
        challenger["error_rate"],
        challenger["requests"],
        champion["error_rate"],
        champion["requests"],
        allowance,
    )
    failed = p < criteria["alpha"]
    return {
        "status": "fail" if failed else "pass",
        "z": _finite(z),
        "p_value": p,
        "allowance": allowance,
        "difference": challenger["error_rate"] - champion["error_rate"],
        "reason": (
            f"error rate {challenger['error_rate']:.4f} vs champion {champion['error_rate']:.4f}: "
            f"{'significantly' if failed else 'not significantly'} more than {allowance:g} higher "
            f"(p={p:.3g})"
        ),
    }


def _latency_test(champion: dict, challenger: dict, criteria: dict) -> dict[str, Any]:
    minimum = criteria["min_requests"]
    requests = min(champion["requests"], challenger["requests"])
    if requests < minimum:
        return {"status": "wait", "reason": f"fewer than {minimum:g} requests per predictor for a p99"}
    q = min(0.99, 1 - _LATENCY_TAIL / requests)
    old = histogram_quantile(q, champion["latency_ms_buckets"])
    new = histogram_quantile(q, challenger["latency_ms_buckets"])
    if old is None or new is None:
        return {"status": "wait", "reason": "no latency histogram in the snapshots"}
    limit, slack = criteria["max_p99_latency_ratio"], criteria["min_p99_latency_increase_ms"]
    ratio = new / old if old > 0 else math.inf
    failed = ratio > limit and new - old > slack
    name = f"p{100 * q:.3g}"
    return {
        "status": "fail" if failed else "pass",
        "quantile": q,
        "ratio": _finite(ratio),
        "limit": limit,
        "reason": f"{name} {new:.2f} ms vs champion {old:.2f} ms (ratio {ratio:.2f}, limit {limit:g} and "
        f"+{slack:g} ms)" + ("" if q == 0.99 else f"; {requests} requests are too few for a p99"),
    }


def _accuracy_test(champion: dict, challenger: dict, criteria: dict) -> dict[str, Any]:
    minimum = max(criteria["min_feedback"], 1)  # no labels is no evidence, whatever the criteria say
    if min(champion["feedback"], challenger["feedback"]) < minimum:
        return {
            "status": "wait",
            "reason": f"fewer than {minimum:g} feedback labels per predictor (champion "
            f"{champion['feedback']} labelled of {champion['requests']} requests, challenger "
            f"{challenger['feedback']} of {challenger['requests']}): quality is judged on labels that came",
        }
    max_drop = criteria["max_accuracy_drop"]
    # A drop in accuracy is a rise in the error proportion 1 - accuracy.
    z, p = _one_sided_z(
        1 - challenger["accuracy"],
        challenger["feedback"],
        1 - champion["accuracy"],
        champion["feedback"],
        max_drop,
    )
    failed = p < criteria["alpha"]
    return {
        "status": "fail" if failed else "pass",
        "z": _finite(z),
        "p_value": p,
        "max_drop": max_drop,
        "difference": challenger["accuracy"] - champion["accuracy"],
        "reason": (
            f"accuracy {challenger['accuracy']:.4f} vs champion {champion['accuracy']:.4f}: "
            f"{'significantly' if failed else 'not significantly'} more than {max_drop:g} lower "
            f"(p={p:.3g})"
        ),
    }


def estimated_accuracy_test(
    champion: Mapping[str, Any] | None, challenger: Mapping[str, Any] | None, criteria: Mapping[str, Any]
) -> dict[str, Any]:
    """The early warning while labels are pending: each arm's accuracy estimated by CBPE
    (``airloop.steps.drift.performance``: ``estimated_accuracy`` and its ``sampling_error``). It fails
    when the challenger is clearly worse: more than ``max_accuracy_drop`` below the champion by three
    combined sampling errors. It never passes a window: an estimate alone never promotes."""
    figures = [arm or {} for arm in (champion, challenger)]
    if any(arm.get("estimated_accuracy") is None or arm.get("sampling_error") is None for arm in figures):
        return {"status": "skipped", "reason": "no estimate for both arms (no logged answers to estimate on)"}
    (ours, our_error), (theirs, their_error) = (
        (arm["estimated_accuracy"], arm["sampling_error"]) for arm in figures
    )
    max_drop = criteria.get("max_accuracy_drop", DEFAULT_CRITERIA["max_accuracy_drop"])
    gap, spread = ours - theirs - max_drop, math.sqrt(our_error**2 + their_error**2)
    sigmas = gap / spread if spread > 0 else (math.inf if gap > 0 else -math.inf)
    worse = sigmas > ESTIMATE_SIGMAS
    return {
        "status": "fail" if worse else "skipped",
        "champion": ours,
        "challenger": theirs,
        "sampling_errors": {"champion": our_error, "challenger": their_error},
        "sigmas": _finite(sigmas),
        "max_drop": max_drop,
        "reason": f"estimated accuracy (CBPE) {theirs:.4f} vs champion {ours:.4f}: "
        + (
            f"clearly more than {max_drop:g} lower ({sigmas:.1f} sampling errors)"
            if worse
            else "not clearly worse; an estimate alone never promotes"
        ),
    }


def _agreement_test(challenger: dict, criteria: dict) -> dict[str, Any]:
    if challenger["pairs"] is None:
        return {
            "status": "skipped",
            "reason": "the serving target records no mirrored pairs (on Kubernetes "
            "Istio drops the shadow's answers): not measured",
        }
    minimum = criteria["min_pairs"]
    if challenger["pairs"] < minimum:
        return {
            "status": "wait",
            "reason": f"fewer than {minimum:g} mirrored rows answered by both ({challenger['pairs']})",
        }
    rate, floor, n = challenger["agreement"], criteria["min_agreement"], challenger["pairs"]
    # One-sided test of H1: the agreement rate is below the floor.
    se = math.sqrt(floor * (1 - floor) / n)
    z = (floor - rate) / se if se > 0 else (math.inf if rate < floor else -math.inf)
    p = 1 - NormalDist().cdf(z)
    failed = p < criteria["alpha"]
    return {
        "status": "fail" if failed else "pass",
        "rate": rate,
        "pairs": n,
        "min_agreement": floor,
        "p_value": p,
        "reason": f"agreement {rate:.4f} over {n} mirrored rows: "
        f"{'significantly' if failed else 'not significantly'} below {floor:g} "
        f"(p={p:.3g})",
    }


def _distribution_test(champion: dict, challenger: dict, criteria: dict) -> dict[str, Any]:
    ours, theirs = champion["predicted"], challenger["predicted"]
    n_ours, n_theirs = sum(ours.values()), sum(theirs.values())
    minimum = criteria["min_pairs"]
    if min(n_ours, n_theirs) < minimum:
        return {
            "status": "wait",
            "reason": f"fewer than {minimum:g} predicted rows per predictor (champion "
            f"{n_ours}, challenger {n_theirs})",
        }
    classes = sorted(c for c in set(ours) | set(theirs) if ours.get(c, 0) + theirs.get(c, 0) > 0)
    distance = 0.5 * sum(abs(ours.get(c, 0) / n_ours - theirs.get(c, 0) / n_theirs) for c in classes)
    # Chi-square test of homogeneity of the 2 x classes table of counts.
    total, chi2 = n_ours + n_theirs, 0.0
    for c in classes:
        column = ours.get(c, 0) + theirs.get(c, 0)
        for observed, n in ((ours.get(c, 0), n_ours), (theirs.get(c, 0), n_theirs)):
            expected = n * column / total
            chi2 += (observed - expected) ** 2 / expected
    p = chi2_sf(chi2, len(classes) - 1)
    limit = criteria["max_distribution_distance"]
    failed = distance > limit and p < criteria["alpha"]
    return {
        "status": "fail" if failed else "pass",
        "distance": distance,
        "limit": limit,
        "chi2": chi2,
        "p_value": p,
        "champion": {c: ours.get(c, 0) / n_ours for c in classes},
        "challenger": {c: theirs.get(c, 0) / n_theirs for c in classes},
        "reason": f"predicted classes differ by {distance:.3f} (total variation; limit {limit:g}, "
        f"chi-square p={p:.3g})",
    }


def chi2_sf(x: float, dof: int) -> float:
    """P(X > x) for a chi-square variable with ``dof`` degrees of freedom (closed forms, no SciPy)."""
    if dof <= 0 or x <= 0:
        return 1.0
    half = x / 2
    if dof % 2 == 0:  # Poisson tail: e^-h * sum_{i < dof/2} h^i / i!
        term = total = 1.0
        for i in range(1, dof // 2):
            term *= half / i
            total += term
        return min(1.0, math.exp(-half) * total)
    # erfc(sqrt(h)) + e^-h * sum_{i=1}^{(dof-1)/2} h^(i-1/2) / Gamma(i+1/2)
    term, total = math.sqrt(half) / (math.sqrt(math.pi) / 2), 0.0
    for i in range(1, (dof + 1) // 2):
        total += term
        term *= half / (i + 0.5)
    return min(1.0, math.erfc(math.sqrt(half)) + math.exp(-half) * total)


def _finite(value: float) -> float | None:
    """JSON has no infinity."""
    return value if math.isfinite(value) else None
