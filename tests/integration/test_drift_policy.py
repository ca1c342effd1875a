"""The drift operators through ``dag.test()``: real Airflow, MLflow registry and audit record.

DriftDecideRetrainOperator (the retraining policy) and DriftDetectDataOperator (a data window from a
file or a SQL connection, tested in the worker with the scipy backend).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from airloop import artefacts, settings
from airloop.operators.drift import RETRAIN_HISTORY_TAG, RETRAIN_REQUESTED_TAG
from airloop.tracking.registry import read_audit

MODELS = (
    "policy-storm",
    "policy-approval",
    "policy-dedupe",
    "policy-quiet",
    "policy-audit",
    "policy-escalate",
    "policy-suggest",
    "policy-breaker",
    "policy-performance",
)
WINDOW_MODEL = "window-data"
# One monitor DAG per model, each with its own drift Asset; a run's conf sets the operator's arguments.
DAG_FILE = f"""
from airflow.sdk import DAG

from airloop.assets import drift_asset
from airloop.operators.drift import DriftDecideRetrainOperator, DriftDetectDataOperator

with DAG("detect_window", schedule=None, catchup=False, render_template_as_native_obj=True) as dag:
    DriftDetectDataOperator(
        task_id="detect",
        model_name={WINDOW_MODEL!r},
        backend="scipy",
        runtime="worker",
        window_uri="{{{{ dag_run.conf.get('window_uri') }}}}",
        window_sql="{{{{ dag_run.conf.get('window_sql') }}}}",
        window_conn_id="{{{{ dag_run.conf.get('window_conn_id') }}}}",
    )

for model in {MODELS!r}:
    with DAG(f"decide_{{model}}", schedule=None, catchup=False, render_template_as_native_obj=True) as dag:
        DriftDecideRetrainOperator(
            task_id="decide",
            detection="{{{{ dag_run.conf['detection'] }}}}",
            performance="{{{{ dag_run.conf.get('performance') }}}}",
            actions="{{{{ dag_run.conf.get('actions') }}}}",
            cooldown_minutes="{{{{ dag_run.conf.get('cooldown_minutes', 60) }}}}",
            min_window_rows="{{{{ dag_run.conf.get('min_window_rows', 200) }}}}",
            retrain_dag_id="{{{{ dag_run.conf.get('retrain_dag_id') }}}}",
            mode="{{{{ dag_run.conf.get('mode', 'act') }}}}",
            max_retrains="{{{{ dag_run.conf.get('max_retrains') }}}}",
            retrain_period_hours="{{{{ dag_run.conf.get('retrain_period_hours', 24) }}}}",
            outlets=[drift_asset(model)],
        )
    globals()[dag.dag_id] = dag
"""


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    """The monitor DAGs, in a DAG bundle of their own beside the reference DAGs (``dag.test()`` needs one)."""
    folder = tmp_path_factory.mktemp("policy_dags")
    (folder / "policy_dags.py").write_text(DAG_FILE)
    local = "airflow.dag_processing.bundles.local.LocalDagBundle"
    bundles = [
        {"name": "dags-folder", "classpath": local, "kwargs": {}},
        {"name": "policy-tests", "classpath": local, "kwargs": {"path": str(folder)}},
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps(bundles))
        subprocess.run(
            [str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True, capture_output=True
        )
        from airflow.dag_processing.dagbag import DagBag

        bag = DagBag(dag_folder=str(folder))
        assert bag.import_errors == {}
        yield bag


@pytest.fixture(scope="module", autouse=True)
def champions():
    """A registered model with a champion per test, so cooldown tags and Asset events never mix."""
    from mlflow import MlflowClient

    client = MlflowClient(settings.mlflow_tracking_uri())
    for name in MODELS:
        experiment = client.create_experiment(name, artifact_location=settings.mlflow_artifact_root())
        run = client.create_run(experiment)
        client.set_terminated(run.info.run_id)
        client.create_registered_model(name)
        version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
        client.set_registered_model_alias(name, "champion", version.version)


def _table(seed: int, rows: int, shift: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    table = pd.DataFrame(rng.normal(size=(rows, 3)), columns=["f0", "f1", "f2"])
    table["f0"] += shift
    return table


@pytest.fixture(scope="module")
def window_champion(tmp_path_factory):
    """A champion whose training run holds the drift reference sample where training stores it."""
    from mlflow import MlflowClient

    from airloop.tracking.artifacts import REFERENCE_PATH

    client = MlflowClient(settings.mlflow_tracking_uri())
    experiment = client.create_experiment(WINDOW_MODEL, artifact_location=settings.mlflow_artifact_root())
    run = client.create_run(experiment)
    reference = tmp_path_factory.mktemp("reference") / Path(REFERENCE_PATH).name
    _table(0, 2000).to_parquet(reference)
    client.log_artifact(run.info.run_id, str(reference), str(Path(REFERENCE_PATH).parent))
    client.set_terminated(run.info.run_id)
    client.create_registered_model(WINDOW_MODEL)
    version = client.create_model_version(
        WINDOW_MODEL, f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    client.set_registered_model_alias(WINDOW_MODEL, "champion", version.version)
    return run.info.run_id


def detect_window(dagbag, **conf) -> tuple[str, dict]:
    """Run the data-window DAG once: the detect task's state and its result (empty when it failed)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    run = dagbag.get_dag("detect_window").test(run_conf=conf)
    (ti,) = run.get_task_instances()
    with create_session() as session:
        row = (
            session.query(XComModel)
            .filter_by(dag_id="detect_window", run_id=run.run_id, task_id="detect", key="return_value")
            .one_or_none()
        )
    return str(ti.state), (XComModel.deserialize_value(row) if row else {})


def test_a_data_window_file_is_tested_and_reported(dagbag, window_champion, tmp_path):
    from mlflow import MlflowClient

    _table(1, 1500, shift=0.3).to_parquet(tmp_path / "window.parquet")
    state, result = detect_window(dagbag, window_uri=str(tmp_path / "window.parquet"))
    assert state == "success"
    assert (result["verdict"], result["drifted_features"], result["n_current"]) == ("drift", ["f0"], 1500)
    assert result["window"] == {"uri": str(tmp_path / "window.parquet"), "conn_id": None}
    report = artefacts.local_path(result["report"])
    assert json.loads(report.read_text())["verdict"] == "drift" and report.with_suffix(".html").is_file()
    metrics = MlflowClient(settings.mlflow_tracking_uri()).get_run(window_champion).data.metrics
    assert metrics["drift_detected"] == 1.0

    _table(2, 1500).to_csv(tmp_path / "window.csv", index=False)
    state, result = detect_window(dagbag, window_uri=f"file://{tmp_path}/window.csv")
    assert (state, result["verdict"], result["n_current"]) == ("success", "no_drift", 1500)


def test_a_data_window_comes_from_sql_through_a_connection(dagbag, window_champion, tmp_path, monkeypatch):
    served = pd.concat(
        [_table(3, 800).assign(day="2025-01-01"), _table(4, 900, shift=0.4).assign(day="2025-01-02")]
    )
    with sqlite3.connect(tmp_path / "served.db") as db:
        served.to_sql("served", db, index=False)
    monkeypatch.setenv(
        "AIRFLOW_CONN_WINDOW_DB", json.dumps({"conn_type": "sqlite", "host": str(tmp_path / "served.db")})
    )
    query = "SELECT f0, f1, f2 FROM served WHERE day = '{}'"
    state, result = detect_window(dagbag, window_sql=query.format("2025-01-01"), window_conn_id="window_db")
    assert (state, result["verdict"], result["n_current"]) == ("success", "no_drift", 800)
    state, result = detect_window(dagbag, window_sql=query.format("2025-01-02"), window_conn_id="window_db")
    assert (state, result["verdict"], result["drifted_features"], result["n_current"]) == (
        "success",
        "drift",
        ["f0"],
        900,
    )
    assert result["window"]["conn_id"] == "window_db"


def test_a_remote_data_window_folder_is_copied_for_the_step(dagbag, window_champion):
    """A folder of parquet parts (a Feast or Spark export) on a filesystem other than the local one."""
    import fsspec
    from airflow.sdk.io import attach

    # fsspec's in-memory filesystem stands in for an object store, registered as a provider registers s3.
    memory = fsspec.filesystem("memory")
    attach("memory", fs=memory)
    for part, seed in enumerate((5, 6)):
        with memory.open(f"/windows/day/part-{part}.parquet", "wb") as handle:
            _table(seed, 700, shift=0.5).to_parquet(handle)
    state, result = detect_window(dagbag, window_uri="memory://windows/day")
    assert (state, result["verdict"], result["n_current"]) == ("success", "drift", 1400)  # both parts
    assert "f0" in result["drifted_features"]


@pytest.mark.parametrize(
    ("conf", "problem"),
    [
        ({"window_uri": "/nowhere/window.parquet"}, "data window /nowhere/window.parquet does not exist"),
        (
            {
                "window_uri": "/nowhere/window.parquet",
                "window_sql": "SELECT 1",
                "window_conn_id": "window_db",
            },
            "exactly one of window_uri and window_sql",
        ),
        ({"window_sql": "SELECT 1"}, "window_sql needs window_conn_id"),
        ({}, "exactly one of window_uri and window_sql"),
    ],
)
def test_a_data_window_that_cannot_be_read_fails_the_task(dagbag, window_champion, capsys, conf, problem):
    assert detect_window(dagbag, **conf) == ("failed", {})
    assert problem in capsys.readouterr().out


def detection(model: str, verdict: str = "drift", severity: str = "high") -> dict:
    return {
        "model_name": model,
        "champion": "1",
        "verdict": verdict,
        "severity": severity,
        "drifted_features": ["f1", "f2"],
        "share_drifted": 0.5,
        "n_current": 400,
        "n_reference": 1000,
        "message": "2 of 4 features drifted",
        "report": f"drift/{model}/20250101T000000Z/report.json",
    }


def decide(dagbag, model: str, found: dict, **conf) -> str:
    """Run the model's monitor DAG once; the decide task's state."""
    run = dagbag.get_dag(f"decide_{model}").test(run_conf={"detection": found, **conf})
    (ti,) = run.get_task_instances()
    return str(ti.state)


def events(model: str) -> list[dict]:
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    with create_session() as session:
        found = session.query(AssetEvent).all()
        return [dict(e.extra) for e in found if e.asset.uri == f"airloop://drift/{model}"]


def decisions(model: str) -> list[dict]:
    stages = read_audit(settings.mlflow_tracking_uri(), model, "1")["stages"]
    return next((s["record"]["decisions"] for s in stages if s["stage"] == "drift"), [])


def test_drift_on_every_window_requests_one_retrain(dagbag):
    model = "policy-storm"
    assert [decide(dagbag, model, detection(model)) for _ in range(3)] == ["success", "skipped", "skipped"]
    (extra,) = events(model)
    assert extra["severity"] == "high" and extra["report"].endswith("report.json")
    assert "approval_required" not in extra
    audit = decisions(model)
    assert [d["code"] for d in audit] == ["retrain_requested", "cooldown", "cooldown"]
    assert all(d["reason"] and d["dag_run_id"] for d in audit)
    from mlflow import MlflowClient

    tags = MlflowClient(settings.mlflow_tracking_uri()).get_registered_model(model).tags
    assert float(tags[RETRAIN_REQUESTED_TAG]) > 0


def test_a_more_severe_drift_escalates_past_the_cooldown(dagbag):
    model = "policy-escalate"
    found = [detection(model, severity=severity) for severity in ("medium", "high", "high")]
    assert [decide(dagbag, model, one) for one in found] == ["success", "success", "skipped"]
    assert [extra["severity"] for extra in events(model)] == ["medium", "high"]
    audit = decisions(model)
    assert [(d["code"], d["escalated_from"]) for d in audit] == [
        ("retrain_requested", None),
        ("escalated", "medium"),
        ("cooldown", None),
    ]
    assert all(d["n_effective"] == 400 for d in audit)  # a detection without n_effective: its n_current
    from mlflow import MlflowClient

    from airloop.operators.drift import RETRAIN_SEVERITY_TAG

    tags = MlflowClient(settings.mlflow_tracking_uri()).get_registered_model(model).tags
    assert tags[RETRAIN_SEVERITY_TAG] == "high"


def test_retrain_with_approval_marks_the_event(dagbag):
    model = "policy-approval"
    found = detection(model, severity="medium")
    assert decide(dagbag, model, found, actions={"medium": "retrain_with_approval"}) == "success"
    (extra,) = events(model)
    assert extra["approval_required"] is True and extra["severity"] == "medium"
    assert [d["action"] for d in decisions(model)] == ["retrain_with_approval"]


def test_no_retrain_while_the_retraining_dag_runs(dagbag):
    model = "policy-dedupe"
    # The monitor DAG itself has a running run while its task executes: the Task SDK sees it.
    assert decide(dagbag, model, detection(model), retrain_dag_id=f"decide_{model}") == "skipped"
    assert events(model) == []
    assert [d["code"] for d in decisions(model)] == ["retrain_running"]
    # A retraining DAG with no live run does not hold the request back.
    assert decide(dagbag, model, detection(model), retrain_dag_id="no_such_dag") == "success"


def test_suppressed_and_quiet_windows(dagbag):
    model = "policy-quiet"
    assert decide(dagbag, model, detection(model, severity="low")) == "skipped"
    assert decide(dagbag, model, detection(model, verdict="no_drift", severity="none")) == "skipped"
    assert decide(dagbag, model, {**detection(model), "n_current": 50}) == "skipped"
    assert events(model) == []
    # "No drift" is in the task log only; the suppressed drift is in the audit record, with its reason.
    audit = decisions(model)
    assert [d["code"] for d in audit] == ["severity_maps_to_log", "window_too_small"]
    assert "50 rows" in audit[1]["reason"]


def test_suggest_mode_records_and_never_retrains(dagbag):
    model = "policy-suggest"
    assert [decide(dagbag, model, detection(model), mode="suggest") for _ in range(2)] == ["skipped"] * 2
    assert events(model) == []
    audit = decisions(model)
    assert [(d["code"], d["wanted"], d["mode"]) for d in audit] == [("suggested", "retrain", "suggest")] * 2
    from mlflow import MlflowClient

    tags = MlflowClient(settings.mlflow_tracking_uri()).get_registered_model(model).tags
    assert RETRAIN_REQUESTED_TAG not in tags and RETRAIN_HISTORY_TAG not in tags


def test_the_circuit_breaker_stops_the_third_retrain_of_the_period(dagbag):
    model = "policy-breaker"
    breaker = {"cooldown_minutes": 0, "max_retrains": 2, "retrain_period_hours": 24}
    assert [decide(dagbag, model, detection(model), **breaker) for _ in range(3)] == [
        "success",
        "success",
        "skipped",
    ]
    assert len(events(model)) == 2
    audit = decisions(model)
    assert [d["code"] for d in audit] == ["retrain_requested", "retrain_requested", "circuit_open"]
    assert audit[2]["cooldown_until"] and "(at most 2)" in audit[2]["reason"]
    from mlflow import MlflowClient

    tags = MlflowClient(settings.mlflow_tracking_uri()).get_registered_model(model).tags
    assert len(json.loads(tags[RETRAIN_HISTORY_TAG])) == 2


def test_the_drift_stage_keeps_the_newest_decisions_within_its_size_limit():
    """What the operator's one audit call per task relies on: the stored decisions grow in place."""
    from airloop.tracking.registry import MAX_AUDIT_RECORD_BYTES, append_audit

    model = "policy-audit"
    request = {
        "tracking_uri": settings.mlflow_tracking_uri(),
        "model_name": model,
        "version": "1",
        "stage": "drift",
        "append": {"decisions": 3},
    }
    for n in range(5):
        append_audit({**request, "record": {"decisions": [{"n": n}]}})
    assert [d["n"] for d in decisions(model)] == [2, 3, 4]
    long = "x" * (MAX_AUDIT_RECORD_BYTES // 2)
    append_audit({**request, "record": {"decisions": [{"n": 5, "reason": long}]}})
    assert [d["n"] for d in decisions(model)] == [3, 4, 5]
    append_audit({**request, "record": {"decisions": [{"n": 6, "reason": long}]}})
    assert [d["n"] for d in decisions(model)] == [6]  # two long reasons pass the limit: the newest stays


def test_a_drop_in_accuracy_requests_a_retrain_and_says_so_and_drift_wins_a_tie(dagbag):
    model = "policy-performance"
    quiet = detection(model, verdict="no_drift", severity="none")
    dropped = {
        **detection(model, severity="high"),
        "drifted_features": ["accuracy"],
        "message": "realized accuracy 0.610 on 300 matured labels is significantly more than 0.05 below the "
        "reference 0.920 (p=1e-09)",
        "report": f"performance/{model}/20250101T000000Z/report.json",
    }
    assert decide(dagbag, model, quiet, performance=dropped) == "success"
    (extra,) = events(model)
    assert (extra["trigger"], extra["drifted_features"]) == ("performance", ["accuracy"])
    assert extra["message"].startswith("realized accuracy 0.610") and extra["report"].startswith(
        "performance/"
    )
    (decision,) = decisions(model)
    assert (decision["trigger"], decision["code"]) == ("performance", "retrain_requested")
    # Past the cooldown's start: the same drop, and a data drift as severe, are logged as data drift.
    assert decide(dagbag, model, detection(model, severity="high"), performance=dropped) == "skipped"
    assert decisions(model)[-1]["trigger"] == "data_drift"
