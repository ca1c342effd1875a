"""The retraining policy: turn a drift verdict into an action, so one shift does not start ten retrains.

``decide(request) -> decision`` is a pure function: everything it needs (the detection, the last
retrain request, whether a retrain is running, the time now) is in the request, so the same inputs
always give the same decision. Gathering those inputs is the operator's job.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from typing import Any, get_args

from airloop.steps.drift.requests import DecideRequest, Decision, Severity, Verdict

ACTIONS = ("log", "retrain", "retrain_with_approval")
MODES = ("act", "suggest")
SEVERITIES: tuple[Severity, ...] = get_args(Severity)
DEFAULT_ACTIONS = {"none": "log", "low": "log", "medium": "retrain", "high": "retrain"}
_VERDICTS: tuple[Verdict, ...] = get_args(Verdict)


def decide(request: DecideRequest | Mapping[str, Any]) -> Decision:
    """Decide what a drift detection leads to.

    ``detection`` is a drift detect operator's result (``verdict``, ``severity``, ``n_current``,
    ``n_effective`` and ``message`` are read); ``cooldown_minutes``: no retrain within this long after
    the last request, unless the drift is more severe than the one that request was for;
    ``min_window_rows``: fewest effective rows (``n_effective``: repeats counted once, no more than the
    sparsest drifted feature's values; ``n_current`` for a detection without it) to act on a drift
    verdict; ``last_requested_at``: epoch seconds of the last retrain request, or None, and
    ``last_requested_severity`` the severity it was for; ``retrain_running``: a retrain of the same
    model is queued or running; ``now``: epoch seconds (required, so the decision is reproducible).

    ``mode``: ``"act"`` requests the retrain decided on; ``"suggest"`` never does: the retrain it
    would request reads ``code="suggested"`` (recorded and notified, a person decides).
    ``max_retrains``: the circuit breaker, at most this many retrain requests in any
    ``retrain_period_hours``, counted over ``recent_retrains`` (epoch seconds of the earlier requests);
    a retrain beyond it reads ``code="circuit_open"`` with ``cooldown_until`` when the breaker closes.
    An escalation passes the cooldown, never the breaker.

    ``action`` is ``"none"`` (no drift, or too little data to tell), ``"log"`` (drift recorded, no
    retrain) or the retrain action; ``wanted`` is what the severity maps to, so a suppressed retrain
    reads ``action="log"``, ``wanted="retrain"`` with the reason in ``code`` / ``reason``. A retrain
    within the cooldown for a more severe drift reads ``code="escalated"`` and names the severity it
    escalates from in ``escalated_from``. Checks run in this order, the first that applies decides:
    verdict, severity map, window size, retrain running, cooldown (or escalation), suggest mode,
    circuit breaker.
    """
    options = _checked(DecideRequest.parse(request))
    detection, now = options.detection, options.now
    verdict, severity = detection["verdict"], detection.get("severity") or "none"

    def result(
        action: str,
        code: str,
        reason: str,
        wanted: str | None = None,
        cooldown_until: float | None = None,
        escalated_from: Severity | None = None,
    ) -> Decision:
        return {
            "action": action,
            "code": code,
            "reason": reason,
            "verdict": verdict,
            "severity": severity,
            "wanted": wanted,
            "decided_at": _iso(now),
            "cooldown_until": None if cooldown_until is None else _iso(cooldown_until),
            "escalated_from": escalated_from,
        }

    def retrain(code: str, reason: str, escalated_from: Severity | None = None) -> Decision:
        """The retrain the checks let through, unless the mode or the circuit breaker holds it back."""
        if options.mode == "suggest":
            return result(
                "log",
                "suggested",
                f"{reason}: suggested only (mode 'suggest'), not requested",
                wanted,
                escalated_from=escalated_from,
            )
        limit, period = options.max_retrains, options.retrain_period_hours * 3600
        recent = sorted(t for t in options.recent_retrains or () if now - period < t <= now)
        if limit is not None and len(recent) >= limit:
            return result(
                "log",
                "circuit_open",
                f"{reason}, but {len(recent)} retrains were requested in the last "
                f"{options.retrain_period_hours:g} h (at most {limit}): the circuit breaker holds it",
                wanted,
                cooldown_until=recent[len(recent) - limit] + period,
                escalated_from=escalated_from,
            )
        return result(wanted, code, reason, wanted, escalated_from=escalated_from)

    if verdict == "no_drift":
        return result("none", "no_drift", "no feature drifted in the window")
    if verdict == "insufficient_data":
        return result(
            "none",
            "insufficient_data",
            f"too little data to test: {detection.get('message') or 'window below the minimum'}",
        )
    if verdict == "invalid_window":
        # Not drift, but the served data no longer matches the model's schema: worth a record.
        return result(
            "log", "invalid_window", f"window not testable: {detection.get('message') or 'schema differs'}"
        )

    wanted = (options.actions or DEFAULT_ACTIONS)[severity]
    if wanted == "log":
        return result("log", "severity_maps_to_log", f"drift of severity {severity!r} maps to 'log'", wanted)
    rows, min_rows = detection.get("n_current"), options.min_window_rows
    effective = detection.get("n_effective", rows)
    if min_rows and (effective is None or int(effective) < min_rows):
        counted = f" ({effective} effective)" if rows is not None and effective != rows else ""
        return result(
            "log",
            "window_too_small",
            f"drift of severity {severity!r} seen on {rows} rows{counted}; acting needs at least"
            f" {min_rows} effective rows",
            wanted,
        )
    if options.retrain_running:
        return result(
            "log", "retrain_running", "a retrain of this model is already queued or running", wanted
        )
    last, cooldown = options.last_requested_at, options.cooldown_minutes * 60
    if last is not None and now - last < cooldown:
        since = (
            f"last retrain requested {now - last:.0f} s ago, within the "
            f"{options.cooldown_minutes:g} min cooldown"
        )
        before = options.last_requested_severity
        # A false alarm must not hide the real shift: a more severe drift overrides the cooldown.
        if before is not None and SEVERITIES.index(severity) > SEVERITIES.index(before):
            return retrain(
                "escalated",
                f"drift of severity {severity!r} maps to {wanted!r} and is more severe than the"
                f" {before!r} drift the {since} was for: escalated",
                escalated_from=before,
            )
        return result("log", "cooldown", since, wanted, cooldown_until=last + cooldown)
    return retrain("retrain_requested", f"drift of severity {severity!r} maps to {wanted!r}")


def _checked(request: DecideRequest) -> DecideRequest:
    """The request with its values checked and its numbers made numbers (templates render strings)."""
    detection = request.detection
    if not isinstance(detection, Mapping) or detection.get("verdict") not in _VERDICTS:
        raise ValueError(
            f"'detection' must be a drift result with a verdict in {list(_VERDICTS)}, got {detection!r}"
        )
    if detection["verdict"] == "drift" and (detection.get("severity") or "none") not in SEVERITIES:
        raise ValueError(
            f"detection severity must be one of {list(SEVERITIES)}, got {detection['severity']!r}"
        )
    actions = {**DEFAULT_ACTIONS, **(request.actions or {})}
    unknown = set(actions) - set(SEVERITIES)
    if unknown:
        raise ValueError(f"'actions' keys must be severities {list(SEVERITIES)}, got {sorted(unknown)}")
    bad = {severity: action for severity, action in actions.items() if action not in ACTIONS}
    if bad:
        raise ValueError(f"'actions' values must be one of {list(ACTIONS)}, got {bad}")
    last, before = request.last_requested_at, request.last_requested_severity
    if before is not None and before not in SEVERITIES:
        raise ValueError(f"'last_requested_severity' must be one of {list(SEVERITIES)}, got {before!r}")
    if request.mode not in MODES:
        raise ValueError(f"'mode' must be one of {list(MODES)}, got {request.mode!r}")
    recent = request.recent_retrains
    if recent is not None and (not isinstance(recent, (list, tuple)) or isinstance(recent, str)):
        raise ValueError(f"'recent_retrains' must be a list of epoch seconds, got {recent!r}")
    limit = None if request.max_retrains is None else int(_number(request.max_retrains, "max_retrains"))
    if limit is not None and limit < 1:
        raise ValueError(f"'max_retrains' must be 1 or more (or None: no circuit breaker), got {limit}")
    period = _number(request.retrain_period_hours, "retrain_period_hours")
    if period <= 0:
        raise ValueError(f"'retrain_period_hours' must be more than 0, got {request.retrain_period_hours!r}")
    return request.replace(
        max_retrains=limit,
        retrain_period_hours=period,
        recent_retrains=[_number(t, "recent_retrains") for t in recent or ()],
        actions=actions,
        cooldown_minutes=_number(request.cooldown_minutes, "cooldown_minutes"),
        min_window_rows=int(_number(request.min_window_rows, "min_window_rows")),
        last_requested_at=None if last is None else _number(last, "last_requested_at"),
        retrain_running=bool(request.retrain_running),
        now=_number(request.now, "now"),
    )


def _number(value: Any, key: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key!r} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{key!r} must be a finite number >= 0, got {value!r}")
    return number


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat()
