"""The retraining policy: every decision and its reason, and no retrain storm."""

from __future__ import annotations

import pytest

from airloop.steps.drift.policy import DEFAULT_ACTIONS, decide
from airloop.steps.drift.requests import DecideRequest

NOW = 1_700_000_000.0


def drift(severity: str = "high", rows: int = 1000, **more: object) -> dict:
    return {
        "verdict": "drift",
        "severity": severity,
        "n_current": rows,
        **more,
        "model_name": "m",
        "champion": "1",
        "drifted_features": ["f1"],
        "report": "drift/m/x/report.json",
    }


def request(**overrides) -> dict:
    return {
        "detection": drift(),
        "cooldown_minutes": 60,
        "min_window_rows": 200,
        "last_requested_at": None,
        "retrain_running": False,
        "now": NOW,
        **overrides,
    }


def test_drift_with_nothing_in_the_way_requests_a_retrain():
    decision = decide(request())
    assert decision == {
        "action": "retrain",
        "code": "retrain_requested",
        "reason": "drift of severity 'high' maps to 'retrain'",
        "verdict": "drift",
        "severity": "high",
        "wanted": "retrain",
        "decided_at": "2023-11-14T22:13:20+00:00",
        "cooldown_until": None,
        "escalated_from": None,
    }


@pytest.mark.parametrize(
    ("verdict", "action", "code"),
    [
        ("no_drift", "none", "no_drift"),
        ("insufficient_data", "none", "insufficient_data"),
        ("invalid_window", "log", "invalid_window"),
    ],
)
def test_windows_without_a_drift_verdict_never_retrain(verdict, action, code):
    detection = {"verdict": verdict, "severity": "none", "n_current": 10, "message": "missing column f3"}
    decision = decide(request(detection=detection))
    assert (decision["action"], decision["code"], decision["wanted"]) == (action, code, None)
    assert decision["reason"]
    if verdict != "no_drift":
        assert "missing column f3" in decision["reason"]


@pytest.mark.parametrize("severity", ["none", "low", "medium", "high"])
def test_default_severity_map(severity):
    decision = decide(request(detection=drift(severity)))
    assert decision["action"] == DEFAULT_ACTIONS[severity]
    assert decision["code"] == (
        "retrain_requested" if DEFAULT_ACTIONS[severity] == "retrain" else "severity_maps_to_log"
    )
    assert repr(severity) in decision["reason"]


def test_severity_map_overrides_defaults_and_can_require_approval():
    actions = {"low": "retrain", "high": "retrain_with_approval"}
    assert decide(request(detection=drift("low"), actions=actions))["action"] == "retrain"
    assert decide(request(detection=drift("medium"), actions=actions))["action"] == "retrain"  # default kept
    approval = decide(request(detection=drift("high"), actions=actions))
    assert (approval["action"], approval["wanted"]) == ("retrain_with_approval", "retrain_with_approval")
    logged = decide(request(detection=drift("high"), actions={"high": "log"}))
    assert (logged["action"], logged["code"]) == ("log", "severity_maps_to_log")


def test_minimum_window_size():
    small = decide(request(detection=drift(rows=199)))
    assert (small["action"], small["code"], small["wanted"]) == ("log", "window_too_small", "retrain")
    assert "199 rows" in small["reason"] and "200" in small["reason"]
    assert decide(request(detection=drift(rows=200)))["action"] == "retrain"
    unknown = decide(request(detection={k: v for k, v in drift().items() if k != "n_current"}))
    assert unknown["code"] == "window_too_small"


def test_the_minimum_window_counts_effective_rows():
    # The false alarm: 248 rows, 93 of them repeats, so 155 that count.
    small = decide(request(detection=drift("medium", rows=248, n_effective=155)))
    assert (small["action"], small["code"], small["wanted"]) == ("log", "window_too_small", "retrain")
    assert "248 rows (155 effective)" in small["reason"] and "at least 200 effective rows" in small["reason"]
    assert decide(request(detection=drift(rows=248, n_effective=200)))["action"] == "retrain"


def test_a_more_severe_drift_within_the_cooldown_escalates():
    # A medium drift requested a retrain 582 s ago; a high one now is not held back by its cooldown.
    last = {"last_requested_at": NOW - 582, "last_requested_severity": "medium"}
    escalated = decide(request(**last))
    assert (escalated["action"], escalated["code"], escalated["wanted"]) == (
        "retrain",
        "escalated",
        "retrain",
    )
    assert escalated["escalated_from"] == "medium" and escalated["cooldown_until"] is None
    assert "more severe than the 'medium' drift" in escalated["reason"] and "582 s ago" in escalated["reason"]
    approval = decide(request(actions={"high": "retrain_with_approval"}, **last))
    assert (approval["action"], approval["code"]) == ("retrain_with_approval", "escalated")
    # As severe or less, or a request of unknown severity: the cooldown holds.
    for severity, before in [("medium", "medium"), ("medium", "high"), ("high", None)]:
        held = decide(
            request(detection=drift(severity), last_requested_at=NOW - 582, last_requested_severity=before)
        )
        assert (held["code"], held["escalated_from"]) == ("cooldown", None)
    # Escalation never skips the earlier checks.
    assert decide(request(retrain_running=True, **last))["code"] == "retrain_running"
    assert decide(request(detection=drift(rows=248, n_effective=155), **last))["code"] == "window_too_small"


def test_dedupe_while_a_retrain_is_running():
    decision = decide(request(retrain_running=True))
    assert (decision["action"], decision["code"], decision["wanted"]) == ("log", "retrain_running", "retrain")
    assert "already queued or running" in decision["reason"]


def test_cooldown_holds_until_it_ends():
    held = decide(request(last_requested_at=NOW - 59 * 60))
    assert (held["action"], held["code"]) == ("log", "cooldown")
    assert held["cooldown_until"] == "2023-11-14T22:14:20+00:00"
    assert "3540 s ago" in held["reason"] and "60 min" in held["reason"]
    assert decide(request(last_requested_at=NOW - 60 * 60))["action"] == "retrain"
    assert decide(request(last_requested_at=NOW - 10, cooldown_minutes=0))["action"] == "retrain"


def test_checks_run_in_the_documented_order():
    # Everything that could hold a retrain back at once: the earliest check names the reason.
    blocked = request(detection=drift(rows=5), retrain_running=True, last_requested_at=NOW)
    assert decide(blocked)["code"] == "window_too_small"
    assert decide({**blocked, "detection": drift()})["code"] == "retrain_running"
    assert decide({**blocked, "detection": drift(), "retrain_running": False})["code"] == "cooldown"
    assert decide({**blocked, "detection": drift("low")})["code"] == "severity_maps_to_log"


def test_retrain_storm_yields_exactly_one_retrain():
    """Drift on every window: ten decisions a minute apart within a 60-minute cooldown request one retrain."""
    last, actions = None, []
    for minute in range(10):
        decision = decide(request(last_requested_at=last, now=NOW + 60 * minute))
        actions.append(decision["action"])
        if decision["action"] == "retrain":
            last = NOW + 60 * minute  # what the operator records (the registered-model tag)
        else:
            assert decision["code"] == "cooldown"
    assert actions == ["retrain"] + ["log"] * 9
    # The shift persists: the first window after the cooldown asks again, once.
    assert decide(request(last_requested_at=last, now=NOW + 3600))["action"] == "retrain"


def test_the_same_inputs_give_the_same_decision():
    assert decide(request(last_requested_at=NOW - 30)) == decide(request(last_requested_at=NOW - 30))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"detection": None}, "'detection' must be a drift result"),
        ({"detection": {"verdict": "maybe"}}, "'detection' must be a drift result"),
        ({"detection": {**drift(), "severity": "extreme"}}, "severity must be one of"),
        ({"actions": {"critical": "retrain"}}, "'actions' keys must be severities"),
        ({"actions": {"high": "retrain_and_page"}}, "'actions' values must be one of"),
        ({"cooldown_minutes": -1}, "'cooldown_minutes' must be a finite number >= 0"),
        ({"cooldown_minutes": "soon"}, "'cooldown_minutes' must be a number"),
        ({"min_window_rows": float("nan")}, "'min_window_rows' must be a finite number"),
        ({"last_requested_at": "yesterday"}, "'last_requested_at' must be a number"),
        ({"last_requested_severity": "extreme"}, "'last_requested_severity' must be one of"),
        ({"window": 5}, "DecideRequest: unknown field\\(s\\) \\['window'\\]"),
    ],
)
def test_bad_requests_name_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        decide(request(**overrides))


def test_now_is_required():
    with pytest.raises(ValueError, match=r"missing required field\(s\) \['now'\]"):
        decide({k: v for k, v in request().items() if k != "now"})


def test_templated_numbers_are_accepted():
    # Operator arguments rendered from Jinja arrive as strings.
    decision = decide(request(cooldown_minutes="60", min_window_rows="200", last_requested_at=NOW - 30))
    assert decision["code"] == "cooldown"


def test_the_typed_request_and_its_dict_decide_alike():
    typed = DecideRequest(detection=drift(rows=199), now=NOW)
    assert decide(typed) == decide(typed.to_dict())
    # The defaults are the operator's: a 200-row minimum window, a 60-minute cooldown.
    assert decide(typed)["code"] == "window_too_small"
    assert decide(typed.replace(detection=drift(), last_requested_at=NOW - 59 * 60))["code"] == "cooldown"


def test_a_false_alarm_on_repeated_rows_no_longer_hides_the_real_shift(tmp_path):
    """The issue's trial on breast_cancer: a 248-row window, 93 of them repeats of 3 requests, read as
    medium drift (8 of 30 features) and started the cooldown that then held back the real shift."""
    import numpy as np
    import pandas as pd
    from sklearn.datasets import load_breast_cancer

    from airloop.steps.drift.detect import detect

    table = load_breast_cancer(as_frame=True).frame.drop(columns="target")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(table))
    reference, rest = table.iloc[order[:314]], table.iloc[order[314:]]
    fresh = rest.iloc[:155]
    resent = fresh.iloc[rng.choice(155, 3, replace=False)]
    windows = {
        "repeats": pd.concat([fresh, resent.loc[resent.index.repeat(31)]]),
        # The real shift, as in the trial: the served rows above the reference's median of one feature.
        "shift": rest[rest["mean radius"] > reference["mean radius"].median()],
    }
    reference.to_parquet(tmp_path / "reference.parquet")
    found = {}
    for name, window in windows.items():
        window.to_parquet(tmp_path / name)
        base = {"reference_uri": str(tmp_path / "reference.parquet"), "current_uri": str(tmp_path / name)}
        found[name] = {rows: detect({**base, "min_rows": rows}) for rows in (200, 100)}

    repeats = found["repeats"]
    assert (repeats[200]["n_current"], repeats[200]["n_effective"]) == (248, 155)
    assert repeats[200]["verdict"] == "insufficient_data" and "93 repeats" in repeats[200]["message"]
    # With a minimum the 155 distinct rows meet, the repeats are tested once: no false alarm.
    assert repeats[100]["verdict"] == "no_drift" and "93 repeated rows tested once" in repeats[100]["message"]
    shift = found["shift"][100]
    assert (shift["verdict"], shift["severity"]) == ("drift", "high")

    def decided(result, **state):
        keys = ("verdict", "severity", "n_current", "n_effective", "message")
        detection = {**drift(), **{key: result[key] for key in keys}}
        return decide(request(detection=detection, min_window_rows=100, **state))

    assert decided(repeats[200])["action"] == decided(repeats[100])["action"] == "none"  # no cooldown starts
    assert decided(shift)["code"] == "retrain_requested"
    # And had a medium drift requested a retrain 582 s before, the real shift escalates past its cooldown.
    escalated = decided(shift, last_requested_at=NOW - 582, last_requested_severity="medium")
    assert (escalated["action"], escalated["code"], escalated["escalated_from"]) == (
        "retrain",
        "escalated",
        "medium",
    )


# -- suggest-only mode and the circuit breaker ---------------------------------------------------------


def test_suggest_mode_records_the_retrain_it_would_request_and_requests_none():
    decision = decide(request(mode="suggest"))
    assert (decision["action"], decision["code"], decision["wanted"]) == ("log", "suggested", "retrain")
    assert "suggested only (mode 'suggest'), not requested" in decision["reason"]
    # What would not retrain in "act" mode reads the same in "suggest" mode.
    for overrides in ({"retrain_running": True}, {"last_requested_at": NOW - 60}):
        held = decide(request(**overrides))
        assert decide(request(mode="suggest", **overrides)) == held


def test_suggest_mode_suggests_an_escalation_too():
    decision = decide(request(mode="suggest", last_requested_at=NOW - 60, last_requested_severity="medium"))
    assert (decision["action"], decision["code"], decision["escalated_from"]) == (
        "log",
        "suggested",
        "medium",
    )


def test_the_circuit_breaker_allows_at_most_n_retrains_per_period():
    hour = 3600.0
    breaker = {"max_retrains": 2, "retrain_period_hours": 24, "cooldown_minutes": 0}
    assert decide(request(recent_retrains=[NOW - 5 * hour], **breaker))["action"] == "retrain"
    opened = decide(request(recent_retrains=[NOW - 30 * hour, NOW - 5 * hour, NOW - hour], **breaker))
    assert (opened["action"], opened["code"], opened["wanted"]) == ("log", "circuit_open", "retrain")
    assert "2 retrains were requested in the last 24 h (at most 2)" in opened["reason"]
    # It closes when the older of the two counted requests is a period old.
    assert opened["cooldown_until"] == decide(request(now=NOW + 19 * hour))["decided_at"]
    # Requests older than the period no longer count.
    assert (
        decide(request(recent_retrains=[NOW - 30 * hour, NOW - 25 * hour], **breaker))["action"] == "retrain"
    )


def test_an_escalation_passes_the_cooldown_but_not_the_circuit_breaker():
    escalating = {"last_requested_at": NOW - 60, "last_requested_severity": "medium"}
    decision = decide(request(max_retrains=1, recent_retrains=[NOW - 60], **escalating))
    assert (decision["code"], decision["escalated_from"]) == ("circuit_open", "medium")
    assert decide(request(**escalating))["code"] == "escalated"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode": "auto"}, r"'mode' must be one of \['act', 'suggest'\]"),
        ({"max_retrains": 0}, "'max_retrains' must be 1 or more"),
        ({"max_retrains": 2, "retrain_period_hours": 0}, "'retrain_period_hours' must be more than 0"),
        ({"recent_retrains": "yesterday"}, "'recent_retrains' must be a list of epoch seconds"),
        ({"recent_retrains": ["soon"]}, "'recent_retrains' must be a number"),
    ],
)
def test_bad_breaker_and_mode_settings_name_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        decide(request(**overrides))
