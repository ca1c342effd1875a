"""What a window short of labels leads to: the rollout's state machine over a serving target in memory
and a real MLflow registry (SQLite), driven with the events the trigger sends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from airloop.steps.rollout.canary import analyse
from airloop.steps.rollout.requests import RolloutRequest, WindowEvent
from airloop.steps.rollout.rollout import Rollout, Window
from airloop.tracking.registry import REJECTED_TAG, aliases, read_audit
from tests.fakes.targets import MemoryTarget

MODEL, DEPLOYMENT = "late-labels", "late-labels"
CRITERIA = {"min_requests": 50, "min_feedback": 30}


class _Rollout(Rollout):
    """A rollout whose predictors need no OpenVINO IR: the target in memory runs nothing."""

    def predictor(self, version: str) -> dict[str, Any]:
        return {"name": f"v{version}", "model_version": version, "model_dir": "/models"}


@pytest.fixture
def registry(tmp_path: Path) -> str:
    """``MODEL`` v1 (the champion) and v2, each with a source run, on MLflow over SQLite."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("late", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_registered_model(MODEL)
    for _ in range(2):
        run = client.create_run(experiment)
        client.create_model_version(MODEL, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(MODEL, "champion", "1")
    return uri


def snapshot(requests: int, labelled: int = 0, correct: int = 0) -> dict[str, Any]:
    """One predictor's cumulative metrics: every request answered in under 5 ms."""
    return {
        "requests": requests,
        "errors": 0,
        "latency_ms_sum": 3.0 * requests,
        "latency_ms_buckets": {"5": requests, "+Inf": requests},
        "feedback": labelled,
        "feedback_correct": correct,
        "labelled": labelled,
        "label_lag_s_buckets": {"60": labelled, "+Inf": labelled},
    }


def start(registry: str, tmp_path: Path, **options: Any) -> tuple[_Rollout, MemoryTarget, Window]:
    target = MemoryTarget()
    target.counts[DEPLOYMENT] = {"v1": snapshot(1000, 500, 450)}
    request = RolloutRequest(
        tracking_uri=registry,
        model_name=MODEL,
        version="2",
        deployment=DEPLOYMENT,
        steps=(50, 100),
        criteria=CRITERIA,
        **options,
    )
    rollout = _Rollout(request, target, tmp_path / "artefacts")
    window = rollout.start()
    assert isinstance(window, Window)
    return rollout, target, window


def event(window: Window, after: dict[str, Any], status: str) -> WindowEvent:
    """The trigger's event for ``after``: ``ready`` with its verdict, or ``timeout`` (still waiting)."""
    verdict = analyse(
        {
            "before": window.before,
            "after": after,
            "champion": window.champion,
            "challenger": window.challenger,
            "criteria": window.criteria,
        }
    )
    message = (
        verdict["verdict"]
        if status == "ready"
        else "not enough data after 30s: " + "; ".join(verdict["reasons"])
    )
    return {"status": status, "message": message, "after": after, "verdict": verdict}


# Both arms busy and fast, but no labels for the challenger yet.
NO_LABELS = {"v1": snapshot(2000, 600, 540), "v2": snapshot(1000)}
LABELLED = {"v1": snapshot(3000, 700, 630), "v2": snapshot(2000, 200, 180)}


def test_a_window_without_labels_rolls_back_by_default(registry, tmp_path):
    rollout, target, window = start(registry, tmp_path)
    timed_out = event(window, NO_LABELS, "timeout")
    assert timed_out["verdict"]["verdict"] == "wait"  # never "pass" without labels
    done = rollout.record_window(window.step, timed_out)
    assert done["decision"] == "rolled_back" and "(inconclusive)" in done["message"]
    assert "feedback labels" in done["message"]
    assert target.weights(DEPLOYMENT) == {"v1": 100}
    import mlflow

    tags = mlflow.MlflowClient(registry).get_model_version(MODEL, "2").tags
    assert tags[REJECTED_TAG] == "true"


def test_extend_waits_again_on_the_same_window_then_rolls_back_at_the_maximum(registry, tmp_path):
    rollout, target, window = start(registry, tmp_path, on_inconclusive="extend", max_extensions=2)
    weights = target.weights(DEPLOYMENT)
    assert weights == {"v1": 50, "v2": 50}
    for extension in (1, 2):
        target.counts[DEPLOYMENT] = NO_LABELS
        again = rollout.record_window(window.step, event(window, NO_LABELS, "timeout"))
        assert isinstance(again, Window), again
        # The same window goes on: counted from the same snapshot, traffic untouched, a new entry.
        assert again.before == window.before and again.step == window.step + 1
        assert target.weights(DEPLOYMENT) == weights
        step = rollout.reports.load()["steps"][-1]
        assert (step["stage"], step["extension"]) == (0, extension)
        window = again
    done = rollout.record_window(window.step, event(window, NO_LABELS, "timeout"))
    assert done["decision"] == "rolled_back" and "still inconclusive after 2 extensions" in done["message"]
    verdicts = [s["verdict"] for s in rollout.reports.load()["steps"]]
    assert verdicts == ["extended", "extended", "inconclusive"]
    assert target.weights(DEPLOYMENT) == {"v1": 100}


def test_a_window_reads_the_labels_log_only_when_asked_and_an_extension_keeps_its_start(registry, tmp_path):
    from airloop import settings

    rollout, _, window = start(registry, tmp_path)
    assert window.labels_root is None and window.labels_since is not None
    rollout, _, window = start(registry, tmp_path / "log", labels_from="log", on_inconclusive="extend")
    assert window.labels_root == settings.artefact_root()
    again = rollout.record_window(window.step, event(window, NO_LABELS, "timeout"))
    assert isinstance(again, Window) and again.labels_since == window.labels_since


def test_extend_promotes_once_the_labels_have_come(registry, tmp_path):
    rollout, target, window = start(registry, tmp_path, on_inconclusive="extend")
    window = rollout.record_window(window.step, event(window, NO_LABELS, "timeout"))
    assert isinstance(window, Window)
    done = rollout.record_window(window.step, event(window, LABELLED, "ready"))
    assert done["decision"] == "promoted", done
    assert aliases(registry, MODEL)["champion"] == "2"
    stats = rollout.reports.load()["steps"][1]["challenger_stats"]
    assert (stats["labelled"], stats["requests"]) == (200, 2000)
    audit = {s["stage"]: s["record"] for s in read_audit(registry, MODEL, "2")["stages"]}
    assert [s.get("verdict") for s in audit["rollout"]["steps"]] == ["extended", "pass", "promoted"]


@pytest.mark.parametrize(("approved", "decision"), [(True, "promoted"), (False, "rolled_back")])
def test_hold_waits_for_a_person_with_traffic_as_it_is(registry, tmp_path, approved, decision):
    rollout, target, window = start(registry, tmp_path, on_inconclusive="hold")
    held = rollout.record_window(window.step, event(window, NO_LABELS, "timeout"))
    assert held["decision"] == "awaiting_approval", held
    assert target.weights(DEPLOYMENT) == {"v1": 50, "v2": 50}
    hold = rollout.reports.load()["steps"][-1]
    assert hold["kind"] == "approval" and "inconclusive" in hold["reasons"][0]
    assert rollout.decide(approved=approved, by="ops", reason="looked at it")["decision"] == decision
    winner = "2" if approved else "1"
    assert target.weights(DEPLOYMENT) == {f"v{winner}": 100}
    assert aliases(registry, MODEL)["champion"] == winner


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"on_inconclusive": "wait"}, r"on_inconclusive must be one of \['rollback', 'extend', 'hold'\]"),
        ({"max_extensions": -1}, "max_extensions must be 0 or more"),
        ({"labels_from": "feedback"}, r"labels_from must be one of \['metrics', 'log'\]"),
    ],
)
def test_a_bad_inconclusive_plan_is_named_before_anything_is_deployed(registry, tmp_path, options, problem):
    target = MemoryTarget()
    request = RolloutRequest(
        tracking_uri=registry, model_name=MODEL, version="2", deployment=DEPLOYMENT, **options
    )
    with pytest.raises(ValueError, match=problem):
        _Rollout(request, target, tmp_path / "artefacts").start()
    assert target.predictors == {}


def estimates(champion: float, challenger: float, error: float = 0.01):
    """The rollout's ``estimate``: each arm's CBPE figures, as the monitoring step gives them."""

    def estimate(versions: list[str], since: float) -> dict[str, Any]:
        assert versions == ["1", "2"] and since > 0
        return {
            "1": {"estimated_accuracy": champion, "sampling_error": error},
            "2": {"estimated_accuracy": challenger, "sampling_error": error},
        }

    return estimate


@pytest.mark.parametrize("action", ["extend", "hold"])
def test_a_challenger_clearly_worse_by_its_estimate_is_rolled_back_before_its_labels_come(
    registry, tmp_path, action
):
    rollout, target, window = start(registry, tmp_path, on_inconclusive=action)
    rollout.estimate = estimates(0.92, 0.70)
    done = rollout.record_window(window.step, event(window, NO_LABELS, "timeout"))
    assert done["decision"] == "rolled_back", done
    assert (
        "estimated accuracy (CBPE) 0.7000 vs champion 0.9200: clearly more than 0.02 lower" in done["message"]
    )
    (step,) = rollout.reports.load()["steps"]
    assert step["verdict"] == "fail" and step["tests"]["estimated_accuracy"]["status"] == "fail"
    assert target.weights(DEPLOYMENT) == {"v1": 100}


def test_an_estimate_never_promotes_and_one_that_cannot_be_made_leaves_the_window_inconclusive(
    registry, tmp_path
):
    rollout, target, window = start(registry, tmp_path, on_inconclusive="extend")
    rollout.estimate = estimates(0.90, 0.99)  # the challenger looks better: its labels still decide
    again = rollout.record_window(window.step, event(window, NO_LABELS, "timeout"))
    assert isinstance(again, Window)
    first = rollout.reports.load()["steps"][0]
    assert first["verdict"] == "extended" and first["tests"]["estimated_accuracy"]["status"] == "skipped"
    # Within three sampling errors of the allowance: not clear enough to act on.
    rollout.estimate = estimates(0.90, 0.85, error=0.02)
    again = rollout.record_window(again.step, event(again, NO_LABELS, "timeout"))
    assert isinstance(again, Window)

    def missing(versions: list[str], since: float) -> dict[str, Any]:
        raise RuntimeError("the 'monitoring' runtime is missing")

    rollout.estimate = missing
    done = rollout.record_window(again.step, event(again, NO_LABELS, "timeout"))
    assert done["decision"] == "rolled_back" and "still inconclusive after 2 extensions" in done["message"]
    assert target.weights(DEPLOYMENT) == {"v1": 100}
