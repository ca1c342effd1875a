"""Challengers judged while their labels come late, on the real local target: versions trained, converted
and registered by the real steps, and the embedded loop's clients sending the true label of 60% of
their answers 8 to 10 s after each answer (``--label-share``, ``--label-delay``): every window of
2 s ends without a label, and the gateway's request log (written every 5 s) holds the answers the
estimate reads before any label comes.

- A challenger trained on inverted labels answers fast, without errors and confidently, and wrongly:
  only its labels can tell. Its window is inconclusive, the estimate (CBPE) sees nothing wrong, the
  window is extended, and the challenger is rolled back once its labels have matured.
- A challenger trained on shuffled labels is unsure of every answer: CBPE estimates it far below the
  champion, and it is rolled back at the first inconclusive window, before any of its labels came.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from airflow.sdk.exceptions import AirflowFailException

from airloop import artefacts, runtimes, settings
from airloop.operators.rollout import RolloutChallengerOperator
from airloop.serving.base import get_target
from airloop.tracking.registry import aliases
from tests.fakes.context import task_context
from tests.integration.test_rollout import Clients, register_version

MODEL, DEPLOYMENT = "late-label-faults", "late-label-faults"
LATE_LABELS = ("--label-share", "0.6", "--label-delay", "8-10")
CRITERIA = {"min_requests": 30, "min_feedback": 30, "alpha": 0.001}


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> Iterator[dict[str, str]]:
    for runtime in ("serving", "monitoring"):
        try:
            runtimes.python(runtime)
        except runtimes.RuntimeMissingError as e:
            pytest.skip(str(e))
    from airloop.embedded.demo import generate
    from airloop.tables import write_table

    folder = tmp_path_factory.mktemp("data")
    good = generate(800, seed=3)
    shuffled = good.assign(label=np.random.default_rng(0).permutation(good["label"].to_numpy()))
    made = {
        "champion": register_version(write_table(good, str(folder / "good.parquet")), 1, MODEL),
        "inverted": register_version(
            write_table(good.assign(label=1 - good["label"]), str(folder / "inverted.parquet")), 2, MODEL
        ),
        "unsure": register_version(write_table(shuffled, str(folder / "shuffled.parquet")), 3, MODEL),
    }
    yield made
    get_target("local").delete(DEPLOYMENT)


@pytest.fixture(scope="module")
def clients(versions, tmp_path_factory) -> Iterator[Clients]:
    assert rollout(versions["champion"]).execute(task_context())["decision"] == "deployed"
    endpoint = get_target("local").state(DEPLOYMENT)["endpoint"]
    running = Clients(endpoint, tmp_path_factory.mktemp("clients"), labels=LATE_LABELS)
    try:
        yield running
    finally:
        running.stop()


def rollout(version: str, **kwargs: Any) -> RolloutChallengerOperator:
    return RolloutChallengerOperator(
        task_id="rollout",
        model_name=MODEL,
        version=version,
        deployment=DEPLOYMENT,
        steps=(50, 100),
        analysis_seconds=1,
        max_wait_seconds=1,
        poll_interval=0.5,
        criteria=CRITERIA,
        on_inconclusive="extend",
        max_extensions=20,
        **kwargs,
    )


def run(operator: RolloutChallengerOperator) -> tuple[str, dict[str, Any]]:
    """The rollout's failure message and its report."""
    with pytest.raises(AirflowFailException) as failed:
        operator.execute(task_context())
    return str(failed.value), json.loads((artefacts.root() / operator.report_path).read_text())


def assert_rolled_back(champion: str) -> None:
    predictors = get_target("local").state(DEPLOYMENT)["predictors"]
    assert {name: p["weight"] for name, p in predictors.items()} == {f"v{champion}": 100}
    assert aliases(settings.mlflow_tracking_uri(), MODEL)["champion"] == champion


def test_a_challenger_wrong_only_on_its_late_labels_is_rolled_back_once_they_mature(versions, clients):
    message, report = run(rollout(versions["inverted"]))
    steps = report["steps"]
    *waited, last = steps
    assert waited and {s["verdict"] for s in waited} == {"extended"}, [s["verdict"] for s in steps]
    # While its labels had not come the estimate saw a confident challenger: nothing to act on.
    estimated = [
        s["tests"]["estimated_accuracy"] for s in waited if "challenger" in s["tests"]["estimated_accuracy"]
    ]
    assert estimated and {e["status"] for e in estimated} == {"skipped"}, estimated
    assert all(e["challenger"] > e["champion"] - 0.1 for e in estimated), estimated
    assert last["verdict"] == "fail" and last["tests"]["accuracy"]["status"] == "fail", last
    assert last["challenger_stats"]["accuracy"] < 0.3 < 0.7 < last["champion_stats"]["accuracy"]
    assert "accuracy" in message
    assert_rolled_back(versions["champion"])


def test_a_challenger_clearly_worse_by_its_estimate_is_rolled_back_before_its_labels_come(versions, clients):
    message, report = run(rollout(versions["unsure"]))
    *waited, step = report["steps"]
    assert {s["verdict"] for s in waited} <= {"extended"}
    # Failed on the estimate while the accuracy check still waited for labels.
    assert step["verdict"] == "fail" and step["tests"]["accuracy"]["status"] == "wait", step
    assert step["challenger_stats"]["feedback"] < CRITERIA["min_feedback"]
    estimate = step["tests"]["estimated_accuracy"]
    assert estimate["status"] == "fail" and estimate["challenger"] < estimate["champion"] - 0.2, estimate
    assert "estimated accuracy (CBPE)" in message
    assert_rolled_back(versions["champion"])
