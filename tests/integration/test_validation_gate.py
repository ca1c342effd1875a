"""The Great Expectations gate as an Airflow task: sources, runtimes, the run it gates, the loop it stops.

Sources: S3 through ``ObjectStoragePath`` and an ``aws`` connection (moto's server stands in for S3), a SQL
query through a database connection (SQLite), a local file. Runtimes: the worker and the ``validation``
runtime. The MLflow run it gates carries its summary. Every case of the bad-input corpus stops the
reference loop at the gate: nothing trains, nothing is registered.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from airflow.sdk.exceptions import AirflowFailException

from airloop import artefacts, runtimes, settings
from airloop.embedded.demo import generate
from airloop.operators.great_expectations import GreatExpectationsValidateDataOperator
from airloop.tables import write_table
from airloop.validation import VALIDATION_ARTIFACT
from tests.fakes.context import TaskInstance, task_context

REPO = Path(__file__).resolve().parents[2]
SUITE = str(REPO / "dags" / "expectations" / "training_data.json")
BUCKET = "airloop-gate"


def _execute(operator: GreatExpectationsValidateDataOperator) -> tuple[dict, TaskInstance]:
    context = task_context(operator.task_id, dag_id="gate")
    return operator.execute(context), context["ti"]


@pytest.fixture(scope="module")
def s3(moto_s3: dict) -> dict:
    moto_s3["client"].create_bucket(Bucket=BUCKET)
    return moto_s3


@pytest.fixture
def aws_connection(s3, monkeypatch) -> str:
    monkeypatch.setenv(
        "AIRFLOW_CONN_GATE_S3",
        json.dumps(
            {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {"endpoint_url": s3["endpoint"], "region_name": "us-east-1"},
            }
        ),
    )
    return "gate_s3"


def _put(s3: dict, key: str, frame) -> str:
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=frame.to_parquet(index=False))
    return f"s3://{BUCKET}/{key}"


def test_s3_data_through_an_aws_connection(s3, aws_connection, tmp_path):
    good = _put(s3, "good.parquet", generate(400, seed=1))
    result, ti = _execute(
        GreatExpectationsValidateDataOperator(
            task_id="validate_s3", data_uri=good, conn_id=aws_connection, suite_path=SUITE
        )
    )
    assert result["success"] is True and result["data_uri"] == good and result["rows"] == 400
    assert json.loads(json.dumps(result)) == result
    assert ti.xcom["airloop_data_docs"] == {"path": result["docs"]}
    assert artefacts.local_path(result["docs"]).is_file()
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(os.environ)  # the credentials stayed put

    bad = _put(s3, "bad.parquet", generate(400, seed=1).drop(columns=["f3"]))
    with pytest.raises(
        AirflowFailException,
        match=rf"{bad} failed 5 of 37 expectations: "
        r"expect_table_columns_to_match_set\(table\)",
    ):
        _execute(
            GreatExpectationsValidateDataOperator(
                task_id="validate_s3_bad", data_uri=bad, conn_id=aws_connection, suite_path=SUITE
            )
        )
    with pytest.raises(ValueError, match="missing.parquet does not exist"):
        _execute(
            GreatExpectationsValidateDataOperator(
                task_id="validate_s3_missing",
                data_uri=f"s3://{BUCKET}/missing.parquet",
                conn_id=aws_connection,
                suite_path=SUITE,
            )
        )


@pytest.fixture
def database(tmp_path, monkeypatch) -> str:
    path = tmp_path / "warehouse.db"
    with sqlite3.connect(path) as connection:
        generate(500, seed=2).to_sql("training", connection, index=False)
    monkeypatch.setenv("AIRFLOW_CONN_GATE_DB", json.dumps({"conn_type": "sqlite", "host": str(path)}))
    return "gate_db"


def test_sql_query_through_a_database_connection(database, aws_connection):
    result, _ = _execute(
        GreatExpectationsValidateDataOperator(
            task_id="validate_sql", sql="SELECT * FROM training", conn_id=database, suite_path=SUITE
        )
    )
    assert result["success"] is True and result["rows"] == 500
    assert result["data_uri"] == "sql on gate_db: SELECT * FROM training"
    with pytest.raises(AirflowFailException, match=r"expect_table_row_count_to_be_between\(table\)"):
        _execute(
            GreatExpectationsValidateDataOperator(
                task_id="validate_sql_few",
                sql="SELECT * FROM training LIMIT 10",
                conn_id=database,
                suite_path=SUITE,
            )
        )
    with pytest.raises(ValueError, match="gate_s3 .* is not a database connection"):
        _execute(
            GreatExpectationsValidateDataOperator(
                task_id="validate_sql_s3", sql="SELECT 1", conn_id=aws_connection, suite_path=SUITE
            )
        )


def test_fail_on_error_false_returns_the_failures(tmp_path):
    frame = generate(300, seed=3)
    frame.loc[::5, "f2"] = np.nan
    uri = write_table(frame, str(tmp_path / "nans.parquet"))
    result, _ = _execute(
        GreatExpectationsValidateDataOperator(
            task_id="validate_lenient", data_uri=uri, suite_path=SUITE, fail_on_error=False
        )
    )
    assert result["success"] is False
    assert [(f["expectation"], f["column"], f["observed"]["unexpected_count"]) for f in result["failed"]] == [
        ("expect_column_values_to_not_be_null", "f2", 60)
    ]


def test_the_gate_in_the_validation_runtime(tmp_path):
    try:
        runtimes.python("validation")
    except runtimes.RuntimeMissingError as error:
        pytest.skip(str(error))
    frame = generate(3000, seed=4)
    frame.loc[2500, "f1"] = 1e9  # in the last batch
    uri = write_table(frame, str(tmp_path / "data.parquet"))
    common = {"data_uri": uri, "suite_path": SUITE, "batch_rows": 1000, "fail_on_error": False}
    isolated, _ = _execute(
        GreatExpectationsValidateDataOperator(task_id="in_runtime", runtime="validation", **common)
    )
    worker, _ = _execute(GreatExpectationsValidateDataOperator(task_id="in_worker", **common))
    assert isolated["batches"] == 3 and isolated["failed"][0]["observed"]["sample"] == [1e9]
    assert {k: v for k, v in isolated.items() if k not in ("docs", "docs_uri")} == {
        k: v for k, v in worker.items() if k not in ("docs", "docs_uri")
    }
    assert artefacts.local_path(isolated["docs"]).is_file()


def test_the_gated_mlflow_run_carries_the_validation(tmp_path):
    from airloop.steps.training.train import train

    uri = write_table(generate(600, seed=5), str(tmp_path / "train.parquet"))
    summary, _ = _execute(
        GreatExpectationsValidateDataOperator(task_id="validate", data_uri=uri, suite_path=SUITE)
    )
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    request = {
        "tracking_uri": tracking_uri,
        "artifact_root": (tmp_path / "mlruns").as_uri(),
        "data_uri": uri,
        "estimator": "sklearn.linear_model.LogisticRegression",
        "reference_rows": 50,
        "validation": summary,
    }
    run = mlflow.MlflowClient(tracking_uri).get_run(train(request)["run_id"])
    assert run.data.tags["airloop.validation.success"] == "true"
    assert run.data.tags["airloop.validation.expectations"] == "37/37"
    assert run.data.tags["airloop.validation.docs"] == summary["docs_uri"]
    assert summary["docs_uri"] == f"{settings.artefact_root()}/{summary['docs']}"
    local = mlflow.MlflowClient(tracking_uri).download_artifacts(
        run.info.run_id, VALIDATION_ARTIFACT, str(tmp_path)
    )
    assert json.loads(Path(local).read_text()) == summary

    write_table(generate(600, seed=6), uri)  # the file changes between the gate and training
    with pytest.raises(ValueError, match="changed since it was validated"):
        train({**request, "tags": {"airflow.dag_id": "g", "airflow.run_id": "2", "airflow.task_id": "train"}})


# The corpus cases the reference loop's own suite knows (the rest need a key or a category column).
def _corrupt(case: str, folder: Path) -> str:
    frame = generate(400, seed=7)
    path = folder / f"{case.replace(' ', '_')}.parquet"
    changes = {
        "column missing": lambda f: f.drop(columns=["f5"]),
        "column renamed": lambda f: f.rename(columns={"f1": "F1"}),
        "new column": lambda f: f.assign(f8=0.0),
        "wrong dtype": lambda f: f.assign(f3=f["f3"].astype(str)),
        "NaNs": lambda f: f.assign(f2=f["f2"].where(f.index % 10 > 0)),
        "out of range": lambda f: f.assign(f4=f["f4"] * 1e3),
        "unseen label class": lambda f: f.assign(label=f["label"] * 2),
        "label leaked as a feature": lambda f: f.assign(leak=f["label"]),
        # The trial's leak: an existing feature overwritten with the label.
        "label written over a feature": lambda f: f.assign(f3=f["label"].astype("float64")),
        "too few rows": lambda f: f.head(20),
    }
    if case == "empty file":
        path.write_bytes(b"")
    elif case == "truncated parquet":
        path.write_bytes(frame.to_parquet(index=False)[:-64])
    else:
        write_table(changes[case](frame), str(path))
    return str(path)


LOOP_CORPUS = {
    "column missing": "expect_table_columns_to_match_set",
    "column renamed": "expect_table_columns_to_match_set",
    "new column": "expect_table_columns_to_match_set",
    "wrong dtype": "expect_column_values_to_be_in_type_list",
    "NaNs": "expect_column_values_to_not_be_null",
    "out of range": "expect_column_values_to_be_between",
    "unseen label class": "expect_column_values_to_be_in_set",
    "label leaked as a feature": "expect_table_columns_to_match_set",
    "label written over a feature": "expectations: expect_column_to_not_predict_label(f3)",
    "too few rows": "expect_table_row_count_to_be_between",
    "empty file": "is empty (0 bytes)",
    "truncated parquet": "is not a readable parquet file",
}


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True, capture_output=True
    )
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags")).get_dag("airloop_loop")


def _model_state() -> tuple[list, list]:
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri())
    versions = sorted(str(v.version) for v in client.search_model_versions("name='airloop-classifier'"))
    runs = [r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return versions, runs


@pytest.mark.parametrize("case", list(LOOP_CORPUS))
def test_bad_input_stops_the_loop_at_the_gate(loop, case, tmp_path, capsys):
    before = _model_state()
    run = loop.test(run_conf={"data_uri": _corrupt(case, tmp_path)})
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    # A file that cannot be read fails the first task that reads it: the one writing the training table.
    failing = "training_data" if case in ("empty file", "truncated parquet") else "validate"
    assert str(run.state) == "failed" and states[failing] == "failed", states
    assert all(
        states[task] == "upstream_failed" for task in ("train", "evaluate", "convert", "register", "rollout")
    ), states
    assert LOOP_CORPUS[case] in capsys.readouterr().out  # the task log names the reason
    assert _model_state() == before  # nothing trained, nothing registered
