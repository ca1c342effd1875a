"""The rollout operator against the real local serving target, under load, with faults.

Three versions of one registered model, trained, converted and registered by the real steps on the
test's MLflow (SQLite under AIRLOOP_HOME): v1 the champion, v2 trained on shuffled labels (answers
fast and without errors, but wrongly), v3 a good challenger. A background thread sends predictions
and their true labels as feedback to the gateway throughout, as clients would.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from airflow.sdk.exceptions import AirflowFailException

from airloop import artefacts, runtimes, settings
from airloop.operators.seldon import SeldonRolloutChallengerOperator
from airloop.serving.base import get_target
from airloop.steps.registry import REJECTED_TAG, aliases

MODEL, DEPLOYMENT = "rollout-faults", "rollout-faults"
# Small windows: the shuffled-label model is ~50% accurate against ~90%, visible in a few dozen labels.
CRITERIA = {"min_requests": 30, "min_feedback": 30}


class _TaskInstance:
    """What ``execute`` needs of a task instance here: somewhere to push the report link."""

    def __init__(self) -> None:
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


def _version(data_uri: str, seed: int) -> str:
    from airloop.steps.convert import convert
    from airloop.steps.registry import register
    from airloop.steps.train import train

    tracking_uri = settings.mlflow_tracking_uri()
    trained = train({"tracking_uri": tracking_uri, "data_uri": data_uri, "experiment": MODEL, "seed": seed,
                     "artifact_root": settings.mlflow_artifact_root()})
    convert({"tracking_uri": tracking_uri, "run_id": trained["run_id"], "variants": ["fp32"],
             "benchmark_calls": 5})
    return register({"tracking_uri": tracking_uri, "model_name": MODEL, "run_id": trained["run_id"]})["version"]


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> Iterator[dict[str, str]]:
    try:
        runtimes.python("serving")
    except runtimes.RuntimeMissingError as e:
        pytest.skip(str(e))
    from airloop.steps.data import generate, write_table

    folder = tmp_path_factory.mktemp("data")
    good = generate(800, seed=3)
    shuffled = good.assign(label=np.random.default_rng(0).permutation(good["label"].to_numpy()))
    good_uri = write_table(good, str(folder / "good.parquet"))
    shuffled_uri = write_table(shuffled, str(folder / "shuffled.parquet"))
    made = {"champion": _version(good_uri, seed=1), "wrong": _version(shuffled_uri, seed=2)}
    yield made
    get_target("local").delete(DEPLOYMENT)


@pytest.fixture(scope="module")
def load(versions) -> Iterator[dict[str, int]]:
    """Requests with feedback to the deployment's gateway until the module ends; counts what failed."""
    from airloop.steps.data import generate

    operator = _operator(versions["champion"])
    assert operator.execute({"ti": _TaskInstance()})["decision"] == "deployed"
    endpoint = get_target("local").state(DEPLOYMENT)["endpoint"]
    frame = generate(500, seed=11)
    names = [c for c in frame.columns if c != "label"]
    rows, labels = frame[names].to_numpy().tolist(), frame["label"].tolist()
    counts = {"sent": 0, "failed": 0}
    stop = threading.Event()

    def send() -> None:
        with httpx.Client(base_url=endpoint, trust_env=False, timeout=10) as client:
            while not stop.is_set():
                i = counts["sent"] % len(rows)
                counts["sent"] += 1
                answer = client.post("/api/v1.0/predictions", json={"data": {"names": names, "ndarray": [rows[i]]}})
                if answer.status_code != 200:
                    counts["failed"] += 1
                    continue
                client.post("/api/v1.0/feedback", json={"response": answer.json(), "truth": labels[i]})

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    yield counts
    stop.set()
    thread.join(timeout=15)


def _operator(version: str, **kwargs: Any) -> SeldonRolloutChallengerOperator:
    return SeldonRolloutChallengerOperator(
        task_id="rollout", model_name=MODEL, version=version, deployment=DEPLOYMENT, steps=(50, 100),
        analysis_seconds=2, max_wait_seconds=30, poll_interval=0.5, criteria=CRITERIA, **kwargs,
    )


def _weights() -> dict[str, int]:
    return {name: p["weight"] for name, p in get_target("local").state(DEPLOYMENT)["predictors"].items()}


def _report(operator: SeldonRolloutChallengerOperator) -> dict[str, Any]:
    return json.loads((artefacts.root() / operator.report_path).read_text())


def test_a_challenger_with_wrong_predictions_is_rolled_back_within_one_window(versions, load):
    champion, wrong = versions["champion"], versions["wrong"]
    operator = _operator(wrong)
    ti = _TaskInstance()
    with pytest.raises(AirflowFailException, match=f"v{wrong} rolled back at 50% \\(fail\\).*accuracy"):
        operator.execute({"ti": ti})
    assert ti.xcom["airloop_rollout_report"] == {"path": operator.report_path}

    report = _report(operator)
    assert (report["phase"], report["decision"]) == ("done", "rolled_back")
    (step,) = report["steps"]  # decided in the first analysis window
    assert step["verdict"] == "fail"
    assert step["challenger_stats"]["accuracy"] < step["champion_stats"]["accuracy"]
    # The champion serves everything; the challenger is gone from serving and marked in the registry.
    assert _weights() == {f"v{champion}": 100}
    assert aliases(settings.mlflow_tracking_uri(), MODEL) == {"champion": champion}
    from mlflow import MlflowClient

    tags = MlflowClient(settings.mlflow_tracking_uri()).get_model_version(MODEL, wrong).tags
    assert tags[REJECTED_TAG] == "true"
    assert "fail" in tags["airloop.rejected.reason"]
    assert load["sent"] > 0 and load["failed"] == 0


def test_a_promotion_interrupted_between_traffic_and_alias_is_finished_on_retry(versions, load, tmp_path):
    from airloop.steps.data import generate, write_table

    champion = versions["champion"]
    good = _version(write_table(generate(800, seed=5), str(tmp_path / "good.parquet")), seed=3)
    assert aliases(settings.mlflow_tracking_uri(), MODEL) == {"champion": champion, "challenger": good}
    operator = _operator(good)
    target = get_target("local")
    champ, chal = f"v{champion}", f"v{good}"
    # The state a task killed right after its traffic write leaves: challenger at 100%, alias unmoved.
    target.deploy(DEPLOYMENT, [{**operator._predictor(good), "weight": 0}])
    target.set_traffic(DEPLOYMENT, {champ: 0, chal: 100})
    (artefacts.root() / operator.report_path).parent.mkdir(parents=True, exist_ok=True)
    (artefacts.root() / operator.report_path).write_text(json.dumps({
        "deployment": DEPLOYMENT, "model_name": MODEL, "champion": champion, "challenger": good,
        "started": "2026-01-01T00:00:00+00:00", "ended": None, "phase": "promoting", "decision": None,
        "criteria": CRITERIA, "steps": [{"weight": 50, "verdict": "pass", "reasons": []},
                                        {"weight": 100, "verdict": "promoted", "reasons": []}],
    }))

    result = operator.execute({"ti": _TaskInstance()})

    assert (result["decision"], result["champion"], result["previous"]) == ("promoted", good, champion)
    assert aliases(settings.mlflow_tracking_uri(), MODEL) == {"champion": good, "previous": champion}
    assert _weights() == {chal: 100}  # traffic and the champion alias agree
    assert _report(operator)["decision"] == "promoted"
    assert load["failed"] == 0
