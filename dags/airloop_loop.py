"""
The closed loop, one turn: training data -> validate -> train -> convert -> evaluate vs champion ->
register -> roll out.

Runs when the drift monitor asks for a retrain (the drift Asset) or when triggered by hand. The first
turn of a registered model makes the champion; later turns make a challenger that must pass the
OpenVINO parity gate, win its offline evaluation as the artefact that will serve, and survive a canary
rollout before it is promoted.

The training data is declared: ``data_uri`` (``source=file``, the default; a file or a folder of data
drops) and the ``data_window`` of its drops, or, with ``source=feast``, the training set Feast builds
from the ``training`` feature service joined point-in-time onto ``entity_rows`` (see
``airloop_features`` and docs/features.md). A drift-triggered run uses the same declaration (the drift
event says what drifted, not what to train on); ``training_data`` writes the rows once, and the gate,
training and the audit record name that exact table.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from airflow.sdk import Param, dag, task

from airloop import settings
from airloop.assets import drift_asset
from airloop.loops.dags import approval_hold
from airloop.operators.feast import FeastBuildTrainingSetOperator
from airloop.operators.great_expectations import GreatExpectationsValidateDataOperator
from airloop.operators.mlflow import (
    MlflowEvaluateChallengerOperator,
    MlflowRegisterModelOperator,
    MlflowTrainModelOperator,
)
from airloop.operators.openvino import OpenvinoConvertModelOperator
from airloop.operators.rollout import RolloutChallengerOperator
from airloop.operators.tables import TablesBuildTrainingSetOperator
from airloop.steps.training.requests import WINDOW_PATTERN

MODEL_NAME = os.environ.get("AIRLOOP_MODEL_NAME", "airloop-classifier")
DEPLOYMENT = os.environ.get("AIRLOOP_DEPLOYMENT", "airloop")
# Where new training data lands, one file per drop; the embedded default writes here (a local
# folder under AIRLOOP_HOME). Which drops a turn trains on: "latest", "latest:<n>" or "all".
TRAINING_DATA = os.environ.get("AIRLOOP_TRAINING_DATA", str(settings.home() / "incoming"))
DATA_WINDOW = os.environ.get("AIRLOOP_DATA_WINDOW", "latest")
# Minimum length of each canary analysis window; the embedded default's busy clients need only a few seconds.
ANALYSIS_SECONDS = float(os.environ.get("AIRLOOP_ANALYSIS_SECONDS", 30))
SUITE = str(Path(__file__).parent / "expectations" / "training_data.json")
# "file": train on data_uri; "feast": build the training set from Feast's offline store first.
SOURCE = os.environ.get("AIRLOOP_TRAINING_SOURCE", "file")
# Training, evaluation, conversion and registration are safe to retry: a retry reuses the task's MLflow
# run (nothing is trained twice), recomputes the same verdict, converts again into the same run, and
# returns the same registered version.
RETRIES = {"retries": 2, "retry_delay": timedelta(seconds=30)}
ENTITY_ROWS = os.environ.get("AIRLOOP_ENTITY_ROWS", str(settings.feast_dir() / "entity_rows.parquet"))
# The declared source of this run: Feast's training set when the training_set task ran, else data_uri.
SOURCE_URI = "{{ ti.xcom_pull(task_ids='training_set', key='uri') or params.data_uri }}"
# What the gate expects of the table training_data wrote: what Feast said it wrote when Feast built the
# source (the table is that file, unchanged), else the table's own SHA-256.
EXPECTED_SHA256 = (
    "{{ (ti.xcom_pull(task_ids='training_set', key='fingerprint') or {}).get('sha256')"
    " or ti.xcom_pull(task_ids='training_data', key='sha256') }}"
)


@dag(
    dag_id="airloop_loop",
    schedule=drift_asset(MODEL_NAME),
    catchup=False,
    max_active_runs=1,
    tags=["airloop"],
    params={
        "data_uri": Param(
            TRAINING_DATA, type="string", description="training data: a parquet/CSV file or a folder of drops"
        ),
        "data_window": Param(
            DATA_WINDOW,
            type="string",
            pattern=WINDOW_PATTERN,
            description="which drops of a data_uri folder: all, latest, the latest n (latest:3), + a share of"
            " the earlier ones (latest+history:0.2)",
        ),
        "source": Param(SOURCE, enum=["file", "feast"], description="data_uri, or a training set from Feast"),
        "entity_rows": Param(
            ENTITY_ROWS, type="string", description="for source=feast: observation_id, event_timestamp, label"
        ),
        "analysis_seconds": Param(
            ANALYSIS_SECONDS, type="number", description="canary analysis window per step"
        ),
        # Off by default: the embedded loop runs unattended.
        "approval": Param(
            False,
            type="boolean",
            description="hold the challenger at its last canary step until a person approves",
        ),
        # What a window short of labels leads to (labels arrive later than answers in production).
        "on_inconclusive": Param(
            "rollback",
            enum=["rollback", "extend", "hold"],
            description="a window without enough labels: roll back, extend it (max_extensions), or hold",
        ),
        "max_extensions": Param(2, type="integer", minimum=0, description="extensions of one window"),
        "labels_from": Param(
            "metrics",
            enum=["metrics", "log"],
            description="quality from the target's counters, or the labels log (late and ingested labels)",
        ),
        # A rolled-back version stays rejected: only a person lifts that, for one run.
        "allow_rejected": Param(
            False,
            type="boolean",
            description="roll out the version even though an earlier rollout rejected it",
        ),
    },
    doc_md=__doc__,
)
def airloop_loop():
    @task.branch(task_id="source")
    def choose_source(params=None) -> list[str]:
        # training_data follows training_set when Feast builds the source.
        return ["training_set", "training_data"] if params["source"] == "feast" else ["training_data"]

    training_set = FeastBuildTrainingSetOperator(
        task_id="training_set", entity_rows="{{ params.entity_rows }}", feature_service="training"
    )
    # The rows this turn trains on, written once: what the gate checks is what training reads.
    training_data = TablesBuildTrainingSetOperator(
        task_id="training_data",
        data_uri=SOURCE_URI,
        window="{{ params.data_window }}",
        trigger_rule="none_failed",
    )
    validate = GreatExpectationsValidateDataOperator(
        task_id="validate",
        data_uri=training_data.output["uri"],
        suite_path=SUITE,
        expected_fingerprint=EXPECTED_SHA256,
    )
    train = MlflowTrainModelOperator(
        task_id="train",
        data_uri=training_data.output["uri"],
        estimator="sklearn.neural_network.MLPClassifier",
        estimator_params={"hidden_layer_sizes": [32, 16], "max_iter": 300, "random_state": 0},
        validation=validate.output,
        training_set=training_data.output,
        **RETRIES,
    )
    convert = OpenvinoConvertModelOperator(
        task_id="convert",
        run_id=train.output["run_id"],
        holdout_uri=train.output["holdout_uri"],
        **RETRIES,
    )
    # Scores the challenger as it will serve (the IR the conversion selected) against the champion's IR.
    evaluate = MlflowEvaluateChallengerOperator(
        task_id="evaluate",
        model_name=MODEL_NAME,
        run_id=train.output["run_id"],
        ir_uri=convert.output["ir_uri"],
        **RETRIES,
    )
    register = MlflowRegisterModelOperator(
        task_id="register", model_name=MODEL_NAME, run_id=train.output["run_id"], **RETRIES
    )
    # Retries are safe: a retry continues the rollout from its report (or after an abort, runs it
    # again), and never rolls a rejected version out again.
    rollout = RolloutChallengerOperator(
        task_id="rollout",
        model_name=MODEL_NAME,
        version=register.output["version"],
        deployment=DEPLOYMENT,
        analysis_seconds="{{ params.analysis_seconds }}",
        approval="{{ params.approval }}",
        allow_rejected="{{ params.allow_rejected }}",
        on_inconclusive="{{ params.on_inconclusive }}",
        max_extensions="{{ params.max_extensions }}",
        labels_from="{{ params.labels_from }}",
        retries=2,
        retry_delay=timedelta(seconds=30),
    )

    # Nothing to approve (approval off, or a first champion): no approval and no finish.
    approval_hold(rollout, model_name=MODEL_NAME, version=register.output["version"], deployment=DEPLOYMENT)
    choose_source() >> [training_set, training_data]
    training_set >> training_data >> validate >> train >> convert >> evaluate >> register >> rollout


airloop_loop()
