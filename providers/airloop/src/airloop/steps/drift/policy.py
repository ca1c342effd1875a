"""The retraining policy: turn a drift verdict into an action, so one shift does not start ten retrains.

``decide(request) -> decision`` is a pure function: everything it needs (the detection, the last
retrain request, whether a retrain is running, the time now) is in the request, so the same inputs
always give the same decision. Gathering those inputs is the operator's job.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

ACTIONS = ("log", "retrain", "retrain_with_approval")
SEVERITIES = ("none", "low", "medium", "high")
DEFAULT_ACTIONS = {"none": "log", "low": "log", "medium": "retrain", "high": "retrain"}
_VERDICTS = ("drift", "no_drift", "insufficient_data", "invalid_window")
_KEYS = {
    "detection",
    "actions",
    "cooldown_minutes",
    "min_window_rows",
    "last_requested_at",
    "retrain_running",
    "now",
}


def decide(request: dict[str, Any]) -> dict[str, Any]:
    """Decide what a drift detection leads to.

    Request:
      ``detection``: the drift step's result (``verdict``, ``severity``, ``n_current``; others ignored);
      ``actions``: ``{severity: "log" | "retrain" | "retrain_with_approval"}`` over ``DEFAULT_ACTIONS``;
      ``cooldown_minutes`` (60): no retrain within this long after the last request;
      ``min_window_rows`` (0): fewest rows in the window to act on a drift verdict;
      ``last_requested_at``: epoch seconds of the last retrain request, or None;
      ``retrain_running`` (False): a retrain of the same model is queued or running;
      ``now``: epoch seconds (required, so the decision is reproducible).

    Result ``{"action", "code", "reason", "verdict", "severity", "wanted", "decided_at", "cooldown_until"}``:
    ``action`` is ``"none"`` (no drift, or too little data to tell), ``"log"`` (drift recorded, no
    retrain) or the retrain action; ``wanted`` is what the severity maps to, so a suppressed retrain
    reads ``action="log"``, ``wanted="retrain"`` with the reason in ``code`` / ``reason``.
    Checks run in this order, the first that applies decides: verdict, severity map, window size,
    retrain running, cooldown.
    """
    options = _parse(request)
    detection, now = options["detection"], options["now"]
    verdict, severity = detection["verdict"], detection.get("severity") or "none"

    def result(
        action: str, code: str, reason: str, wanted: str | None = None, cooldown_until: float | None = None
    ) -> dict[str, Any]:
        return {
            "action": action,
            "code": code,
            "reason": reason,
            "verdict": verdict,
            "severity": severity,
            "wanted": wanted,
            "decided_at": _iso(now),
            "cooldown_until": None if cooldown_until is None else _iso(cooldown_until),
        }

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

    wanted = options["actions"][severity]
    if wanted == "log":
        return result("log", "severity_maps_to_log", f"drift of severity {severity!r} maps to 'log'", wanted)
    rows, min_rows = detection.get("n_current"), options["min_window_rows"]
    if min_rows and (rows is None or int(rows) < min_rows):
        return result(
            "log",
            "window_too_small",
            f"drift of severity {severity!r} seen on {rows} rows; acting needs at least {min_rows}",
            wanted,
        )
    if options["retrain_running"]:
        return result(
            "log", "retrain_running", "a retrain of this model is already queued or running", wanted
        )
    last, cooldown = options["last_requested_at"], options["cooldown_minutes"] * 60
    if last is not None and now - last < cooldown:
        return result(
            "log",
            "cooldown",
            f"last retrain requested {now - last:.0f} s ago, within the "
            f"{options['cooldown_minutes']:g} min cooldown",
            wanted,
            cooldown_until=last + cooldown,
        )
    return result(wanted, "retrain_requested", f"drift of severity {severity!r} maps to {wanted!r}", wanted)


def _parse(request: dict[str, Any]) -> dict[str, Any]:
    unknown = set(request) - _KEYS
    if unknown:
        raise ValueError(f"unknown policy request keys: {sorted(unknown)}")
    detection = request.get("detection")
    if not isinstance(detection, dict) or detection.get("verdict") not in _VERDICTS:
        raise ValueError(
            f"'detection' must be a drift result with a verdict in {list(_VERDICTS)}, got {detection!r}"
        )
    if detection["verdict"] == "drift" and (detection.get("severity") or "none") not in SEVERITIES:
        raise ValueError(
            f"detection severity must be one of {list(SEVERITIES)}, got {detection['severity']!r}"
        )
    actions = {**DEFAULT_ACTIONS, **(request.get("actions") or {})}
    unknown = set(actions) - set(SEVERITIES)
    if unknown:
        raise ValueError(f"'actions' keys must be severities {list(SEVERITIES)}, got {sorted(unknown)}")
    bad = {severity: action for severity, action in actions.items() if action not in ACTIONS}
    if bad:
        raise ValueError(f"'actions' values must be one of {list(ACTIONS)}, got {bad}")
    if "now" not in request:
        raise ValueError("request is missing 'now' (epoch seconds)")
    last = request.get("last_requested_at")
    return {
        "detection": detection,
        "actions": actions,
        "cooldown_minutes": _number(request, "cooldown_minutes", 60),
        "min_window_rows": int(_number(request, "min_window_rows", 0)),
        "last_requested_at": None if last is None else _number(request, "last_requested_at", None),
        "retrain_running": bool(request.get("retrain_running", False)),
        "now": _number(request, "now", None),
    }


def _number(request: dict[str, Any], key: str, default: float | None) -> float:
    value: Any = request.get(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key!r} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{key!r} must be a finite number >= 0, got {value!r}")
    return number


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat()
