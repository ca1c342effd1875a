"""
Drift monitor: test the requests the champion served (or a data window, ``AIRLOOP_DRIFT_WINDOW_URI``)
against what it learned from, and judge its accuracy on those requests from the labels come so far and
an estimate for the rest (CBPE, in the ``monitoring`` runtime); when the drift or the drop is severe
enough, update the drift Asset, which schedules a retraining turn of ``airloop_loop``.
``AIRLOOP_DRIFT_METHOD=mmd`` tests all features together with alibi-detect's MMD in the ``torch`` runtime
instead of one test per feature.
"""

from __future__ import annotations

import os

from airflow.sdk import Param, dag

from airloop import settings
from airloop.assets import drift_asset
from airloop.operators.drift import (
    DriftDecideRetrainOperator,
    DriftDetectDataOperator,
    DriftDetectRequestsOperator,
)
from airloop.operators.performance import PerformanceMonitorOperator

MODEL_NAME = os.environ.get("AIRLOOP_MODEL_NAME", "airloop-classifier")
DEPLOYMENT = os.environ.get("AIRLOOP_DEPLOYMENT", "airloop")
METHOD = os.environ.get("AIRLOOP_DRIFT_METHOD", "ks")
# A table to test instead of the logged requests: parquet/CSV path or URI, or a Feast training set.
WINDOW_URI = os.environ.get("AIRLOOP_DRIFT_WINDOW_URI")
WINDOW_CONN_ID = os.environ.get("AIRLOOP_DRIFT_WINDOW_CONN_ID")
# The circuit breaker: at most this many retrain requests per retrain_period_hours (unset: no limit).
MAX_RETRAINS = int(os.environ["AIRLOOP_MAX_RETRAINS"]) if os.environ.get("AIRLOOP_MAX_RETRAINS") else None


@dag(
    dag_id="airloop_drift_monitor",
    schedule="@hourly",
    catchup=False,
    max_active_runs=1,
    tags=["airloop"],
    params={
        "window_minutes": Param(60, type="number", description="how far back to read logged requests"),
        "cooldown_minutes": Param(60, type="number", description="minimum time between two retrains"),
        "retrain_mode": Param(
            "act", enum=["act", "suggest"], description="suggest: record and notify, never retrain"
        ),
        "retrain_period_hours": Param(24, type="number", description="the circuit breaker's period"),
    },
    doc_md=__doc__,
)
def airloop_drift_monitor():
    # alibi-detect lives in the runtimes: the serving one, or torch for its MMD (on PyTorch). The
    # licence-clean profile tests with SciPy in the worker (alibi-detect is Business-Source-licensed).
    if settings.licence_clean():
        common = {"model_name": MODEL_NAME, "backend": "scipy", "method": METHOD, "runtime": "worker"}
    else:
        common = {
            "model_name": MODEL_NAME,
            "backend": "alibi",
            "method": METHOD,
            "runtime": "torch" if METHOD == "mmd" else "serving",
        }
    if WINDOW_URI:
        detect = DriftDetectDataOperator(
            task_id="detect", window_uri=WINDOW_URI, window_conn_id=WINDOW_CONN_ID, **common
        )
    else:
        detect = DriftDetectRequestsOperator(
            task_id="detect", deployment=DEPLOYMENT, window_minutes="{{ params.window_minutes }}", **common
        )
    performance = PerformanceMonitorOperator(
        task_id="performance",
        model_name=MODEL_NAME,
        deployment=DEPLOYMENT,
        window_minutes="{{ params.window_minutes }}",
    )
    DriftDecideRetrainOperator(
        task_id="decide",
        detection=detect.output,
        performance=performance.output,
        cooldown_minutes="{{ params.cooldown_minutes }}",
        mode="{{ params.retrain_mode }}",
        max_retrains=MAX_RETRAINS,
        retrain_period_hours="{{ params.retrain_period_hours }}",
        retrain_dag_id="airloop_loop",  # no new request while a retrain is queued or running
        outlets=[drift_asset(MODEL_NAME)],
    )


airloop_drift_monitor()
