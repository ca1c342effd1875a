"""Every reference DAG parses cleanly and runs with ``dag.test()`` against real libraries."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from airloop import runtimes, settings

REPO = Path(__file__).resolve().parents[2]
MODEL, DEPLOYMENT = "airloop-classifier", "airloop"


@pytest.fixture(scope="module")
def dagbag():
    subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True, capture_output=True
    )
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_dagbag_has_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert {"airloop_loop", "airloop_drift_monitor", "airloop_hpo"} <= set(dagbag.dag_ids)


def test_loop_is_scheduled_by_the_drift_asset(dagbag):
    loop = dagbag.get_dag("airloop_loop")
    monitor = dagbag.get_dag("airloop_drift_monitor")
    (outlet,) = monitor.get_task("decide").outlets
    assert loop.timetable.asset_condition == outlet
    assert outlet.uri == f"airloop://drift/{MODEL}"


@pytest.fixture(scope="module")
def first_turn(dagbag, tmp_path_factory):
    try:
        runtimes.python("serving")
    except runtimes.RuntimeMissingError as e:
        pytest.skip(str(e))
    from airloop.embedded.demo import generate
    from airloop.tables import write_table

    data = tmp_path_factory.mktemp("data")
    good = write_table(generate(2000, shift=0.0, seed=3), str(data / "good.parquet"))
    run = dagbag.get_dag("airloop_loop").test(run_conf={"data_uri": good, "analysis_seconds": 1})
    yield run, data
    from airloop.serving.base import get_target

    get_target("local").delete(DEPLOYMENT)


def _states(run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in run.get_task_instances()}


def _versions() -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(settings.mlflow_tracking_uri())
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))


def test_first_turn_makes_and_serves_the_champion(first_turn):
    run, _ = first_turn
    assert str(run.state) == "success", _states(run)
    from airloop.serving.base import get_target
    from airloop.tracking.registry import aliases

    assert aliases(settings.mlflow_tracking_uri(), MODEL) == {"champion": "1"}
    from airloop.tracking.registry import read_audit

    audit = read_audit(settings.mlflow_tracking_uri(), MODEL, "1")
    assert [s["stage"] for s in audit["stages"]] == [
        "trigger",
        "data",
        "validation",
        "training",
        "conversion",
        "evaluation",
        "rollout",
    ]
    assert audit["stages"][2]["record"]["success"] is True
    state = get_target("local").state(DEPLOYMENT)
    assert {n: p["weight"] for n, p in state["predictors"].items()} == {"v1": 100}


def test_bad_data_stops_at_the_gate(first_turn, dagbag, capsys):
    _, data = first_turn
    from airloop.embedded.demo import generate
    from airloop.tables import write_table

    bad = generate(2000, shift=0.0, seed=4).drop(columns=["f3"])
    run = dagbag.get_dag("airloop_loop").test(
        run_conf={"data_uri": write_table(bad, str(data / "bad.parquet"))}
    )
    states = _states(run)
    assert str(run.state) == "failed"
    assert states["validate"] == "failed"
    assert all(
        states[t] == "upstream_failed" for t in ("train", "convert", "evaluate", "register", "rollout")
    )
    assert "f3" in capsys.readouterr().out  # the log names the failing expectation's column
    assert _versions() == ["1"]  # nothing registered
    from airloop.serving.base import get_target

    state = get_target("local").state(DEPLOYMENT)
    assert {n: p["weight"] for n, p in state["predictors"].items()} == {"v1": 100}


def test_drift_monitor_detects_shift_and_emits_the_asset_event(first_turn, dagbag):
    from airloop.embedded.demo import generate
    from airloop.serving.base import get_target

    endpoint = get_target("local").state(DEPLOYMENT)["endpoint"]
    shifted = generate(400, shift=1.0, seed=5)
    names = [c for c in shifted.columns if c != "label"]
    with httpx.Client(timeout=10) as http:
        for row in shifted[names].values.tolist():
            assert (
                http.post(
                    f"{endpoint}/api/v1.0/predictions", json={"data": {"names": names, "ndarray": [row]}}
                ).status_code
                == 200
            )
    time.sleep(6)  # the gateway writes its request log in batches
    monitor = dagbag.get_dag("airloop_drift_monitor")
    run = monitor.test(run_conf={"window_minutes": 5, "cooldown_minutes": 60})
    # No labels came for these rows: the performance check judges by the estimate and prediction drift.
    assert _states(run) == {"detect": "success", "performance": "success", "decide": "success"}
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    with create_session() as session:
        events = session.query(AssetEvent).all()
        assert [e.extra["severity"] for e in events if e.asset.uri == f"airloop://drift/{MODEL}"]
    again = monitor.test(run_conf={"window_minutes": 5, "cooldown_minutes": 60})
    assert _states(again) == {"detect": "success", "performance": "success", "decide": "skipped"}  # cooldown
