"""The rollout operators against the real local serving target, under load, with faults.

Versions of one registered model are trained, converted and registered by the real steps on the
test's MLflow (SQLite under AIRLOOP_HOME): v1 the champion, v2 trained on shuffled labels (answers
fast and without errors, but wrongly), v3 and v4 good challengers. The simulated clients of the
embedded loop (``python -m airloop.embedded.traffic``, a second process) send predictions and their
true labels to the gateway throughout; every test checks what they saw.

Faults come from ``faulty_model.FaultyModel`` (next to this file), which Seldon's wrapper runs in the
serving runtime: the challenger's server crashes, answers 500 or answers slowly. Kills come from
``killed_rollout.py`` (next to this file): a rollout task in another process, SIGKILLed right after a
chosen write to the serving target, then retried here.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

from airloop import artefacts, runtimes, settings
from airloop.operators.rollout import RolloutChallengerOperator, RolloutFinishOperator
from airloop.serving.base import get_target
from airloop.tracking.registry import REJECTED_TAG, aliases, read_audit
from tests.fakes.context import TaskInstance, task_context

MODEL, DEPLOYMENT = "rollout-faults", "rollout-faults"
# Small windows: the shuffled-label model is ~50% accurate against ~90%, visible in a few dozen labels;
# it agrees with the champion about half the time, visible in a hundred mirrored rows.
# Small windows keep the tests short; alpha 0.001 keeps a good challenger's unlucky window (about 60
# feedback rows) from failing a test about something else, while the faults here stand out at p < 1e-5.
CRITERIA = {"min_requests": 30, "min_feedback": 30, "min_pairs": 100, "min_agreement": 0.7, "alpha": 0.001}
HERE = Path(__file__).resolve().parent


def register_version(data_uri: str, seed: int, model: str = MODEL) -> str:
    """Train, convert and register a version of ``model`` with the real steps; its version number."""
    from airloop.steps.conversion.convert import convert
    from airloop.steps.training.register import register
    from airloop.steps.training.train import train

    tracking_uri = settings.mlflow_tracking_uri()
    trained = train(
        {
            "tracking_uri": tracking_uri,
            "data_uri": data_uri,
            "experiment": model,
            "seed": seed,
            "artifact_root": settings.mlflow_artifact_root(),
        }
    )
    convert(
        {
            "tracking_uri": tracking_uri,
            "run_id": trained["run_id"],
            "variants": ["fp32"],
            "benchmark_calls": 5,
        }
    )
    registered = register({"tracking_uri": tracking_uri, "model_name": model, "run_id": trained["run_id"]})
    return registered["version"]


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> Iterator[dict[str, str]]:
    try:
        runtimes.python("serving")
    except runtimes.RuntimeMissingError as e:
        pytest.skip(str(e))
    from airloop.embedded.demo import generate
    from airloop.tables import write_table

    folder = tmp_path_factory.mktemp("data")
    good = generate(800, seed=3)
    shuffled = good.assign(label=np.random.default_rng(0).permutation(good["label"].to_numpy()))
    good_uri = write_table(good, str(folder / "good.parquet"))
    made = {
        "champion": register_version(good_uri, seed=1),
        "wrong": register_version(write_table(shuffled, str(folder / "shuffled.parquet")), seed=2),
        "good": register_version(good_uri, seed=3),
        "better": register_version(write_table(generate(800, seed=5), str(folder / "more.parquet")), seed=4),
    }
    yield made
    get_target("local").delete(DEPLOYMENT)


class Clients:
    """The embedded loop's simulated clients in their own process; what they saw, per predictor."""

    def __init__(self, endpoint: str, folder: Path, rate: float = 150.0, labels: Sequence[str] = ()) -> None:
        self.stats_path = folder / "clients.json"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "airloop.embedded.traffic",
                "--endpoint",
                endpoint,
                "--control",
                str(folder / "world.json"),
                "--stats",
                str(self.stats_path),
                "--concurrency",
                "4",
                "--rate",
                str(rate),
                *labels,
            ]
        )

    def seen(self, settle: bool = True) -> dict[str, dict[str, int]]:
        """Cumulative ``{predictor: {"requests", "errors", "correct"}}`` ("unreachable": no answer)."""
        from airloop.embedded.traffic import read_stats

        if settle:
            time.sleep(1.2)  # the clients write their counts every second

        return read_stats(self.stats_path).get("0.0", {})

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


@pytest.fixture(scope="module")
def clients(versions, tmp_path_factory) -> Iterator[Clients]:
    operator = _operator(versions["champion"])
    assert operator.execute(task_context())["decision"] == "deployed"
    running = Clients(get_target("local").state(DEPLOYMENT)["endpoint"], tmp_path_factory.mktemp("clients"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def seen(clients) -> Callable[[], dict[str, dict[str, int]]]:
    """What the clients have seen since the test started: ``{predictor: {"requests", "errors", ...}}``."""
    # The last test waited for the counts of its own end; those of this one's start may be a second old.
    before = clients.seen(settle=False)
    return lambda: {
        name: {k: n - before.get(name, {}).get(k, 0) for k, n in counts.items()}
        for name, counts in clients.seen().items()
    }


def _kwargs(version: str, **kwargs: Any) -> dict[str, Any]:
    return {
        "model_name": MODEL,
        "version": version,
        "deployment": DEPLOYMENT,
        "steps": (50, 100),
        "analysis_seconds": 2,
        "max_wait_seconds": 30,
        "poll_interval": 0.5,
        "criteria": CRITERIA,
        **kwargs,
    }


def _operator(version: str, **kwargs: Any) -> RolloutChallengerOperator:
    return RolloutChallengerOperator(task_id="rollout", **_kwargs(version, **kwargs))


def _finish(version: str) -> RolloutFinishOperator:
    return RolloutFinishOperator(task_id="finish", model_name=MODEL, version=version, deployment=DEPLOYMENT)


def _killed(version: str, kill: dict[str, Any], **kwargs: Any) -> None:
    """Roll ``version`` out in another process, SIGKILLed right after the serving target's write ``kill``."""
    spec = json.dumps({"operator": _kwargs(version, **kwargs), "kill": kill})
    command = [sys.executable, "-m", "tests.integration.killed_rollout", spec]
    done = subprocess.run(command, cwd=HERE.parents[1], timeout=180)
    assert done.returncode == -signal.SIGKILL


def _weights() -> dict[str, int]:
    return {name: p["weight"] for name, p in get_target("local").state(DEPLOYMENT)["predictors"].items()}


def _report(operator: RolloutChallengerOperator | RolloutFinishOperator) -> dict[str, Any]:
    return json.loads((artefacts.root() / operator.report_path).read_text())


def _audit(version: str) -> dict[str, Any]:
    """The loop's audit record of a version: ``{stage: record}``."""
    stages = read_audit(settings.mlflow_tracking_uri(), MODEL, version)["stages"]
    return {s["stage"]: s["record"] for s in stages}


def _champion() -> str:
    return aliases(settings.mlflow_tracking_uri(), MODEL)["champion"]


def _rolled_back(version: str, champion: str) -> None:
    """The champion serves everything; the challenger is gone from serving and marked in the registry."""
    from mlflow import MlflowClient

    assert _weights() == {f"v{champion}": 100}
    current = aliases(settings.mlflow_tracking_uri(), MODEL)
    assert current["champion"] == champion and current.get("challenger") != version
    tags = MlflowClient(settings.mlflow_tracking_uri()).get_model_version(MODEL, version).tags
    assert tags[REJECTED_TAG] == "true"


def _only_failures_of(seen: dict[str, Any], faulty: str | None = None) -> None:
    """Clients saw no failure while weights changed, except answers of the faulty predictor."""
    # "unreachable": no answer from the gateway at all.
    assert {name: c["errors"] for name, c in seen.items() if name != faulty and c["errors"]} == {}
    assert sum(c["requests"] for c in seen.values()) > 0


def test_a_challenger_with_wrong_predictions_is_rolled_back_within_one_window(versions, seen):
    champion, wrong = versions["champion"], versions["wrong"]
    operator = _operator(wrong)
    ti = TaskInstance()
    with pytest.raises(
        AirflowFailException, match=f"v{wrong} rolled back at canary 50% \\(fail\\).*accuracy"
    ):
        operator.execute({"ti": ti})
    assert ti.xcom["airloop_rollout_report"] == {"path": operator.report_path}

    report = _report(operator)
    assert (report["phase"], report["decision"]) == ("done", "rolled_back")
    (step,) = report["steps"]  # decided in the first analysis window
    assert (step["kind"], step["verdict"]) == ("canary", "fail")
    assert step["challenger_stats"]["accuracy"] < step["champion_stats"]["accuracy"]
    _rolled_back(wrong, champion)
    from mlflow import MlflowClient

    tags = MlflowClient(settings.mlflow_tracking_uri()).get_model_version(MODEL, wrong).tags
    assert "fail" in tags["airloop.rejected.reason"]
    _only_failures_of(seen())


def test_a_wrong_shadow_is_rolled_back_before_any_client_sees_its_answers(versions, seen):
    champion, wrong = versions["champion"], versions["wrong"]
    # Rejected by the last test: rolled out again only because a person says so.
    # What this test is about is agreement: a loaded machine's latency jitter must not decide it first.
    lenient = {**CRITERIA, "min_p99_latency_increase_ms": 250.0}
    operator = _operator(wrong, mode="shadow", shadow_percent=100, allow_rejected=True, criteria=lenient)
    with pytest.raises(
        AirflowFailException, match=f"v{wrong} rolled back at shadow 0% \\(fail\\).*agreement"
    ):
        operator.execute(task_context())
    report = _report(operator)
    (step,) = report["steps"]
    assert (step["kind"], step["mirror"], step["verdict"]) == ("shadow", 100, "fail")
    # The diff report: agreement over mirrored rows, class mix and latency of both.
    assert step["tests"]["agreement"]["status"] == "fail" and step["challenger_stats"]["agreement"] < 0.7
    assert step["challenger_stats"]["pairs"] >= CRITERIA["min_pairs"]
    assert step["tests"]["distribution"]["status"] in ("pass", "fail")
    assert step["challenger_stats"]["p99_ms"] > 0
    _rolled_back(wrong, champion)
    clients_saw = seen()
    _only_failures_of(clients_saw)
    assert clients_saw.get(f"v{wrong}", {}).get("requests", 0) == 0  # no client got an answer of the shadow
    audit = _audit(wrong)
    (shadow,) = audit["rollout"]["steps"]
    assert (audit["rollout"]["decision"], audit["rollout"]["mode"]) == ("rolled_back", "shadow")
    assert shadow["diff"]["agreement"] == step["challenger_stats"]["agreement"]


@pytest.mark.parametrize(
    ("fault", "check"),
    [
        ({"kind": "crash", "after": 20}, "errors"),
        ({"kind": "error", "after": 0}, "errors"),
        ({"kind": "latency", "after": 0, "delay_ms": 150}, "latency"),
    ],
    ids=["crash", "5xx", "latency"],
)
def test_a_faulty_challenger_is_rolled_back_within_one_window(versions, seen, monkeypatch, fault, check):
    champion, good = versions["champion"], versions["good"]
    operator = _operator(good, allow_rejected=True)  # each fault rejects it
    # The challenger's server is the test's faulty class, for this model folder only.
    monkeypatch.setenv(
        "AIRFLOW_CONN_AIRLOOP_SERVING_DEFAULT",
        json.dumps(
            {
                "conn_type": "airloop_serving",
                "extra": {"target": "local", "model_class": "faulty_model.FaultyModel"},
            }
        ),
    )
    monkeypatch.setenv("PYTHONPATH", str(HERE))
    model_dir = operator.rollout.predictor(good)["model_dir"]
    monkeypatch.setenv("AIRLOOP_TEST_FAULT", json.dumps({**fault, "model_dir": model_dir}))
    started = time.monotonic()
    with pytest.raises(AirflowFailException, match=f"v{good} rolled back at canary 50% \\(fail\\): {check}:"):
        operator.execute(task_context())
    (step,) = _report(operator)["steps"]  # the first window decided
    assert step["tests"][check]["status"] == "fail"
    assert time.monotonic() - started < 60
    _rolled_back(good, champion)
    # A failed answer of the challenger (crash, 5xx) is retried on the champion: the clients saw no
    # failure at all, while the analysis counted it against the challenger (its test failed above).
    _only_failures_of(seen())


def test_a_rejected_approval_rolls_back(versions, seen):
    from airflow.providers.standard.exceptions import HITLRejectException
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    champion, good = versions["champion"], versions["good"]
    result = _operator(good, approval=True, allow_rejected=True).execute(task_context())
    assert (result["decision"], result["challenger"]) == ("awaiting_approval", good)
    # Held at the last window's traffic, aliases unmoved: what is served and what is recorded agree.
    assert _weights() == {f"v{champion}": 50, f"v{good}": 50}
    assert aliases(settings.mlflow_tracking_uri(), MODEL)["champion"] == champion
    finish = _finish(good)
    assert _report(finish)["phase"] == "awaiting_approval"

    approve = ApprovalOperator(task_id="approve", subject="Promote?", fail_on_reject=True)
    with pytest.raises(HITLRejectException):
        approve.execute_complete({}, _answer("Reject"))
    # A failed approval task leaves no XCom: the finish task rolls back.
    with pytest.raises(AirflowFailException, match=f"v{good} rolled back at approval 50% \\(rejected\\)"):
        finish.execute(task_context())
    report = _report(finish)
    assert [(s["kind"], s["verdict"]) for s in report["steps"]] == [
        ("canary", "pass"),
        ("approval", "rejected"),
    ]
    _rolled_back(good, champion)
    _only_failures_of(seen())
    # A retry of the finished task gives the same outcome and writes nothing.
    with pytest.raises(AirflowFailException, match="rolled back"):
        finish.execute(task_context())


def test_a_shadow_then_canary_held_for_approval_is_promoted_when_approved(versions, seen):
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    champion, better = versions["champion"], versions["better"]
    # This test is about the approval: a loaded machine's p99 jitter must not decide it.
    lenient = {**CRITERIA, "min_p99_latency_increase_ms": 250.0}
    result = _operator(better, mode="shadow", approval="True", criteria=lenient).execute(task_context())
    assert result["decision"] == "awaiting_approval"
    assert [(s["kind"], s["verdict"]) for s in result["steps"]] == [
        ("shadow", "pass"),
        ("canary", "pass"),
        ("approval", "awaiting"),
    ]
    assert _weights() == {f"v{champion}": 50, f"v{better}": 50}

    approve = ApprovalOperator(task_id="approve", subject="Promote?", fail_on_reject=True)
    answer = approve.execute_complete({}, _answer("Approve"))
    finish = _finish(better)
    done = finish.execute(task_context(pulled={"approve": answer}))

    assert (done["decision"], done["champion"], done["previous"]) == ("promoted", better, champion)
    assert aliases(settings.mlflow_tracking_uri(), MODEL) == {"champion": better, "previous": champion}
    assert _weights() == {f"v{better}": 100}
    report = _report(finish)
    assert [s["kind"] for s in report["steps"]] == ["shadow", "canary", "approval", "promotion"]
    assert report["steps"][2]["by"] == "ops"
    audit = _audit(better)
    assert audit["rollout"]["decision"] == "promoted"
    assert [s["kind"] for s in audit["rollout"]["steps"]] == ["shadow", "canary", "approval", "promotion"]
    assert audit["rollout"]["steps"][0]["diff"]["agreement"] >= 0.7
    _only_failures_of(seen())


def _answer(option: str) -> dict[str, Any]:
    """What Airflow hands an approval task once a person answered."""
    return {
        "chosen_options": [option],
        "params_input": {},
        "responded_at": datetime.now(UTC),
        "responded_by_user": {"id": "7", "name": "ops"},
    }


def _rejected_tag(version: str) -> str | None:
    from mlflow import MlflowClient

    return (
        MlflowClient(settings.mlflow_tracking_uri()).get_model_version(MODEL, version).tags.get(REJECTED_TAG)
    )


def test_a_rollout_killed_in_each_phase_resumes_from_its_report(versions, seen, tmp_path):
    from airloop.embedded.demo import generate
    from airloop.tables import write_table

    champion = _champion()
    good = register_version(write_table(generate(800, seed=6), str(tmp_path / "good.parquet")), seed=5)
    assert aliases(settings.mlflow_tracking_uri(), MODEL)["challenger"] == good
    champ, chal = f"v{champion}", f"v{good}"
    operator = _operator(good, steps=(25, 100))

    # Killed right after the challenger started, before any traffic moved.
    _killed(good, {"method": "deploy", "weights": {chal: 0}}, steps=(25, 100))
    assert _report(operator)["phase"] == "deploying"
    assert _weights() == {champ: 100, chal: 0}
    # The retry killed one second into its window at 75/25 (the split a kill used to leave for good).
    _killed(good, {"method": "set_traffic", "weights": {chal: 25}, "delay_s": 1}, steps=(25, 100))
    report = _report(operator)
    assert report["phase"] == "analysing" and "ended" not in report["steps"][-1]
    assert _weights() == {champ: 75, chal: 25}
    # The next retry killed between the promotion's traffic write and the alias move.
    _killed(good, {"method": "set_traffic", "weights": {chal: 100}}, steps=(25, 100))
    assert _report(operator)["phase"] == "promoting"
    assert _weights() == {champ: 0, chal: 100}
    assert aliases(settings.mlflow_tracking_uri(), MODEL)["champion"] == champion

    result = operator.execute(task_context())

    assert (result["decision"], result["champion"], result["previous"]) == ("promoted", good, champion)
    assert aliases(settings.mlflow_tracking_uri(), MODEL) == {"champion": good, "previous": champion}
    assert _weights() == {chal: 100}  # traffic and the champion alias agree
    report = _report(operator)
    assert report["decision"] == "promoted" and operator.report_path.endswith(f"-v{good}.json")
    # One report for the one attempt: the interrupted window on record, then the one that decided.
    assert [(s["kind"], s["weight"], s["verdict"]) for s in report["steps"]] == [
        ("canary", 25, "interrupted"),
        ("canary", 25, "pass"),
        ("promotion", 100, "promoted"),
    ]
    assert _audit(good)["rollout"]["decision"] == "promoted"
    _only_failures_of(seen())


def test_a_killed_rollout_is_aborted_by_the_finish_task_and_runs_again_when_cleared(versions, seen):
    champion, good = _champion(), versions["good"]
    champ, chal = f"v{champion}", f"v{good}"
    # The reproduction: killed one second after the gateway moved to 75/25.
    kill = {"method": "set_traffic", "weights": {chal: 25}, "delay_s": 1}
    _killed(good, kill, steps=(25, 100), allow_rejected=True)  # rejected by the approval test
    assert _weights() == {champ: 75, chal: 25}
    finish = _finish(good)
    first_path = finish.report_path

    # The finish task (run after the failed rollout) puts all traffic back on the champion.
    with pytest.raises(AirflowFailException, match=f"v{good} was aborted at canary 25%: .*'analysing'"):
        finish.execute(task_context())
    assert _weights() == {champ: 100}
    current = aliases(settings.mlflow_tracking_uri(), MODEL)
    assert current["champion"] == champion and _rejected_tag(good) is None  # not a verdict: not rejected
    first = _report(finish)
    assert (first["phase"], first["decision"]) == ("done", "aborted")
    assert "before a decision" in first["reason"]
    assert first["steps"][-1]["verdict"] == "aborted"
    audit = _audit(good)["rollout"]
    assert (audit["decision"], audit["reason"]) == ("aborted", first["reason"])

    # Cleared, the rollout runs again as a new attempt; the first attempt's report stays as it was.
    result = _operator(good, steps=(25, 100)).execute(task_context())
    assert result["decision"] == "promoted" and result["report"] != first_path
    assert json.loads((artefacts.root() / first_path).read_text()) == first
    assert _weights() == {chal: 100}
    audit = _audit(good)["rollout"]
    assert audit["decision"] == "promoted"
    assert [(e["report"], e["decision"]) for e in audit["earlier"]][-1] == (first_path, "aborted")
    _only_failures_of(seen())


def test_a_rollback_killed_before_the_rejection_is_finished_and_never_deployed_again(versions, seen):
    champion, wrong = _champion(), versions["wrong"]
    champ, chal = f"v{champion}", f"v{wrong}"
    # Killed between the rollback's traffic write and the rejection.
    _killed(wrong, {"method": "set_traffic", "weights": {chal: 0}}, allow_rejected=True)
    operator = _operator(wrong)
    assert _report(operator)["phase"] == "rolling_back"
    assert _weights() == {champ: 100, chal: 0}

    with pytest.raises(AirflowFailException, match=f"v{wrong} rolled back at canary 50% \\(fail\\)"):
        operator.execute(task_context())
    _rolled_back(wrong, champion)
    path, report, audit = operator.report_path, _report(operator), _audit(wrong)

    # Cleared: the rejected version is not deployed again, and nothing is overwritten.
    with pytest.raises(AirflowFailException, match=f"v{wrong} of {MODEL} is rejected .*allow_rejected"):
        _operator(wrong).execute(task_context())
    assert _weights() == {champ: 100}
    assert (operator.report_path, _report(operator), _audit(wrong)) == (path, report, audit)
    _only_failures_of(seen())


def test_on_kill_puts_all_traffic_back_on_the_champion(versions, seen):
    champion, wrong = _champion(), versions["wrong"]
    champ, chal = f"v{champion}", f"v{wrong}"
    operator = _operator(wrong, allow_rejected=True, deferrable=True)
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(task_context())
    assert _weights() == {champ: 50, chal: 50}

    operator.on_kill()

    assert _weights() == {champ: 100}
    assert aliases(settings.mlflow_tracking_uri(), MODEL)["champion"] == champion
    report = _report(operator)
    assert (report["decision"], report["reason"]) == ("aborted", "task rollout was killed")
    audit = _audit(wrong)["rollout"]
    assert (audit["decision"], audit["reason"]) == ("aborted", "task rollout was killed")
    # The window's event arriving after the kill changes nothing.
    event = {"status": "ready", "message": "pass", "after": {}, "verdict": None}
    with pytest.raises(AirflowFailException, match="aborted at canary 50%: task rollout was killed"):
        _operator(wrong).execute_complete({}, event, **deferred.value.kwargs)
    assert _weights() == {champ: 100} and _report(operator) == report
    _only_failures_of(seen())


def test_the_loop_dag_holds_approval_behind_an_opt_in_param():
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(HERE.parents[1] / "dags" / "airloop_loop.py")).dags["airloop_loop"]
    assert dag.params["approval"] is False  # the embedded loop runs unattended
    rollout, gate, approve, finish = (
        dag.get_task(t) for t in ("rollout", "needs_approval", "approve", "finish")
    )
    assert rollout.approval == "{{ params.approval }}"
    assert type(approve).__name__ == "ApprovalOperator" and approve.fail_on_reject
    assert gate.downstream_task_ids == {"approve", "finish"} and approve.downstream_task_ids == {"finish"}
    assert finish.trigger_rule == "all_done_min_one_success"
    # Both resume from the report, so both retry; a rejected version needs a person's say-so.
    assert (rollout.retries, finish.retries) == (2, 2)
    assert rollout.allow_rejected == "{{ params.allow_rejected }}" and dag.params["allow_rejected"] is False
