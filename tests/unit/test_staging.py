"""``airloop.staging.stage``: its checks and error texts, on real connections.

A SQLite database and moto's S3 (the session's ``moto_s3`` server) behind ``AIRFLOW_CONN_*``
connections, local files and folders; and the three operators that read data through it (the
Great Expectations gate, the drift data window, Feast's entity rows) failing with the same texts.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from airloop.operators.drift import DriftDetectDataOperator
from airloop.operators.feast import FeastBuildTrainingSetOperator
from airloop.operators.great_expectations import GreatExpectationsValidateDataOperator
from airloop.operators.labels import LabelsIngestOperator
from airloop.staging import Arguments, stage
from airloop.tables import read_table
from tests.fakes.context import task_context

BUCKET = "airloop-staging"
TABLE = pd.DataFrame({"f0": [1.0, 2.0, 3.0], "label": [0, 1, 0]})
WINDOW = Arguments("data window", "window_uri", "window_sql", "window_conn_id")


@pytest.fixture(scope="module")
def s3(moto_s3: dict) -> dict:
    client = moto_s3["client"]
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="table.parquet", Body=TABLE.to_parquet(index=False))
    for part in range(2):
        client.put_object(Bucket=BUCKET, Key=f"parts/day=1/part-{part}.parquet", Body=TABLE.to_parquet())
    return moto_s3


@pytest.fixture
def aws(s3: dict, monkeypatch: pytest.MonkeyPatch) -> str:
    extra = {"endpoint_url": s3["endpoint"], "region_name": "us-east-1"}
    connection = {"conn_type": "aws", "login": "testing", "password": "testing", "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_STAGE_S3", json.dumps(connection))
    return "stage_s3"


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    with sqlite3.connect(tmp_path / "warehouse.db") as db:
        TABLE.to_sql("served", db, index=False)
    connection = {"conn_type": "sqlite", "host": str(tmp_path / "warehouse.db")}
    monkeypatch.setenv("AIRFLOW_CONN_STAGE_DB", json.dumps(connection))
    return "stage_db"


def test_a_query_is_staged_as_a_parquet_file(database: str, tmp_path: Path) -> None:
    staged = stage(tmp_path / "out", sql="SELECT * FROM served WHERE label = 0", conn_id=database)
    assert staged.path == str(tmp_path / "out" / "data.parquet")
    assert staged.name == "sql on stage_db: SELECT * FROM served WHERE label = 0"
    assert read_table(staged.path).to_dict("list") == {"f0": [1.0, 3.0], "label": [0, 0]}
    window = stage(tmp_path, sql="SELECT f0 FROM served", conn_id=database, arguments=WINDOW)
    assert window.path == str(tmp_path / "data_window.parquet")  # named after what the operator reads


def test_a_local_file_or_folder_is_read_in_place(tmp_path: Path) -> None:
    path = tmp_path / "table.parquet"
    TABLE.to_parquet(path)
    assert stage(tmp_path / "out", uri=str(path)) == (str(path), str(path))
    assert stage(tmp_path / "out", uri=f"file://{path}") == (str(path), f"file://{path}")
    assert stage(tmp_path / "out", uri=str(tmp_path)).path == str(tmp_path)
    assert not (tmp_path / "out").exists()  # nothing copied


def test_an_object_is_copied_through_its_connection(aws: str, tmp_path: Path) -> None:
    staged = stage(tmp_path, uri=f"s3://{BUCKET}/table.parquet", conn_id=aws)
    assert staged == (str(tmp_path / "data" / "table.parquet"), f"s3://{BUCKET}/table.parquet")
    assert read_table(staged.path).equals(TABLE)
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(os.environ)  # the credentials stayed put


def test_a_remote_folder_is_copied_whole(aws: str, tmp_path: Path) -> None:
    staged = stage(tmp_path, uri=f"s3://{BUCKET}/parts", conn_id=aws, arguments=WINDOW)
    copied = sorted(p.relative_to(staged.path).as_posix() for p in Path(staged.path).rglob("*.parquet"))
    assert copied == ["day=1/part-0.parquet", "day=1/part-1.parquet"]
    assert staged.path == str(tmp_path / "data_window" / "parts")


def test_a_pod_reads_a_uri_itself_and_nothing_the_worker_staged(database: str, tmp_path: Path) -> None:
    assert stage(tmp_path, uri="s3://team/data.parquet", pod=True) == (
        "s3://team/data.parquet",
        "s3://team/data.parquet",
    )
    pod = "data read through conn_id is staged on the worker, where a pod cannot read it"
    with pytest.raises(ValueError, match=pod):
        stage(tmp_path, uri="s3://team/data.parquet", conn_id="stage_s3", pod=True)
    with pytest.raises(ValueError, match=pod):
        stage(tmp_path, sql="SELECT 1", conn_id=database, pod=True)


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ({}, "give the data as exactly one of data_uri and sql, got data_uri=None, sql=None"),
        ({"uri": "a.parquet", "sql": "SELECT 1"}, "give the data as exactly one of data_uri and sql"),
        ({"sql": "SELECT 1"}, "sql needs conn_id: the database connection to run it on"),
        ({"uri": "/nowhere/x.parquet"}, "data /nowhere/x.parquet does not exist"),
    ],
)
def test_arguments_that_cannot_be_staged_are_named(tmp_path: Path, given: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        stage(tmp_path, **given)


def test_connection_problems_are_named(aws: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data s3://airloop-staging/none.parquet does not exist "):
        stage(tmp_path, uri=f"s3://{BUCKET}/none.parquet", conn_id=aws)
    with pytest.raises(ValueError, match=r"\(read through connection stage_s3\)"):
        stage(tmp_path, uri=f"s3://{BUCKET}/none.parquet", conn_id=aws)
    with pytest.raises(
        ValueError,
        match=r"connection stage_s3 \(AwsGenericHook\) is not a database connection: window_sql runs on",
    ):
        stage(tmp_path, sql="SELECT 1", conn_id=aws, arguments=WINDOW)


def _gate(**data: str) -> None:
    GreatExpectationsValidateDataOperator(task_id="gate", suite_path="suite.json", **data).execute(
        task_context("gate")
    )


def _window(**data: str) -> None:
    DriftDetectDataOperator(task_id="detect", model_name="m", **data)._window(Path("."), Path("."))


def _entity_rows(**data: str) -> None:
    FeastBuildTrainingSetOperator(task_id="training_set", features=["v:f"], **data).execute(
        task_context("training_set")
    )


def _ground_truth(**data: str) -> None:
    LabelsIngestOperator(task_id="labels", **data).execute(task_context("labels"))


@pytest.mark.parametrize(
    ("run", "what", "uri", "sql", "conn_id"),
    [
        (_gate, "data", "data_uri", "sql", "conn_id"),
        (_window, "data window", "window_uri", "window_sql", "window_conn_id"),
        (_entity_rows, "entity rows", "entity_rows", "entity_sql", "sql_conn_id"),
        (_ground_truth, "ground truth", "labels_uri", "labels_sql", "labels_conn_id"),
    ],
)
def test_every_operator_that_reads_data_says_the_same(
    run: Callable[..., None], what: str, uri: str, sql: str, conn_id: str
) -> None:
    """One text per problem, in each operator's own argument names."""
    cases = [
        ({uri: "a.parquet", sql: "SELECT 1"}, f"give the {what} as exactly one of {uri} and {sql}"),
        ({sql: "SELECT 1"}, f"{sql} needs {conn_id}: the database connection to run it on"),
        ({uri: "/nowhere/a.parquet"}, f"{what} /nowhere/a.parquet does not exist"),
    ]
    for data, problem in cases:
        with pytest.raises(ValueError, match=problem):
            run(**data)
