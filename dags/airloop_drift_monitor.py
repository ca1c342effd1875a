"""
Drift monitor: test the requests the champion served against what it learned from; when the drift is
severe enough, update the drift Asset, which schedules a retraining turn of ``airloop_loop``.
"""

from __future__ import annotations

import os

from airflow.sdk import Param, dag

from airloop.assets import drift_asset
from airloop.operators.drift import DriftDecideRetrainOperator, DriftDetectRequestsOperator

MODEL_NAME = os.environ.get("AIRLOOP_MODEL_NAME", "airloop-classifier")
DEPLOYMENT = os.environ.get("AIRLOOP_DEPLOYMENT", "airloop")


@dag(
    dag_id="airloop_drift_monitor",
    schedule="@hourly",
    catchup=False,
    max_active_runs=1,
    tags=["airloop"],
    params={
        "window_minutes": Param(60, type="number", description="how far back to read logged requests"),
        "cooldown_minutes": Param(60, type="number", description="minimum time between two retrains"),
    },
    doc_md=__doc__,
)
def airloop_drift_monitor():
    detect = DriftDetectRequestsOperator(
        task_id="detect",
        model_name=MODEL_NAME,
        deployment=DEPLOYMENT,
        window_minutes="{{ params.window_minutes }}",
    )
    DriftDecideRetrainOperator(
        task_id="decide",
        detection=detect.output,
        cooldown_minutes="{{ params.cooldown_minutes }}",
        retrain_dag_id="airloop_loop",  # no new request while a retrain is queued or running
        outlets=[drift_asset(MODEL_NAME)],
    )


airloop_drift_monitor()
