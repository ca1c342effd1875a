"""DriftDecideRetrainOperator through ``dag.test()``: real Airflow, MLflow registry and audit record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from airloop import settings
from airloop.operators.drift import RETRAIN_REQUESTED_TAG
from airloop.steps.registry import read_audit

MODELS = ("policy-storm", "policy-approval", "policy-dedupe", "policy-quiet")
# One monitor DAG per model, each with its own drift Asset; a run's conf sets the operator's arguments.
DAG_FILE = f"""
from airflow.sdk import DAG

from airloop.assets import drift_asset
from airloop.operators.drift import DriftDecideRetrainOperator

for model in {MODELS!r}:
    with DAG(f"decide_{{model}}", schedule=None, catchup=False, render_template_as_native_obj=True) as dag:
        DriftDecideRetrainOperator(
            task_id="decide",
            detection="{{{{ dag_run.conf['detection'] }}}}",
            actions="{{{{ dag_run.conf.get('actions') }}}}",
            cooldown_minutes="{{{{ dag_run.conf.get('cooldown_minutes', 60) }}}}",
            min_window_rows="{{{{ dag_run.conf.get('min_window_rows', 200) }}}}",
            retrain_dag_id="{{{{ dag_run.conf.get('retrain_dag_id') }}}}",
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
        subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True,
                       capture_output=True)
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


def detection(model: str, verdict: str = "drift", severity: str = "high") -> dict:
    return {"model_name": model, "champion": "1", "verdict": verdict, "severity": severity,
            "drifted_features": ["f1", "f2"], "share_drifted": 0.5, "n_current": 400, "n_reference": 1000,
            "message": "2 of 4 features drifted", "report": f"drift/{model}/20250101T000000Z/report.json"}


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
