"""The canary analysis trigger: driven directly, against a scripted serving target."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from airloop.serving.base import ServingTarget, register_target
from airloop.triggers.rollout import RolloutTrigger

BUCKETS = (
    "0.5",
    "1",
    "2",
    "5",
    "10",
    "20",
    "50",
    "100",
    "200",
    "500",
    "1000",
    "2000",
    "5000",
    "10000",
    "+Inf",
)


def snapshot(requests: int, correct: int) -> dict[str, Any]:
    """Cumulative metrics of one predictor: every request answered in 2-5 ms, all with feedback."""
    buckets = {b: (0 if float(b) < 5 else requests) for b in BUCKETS}
    return {
        "requests": requests,
        "errors": 0,
        "latency_ms_sum": 3.0 * requests,
        "feedback": requests,
        "feedback_correct": correct,
        "latency_ms_buckets": buckets,
    }


class ScriptedTarget(ServingTarget):
    """Answers ``metrics`` from a script: one snapshot per call, the last one repeated."""

    calls: dict[str, int] = {}

    def __init__(self, script: list[dict[str, Any]] | None = None, fail: bool = False) -> None:
        self.script = script or []
        self.fail = fail

    def metrics(self, deployment):
        if self.fail:
            raise ConnectionError("gateway down")
        n = ScriptedTarget.calls[deployment] = ScriptedTarget.calls.get(deployment, 0) + 1
        return self.script[min(n, len(self.script)) - 1]

    def deploy(self, deployment, predictors):
        raise NotImplementedError

    def set_traffic(self, deployment, weights):
        raise NotImplementedError

    def remove(self, deployment, predictor):
        raise NotImplementedError

    def state(self, deployment):
        raise NotImplementedError

    def delete(self, deployment):
        raise NotImplementedError


register_target("scripted", ScriptedTarget)
BEFORE = {"v1": snapshot(0, 0), "v2": snapshot(0, 0)}


def trigger(deployment: str, script: list, **overrides: Any) -> RolloutTrigger:
    kwargs = dict(
        target_config={"target": "scripted", "script": script},
        deployment=deployment,
        champion="v1",
        challenger="v2",
        before=BEFORE,
        criteria={"min_requests": 50, "min_feedback": 30},
        window_seconds=0.01,
        max_wait_seconds=0.3,
        poll_interval=0.02,
    )
    return RolloutTrigger(**{**kwargs, **overrides})


async def first(t: RolloutTrigger) -> dict[str, Any]:
    events = [event.payload async for event in t.run()]
    assert len(events) == 1
    return events[0]


def test_serialize_mirrors_init():
    original = trigger("d", [BEFORE], mode="shadow")
    path, kwargs = original.serialize()
    module, _, name = path.rpartition(".")
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)
    assert rebuilt.serialize() == (path, kwargs)
    assert path == "airloop.triggers.rollout.RolloutTrigger"
    assert kwargs["mode"] == "shadow"
    assert (kwargs["labels_root"], kwargs["labels_since"]) == (None, None)


def test_a_trigger_built_by_its_deprecated_name_serializes_under_the_new_one():
    import airloop.triggers.rollout as module

    with pytest.warns(DeprecationWarning, match="use RolloutTrigger"):
        old = module.SeldonCanaryAnalysisTrigger
    assert old is RolloutTrigger
    assert (
        old(**trigger("d", [BEFORE]).serialize()[1]).serialize()[0]
        == "airloop.triggers.rollout.RolloutTrigger"
    )


@pytest.mark.asyncio
async def test_waits_until_the_window_holds_enough_data():
    script = [
        BEFORE,
        {"v1": snapshot(20, 18), "v2": snapshot(5, 5)},
        {"v1": snapshot(400, 360), "v2": snapshot(100, 92)},
    ]
    event = await first(trigger("enough", script))
    assert event["status"] == "ready" and event["message"] == "pass"
    assert event["after"]["v2"]["requests"] == 100
    # The whole verdict travels with the event: the operator records it without analysing again.
    verdict = event["verdict"]
    assert verdict["verdict"] == "pass" and verdict["challenger"]["requests"] == 100
    assert {t["status"] for t in verdict["tests"].values()} == {"pass"}
    assert ScriptedTarget.calls["enough"] == 3  # polled until the data sufficed


@pytest.mark.asyncio
async def test_a_worse_challenger_is_ready_for_a_fail_verdict():
    script = [{"v1": snapshot(400, 380), "v2": snapshot(100, 50)}]
    event = await first(trigger("worse", script))
    assert event["status"] == "ready" and event["message"] == "fail"


@pytest.mark.asyncio
async def test_too_little_data_times_out_instead_of_passing():
    event = await first(trigger("idle", [{"v1": snapshot(10, 9), "v2": snapshot(2, 2)}]))
    assert event["status"] == "timeout"
    assert "not enough data" in event["message"]
    assert event["verdict"]["verdict"] == "wait" and event["verdict"]["challenger"]["requests"] == 2


@pytest.mark.asyncio
async def test_busy_arms_whose_labels_have_not_come_time_out_instead_of_passing():
    # Plenty of fast requests on both arms; the challenger's labels come later than the wait lasts.
    unlabelled = {**snapshot(200, 0), "feedback": 0}
    event = await first(trigger("late", [{"v1": snapshot(400, 360), "v2": unlabelled}]))
    assert event["status"] == "timeout" and "fewer than 30 feedback labels" in event["message"]
    tests = event["verdict"]["tests"]
    assert (tests["errors"]["status"], tests["latency"]["status"], tests["accuracy"]["status"]) == (
        "pass",
        "pass",
        "wait",
    )


@pytest.mark.asyncio
async def test_labels_from_the_labels_log_decide_the_window(tmp_path):
    """Counters without feedback, a labels log (the gateway's writer) with every label of the window."""
    import time

    from airloop.serving.logs import LABELS_FOLDER, RequestLog

    root, since = tmp_path.as_uri(), time.time() - 60
    requests, labels = (
        RequestLog(root, "logged", 1000),
        RequestLog(root, "logged", 1000, folder=LABELS_FOLDER),
    )
    for n in range(100):
        predictor = "v1" if n % 2 else "v2"
        request_id = f"{n:032x}"
        requests.add(
            {
                "request_id": request_id,
                "ts": since + 1,
                "predictor": predictor,
                "model_version": predictor[1:],
                "prediction": [[0.2, 0.8]],
                "classes": ["0", "1"],
                "status": 200,
            }
        )
        wrong = predictor == "v2" and n % 4 == 0  # the challenger is wrong on half its requests
        labels.add({"request_id": request_id, "ts": since + 30, "truth": [0.0 if wrong else 1.0]})
    requests.write(requests.take())
    labels.write(labels.take())
    unlabelled = {"v1": {**snapshot(400, 0), "feedback": 0}, "v2": {**snapshot(200, 0), "feedback": 0}}
    counted = await first(trigger("logged", [unlabelled], criteria={"min_requests": 50, "min_feedback": 30}))
    assert counted["status"] == "timeout"  # the counters alone: no labels
    logged = await first(trigger("logged", [unlabelled], labels_root=root, labels_since=since))
    assert logged["status"] == "ready" and logged["message"] == "fail"
    challenger = logged["verdict"]["challenger"]
    assert (challenger["labelled"], challenger["accuracy"]) == (50, 0.5)
    assert challenger["label_lag_p50_s"] == pytest.approx(29, abs=0.01)


@pytest.mark.asyncio
async def test_an_unreachable_target_is_an_error_event():
    event = await first(trigger("down", [], target_config={"target": "scripted", "fail": True}))
    assert event["status"] == "error" and "gateway down" in event["message"]
    assert event["verdict"] is None


@pytest.mark.asyncio
async def test_a_challenger_gone_from_the_metrics_is_an_error_event():
    # e.g. the rollout was aborted (on_kill) while the window waited in the worker
    event = await first(trigger("gone", [{"v1": snapshot(400, 360)}]))
    assert event["status"] == "error" and "'v2' is not in the 'after' snapshot" in event["message"]


@pytest.mark.asyncio
async def test_shadow_mode_judges_the_mirrored_answers():
    def shadow(requests: int, agreements: int, pairs: int = 0) -> dict[str, Any]:
        return {
            **snapshot(requests, 0),
            "feedback": 0,
            "predicted": {"0": requests // 2, "1": requests // 2},
            "pairs": pairs,
            "agreements": agreements,
        }

    before = {"v1": shadow(0, 0), "v2": shadow(0, 0)}
    script = [
        {"v1": shadow(400, 0), "v2": shadow(60, 60, pairs=60)},  # too few pairs: wait
        {"v1": shadow(400, 0), "v2": shadow(200, 100, pairs=200)},
    ]
    event = await first(trigger("shadow", script, before=before, mode="shadow"))
    # No feedback at all: a canary would wait for labels; the shadow verdict needs none.
    assert event["status"] == "ready" and event["message"] == "fail"
    assert ScriptedTarget.calls["shadow"] == 2
