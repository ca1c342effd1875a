"""
Hyperparameter search: validate -> train (one mapped task per candidate) -> select -> evaluate -> register.

Each candidate trains in its own task instance (Airflow dynamic task mapping) and its own MLflow run;
the select task nests them under one parent run and returns the winner in the shape the train task
returns, so the offline gate and registration follow as in ``airloop_loop``. Retrying any task reuses
its MLflow run (the map index is part of the run's identity), so every task declares retries.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from airflow.sdk import Param, dag

from airloop import settings
from airloop.operators.great_expectations import GreatExpectationsValidateDataOperator
from airloop.operators.mlflow import (
    MlflowEvaluateChallengerOperator,
    MlflowRegisterModelOperator,
    MlflowSelectBestRunOperator,
    MlflowTrainModelOperator,
)

MODEL_NAME = os.environ.get("AIRLOOP_MODEL_NAME", "airloop-classifier")
TRAINING_DATA = os.environ.get(
    "AIRLOOP_TRAINING_DATA", str(settings.home() / "incoming" / "training.parquet")
)
SUITE = str(Path(__file__).parent / "expectations" / "training_data.json")
# The search space: one mapped training task per entry.
CANDIDATES = [
    {"hidden_layer_sizes": [8], "max_iter": 300, "alpha": 1e-4},
    {"hidden_layer_sizes": [32, 16], "max_iter": 300, "alpha": 1e-4},
    {"hidden_layer_sizes": [32, 16], "max_iter": 300, "alpha": 1e-2},
]
RETRIES = {"retries": 2, "retry_delay": timedelta(seconds=30)}


@dag(
    dag_id="airloop_hpo",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    tags=["airloop"],
    params={"data_uri": Param(TRAINING_DATA, type="string", description="training set: parquet or CSV")},
    doc_md=__doc__,
)
def airloop_hpo():
    validate = GreatExpectationsValidateDataOperator(
        task_id="validate", data_uri="{{ params.data_uri }}", suite_path=SUITE
    )
    train = MlflowTrainModelOperator.partial(
        task_id="train",
        data_uri="{{ params.data_uri }}",
        estimator="sklearn.neural_network.MLPClassifier",
        validation=validate.output,
        **RETRIES,
    ).expand(estimator_params=CANDIDATES)
    select = MlflowSelectBestRunOperator(
        task_id="select", run_ids=train.output["run_id"], metric="accuracy", mode="max", **RETRIES
    )
    evaluate = MlflowEvaluateChallengerOperator(
        task_id="evaluate", model_name=MODEL_NAME, run_id=select.output["run_id"], **RETRIES
    )
    register = MlflowRegisterModelOperator(
        task_id="register", model_name=MODEL_NAME, run_id=select.output["run_id"], **RETRIES
    )
    evaluate >> register


airloop_hpo()
