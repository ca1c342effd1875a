"""Feast through the hook, steps and operators, on Feast's real local provider (and a real Redis).

One small feature repo is applied once for the module: customers with features x and y, a 1 h TTL,
and feature rows placed so that a point-in-time join has something to get wrong.
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import subprocess
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import pytest
from airflow.sdk.exceptions import AirflowFailException

from airloop import artefacts, settings
from airloop.feast_store import store_config
from airloop.hooks.feast import FeastHook
from airloop.operators.feast import FeastBuildTrainingSetOperator
from airloop.ports import free_port
from airloop.steps.data import features as steps
from airloop.tables import fingerprint, read_table, write_table
from tests.fakes.context import task_context

T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
DEFINITIONS = """
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Float64

customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.INT64)
stats = FeatureView(
    name="stats", entities=[customer], ttl=timedelta(hours=1),
    schema=[Field(name="x", dtype=Float64), Field(name="y", dtype=Float64)],
    source=FileSource(name="stats", path="data/stats.parquet", timestamp_field="event_timestamp"),
)
only_y = FeatureService(name="only_y", features=[stats[["y"]]])
"""
STORE_YAML = """
project: tests
provider: local
registry: data/registry.db
online_store: {type: sqlite, path: data/replaced.db}
offline_store: {type: file}
entity_key_serialization_version: 3
"""
# customer 1 changes x half an hour after T0; customer 3's only value is 5 h old at T0 (TTL 1 h);
# customer 4 appears 2 h after T0 (for materialisation ranges).
FEATURE_ROWS = [
    (1, T0, 1.0, 10.0),
    (1, T0 + timedelta(minutes=30), 2.0, 20.0),
    (2, T0, 3.0, 30.0),
    (3, T0 - timedelta(hours=5), 4.0, 40.0),
    (4, T0 + timedelta(hours=2), 5.0, 50.0),
]
# rows 3 (stale) and 99 (unknown) must be lost
ENTITY_ROWS = [
    (1, T0 + timedelta(minutes=10), 0),
    (1, T0 + timedelta(minutes=40), 1),
    (2, T0 + timedelta(minutes=5), 0),
    (3, T0, 1),
    (99, T0, 0),
]


def frame(rows: list[tuple], columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns)


DAG_ID = "features_test"
PREFIX = f"features/{DAG_ID}/manual__1"  # the artefact folder of the operators' task instances


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Any:
    """The applied repo, its connection ``feast_test`` and a folder for entity rows."""
    root = tmp_path_factory.mktemp("feast")
    (root / "repo" / "data").mkdir(parents=True)
    (root / "repo" / "definitions.py").write_text(DEFINITIONS)
    (root / "repo" / "feature_store.yaml").write_text(STORE_YAML)
    write_table(
        frame(FEATURE_ROWS, ["customer_id", "event_timestamp", "x", "y"]),
        str(root / "repo" / "data" / "stats.parquet"),
    )
    online_store = {"type": "sqlite", "path": str(root / "online.db")}
    conn = {"conn_type": "feast", "extra": {"repo_path": str(root / "repo"), "online_store": online_store}}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW_CONN_FEAST_TEST", json.dumps(conn))
        hook = FeastHook(feast_conn_id="feast_test")
        applied = steps.apply({"store": hook.store_config})
        yield {"root": root, "hook": hook, "applied": applied}


def entity_file(repo, rows=ENTITY_ROWS, name="entities.parquet", **columns) -> str:
    table = frame(rows, ["customer_id", "event_timestamp", "label"]).rename(columns=columns)
    path = repo["root"] / name
    if name.endswith(".csv"):
        table.to_csv(path, index=False)
        return str(path)
    return write_table(table, str(path))


def training_set(repo, tmp_path, **request) -> dict[str, Any]:
    request.setdefault("entity_rows", entity_file(repo))
    output = str(tmp_path / "set.parquet")
    return steps.training_set({"store": repo["hook"].store_config, "output_uri": output, **request})


def test_apply_registers_the_repo_and_uses_the_connections_online_store(repo):
    assert {k: v for k, v in repo["applied"].items() if k != "output"} == {
        "project": "tests",
        "entities": ["customer"],
        "feature_views": ["stats"],
        "feature_services": ["only_y"],
    }
    assert (repo["root"] / "online.db").exists()  # the connection's online_store replaced the YAML's
    assert not (repo["root"] / "repo" / "data" / "replaced.db").exists()
    ok, message = repo["hook"].test_connection()
    assert ok and "stats" in message


def test_point_in_time_join_never_leaks_a_later_value(repo, tmp_path):
    result = training_set(repo, tmp_path, features=["stats:x", "stats:y"], max_row_loss=0.5)
    table = read_table(result["uri"])
    # customer 1 at T0+10 min sees x=1 (x=2 comes at T0+30 min); at T0+40 min it sees x=2
    assert table.to_dict("list") == {"label": [0, 1, 0], "x": [1.0, 2.0, 3.0], "y": [10.0, 20.0, 30.0]}
    assert {k: result[k] for k in ("rows_in", "rows_returned", "rows_out", "row_loss", "features")} == {
        "rows_in": 5,
        "rows_returned": 4,
        "rows_out": 3,
        "row_loss": 0.4,
        "features": ["x", "y"],
    }
    assert result["fingerprint"] == fingerprint(table)
    again = training_set(
        repo, tmp_path, features=["stats:x", "stats:y"], max_row_loss=0.5, keep_entity_columns=True
    )
    kept = read_table(again["uri"])
    assert list(kept["customer_id"]) == [1, 1, 2] and "event_timestamp" in kept


def test_row_loss_over_the_threshold_fails_with_the_counts_and_writes_nothing(repo, tmp_path):
    duplicated = [*ENTITY_ROWS, ENTITY_ROWS[2]]  # Feast keeps one of two rows with the same keys and time
    uri = entity_file(repo, duplicated, name="duplicated.parquet")
    with pytest.raises(steps.RowLossError) as failure:
        training_set(repo, tmp_path, entity_rows=uri, features=["stats:x"], max_row_loss=0.4)
    message = str(failure.value)
    assert "3 complete rows for 6 entity rows" in message and "50.00% lost" in message
    assert "2 dropped" in message and "1 with the same keys and timestamp" in message
    assert "1 returned without every feature" in message
    assert not (tmp_path / "set.parquet").exists()


def test_a_feature_service_selects_its_features(repo, tmp_path):
    result = training_set(repo, tmp_path, feature_service="only_y", max_row_loss=0.4)
    assert result["features"] == ["y"]
    assert list(read_table(result["uri"]).columns) == ["label", "y"]


def test_bad_requests_name_the_problem(repo, tmp_path):
    with pytest.raises(ValueError, match="either features"):
        training_set(repo, tmp_path, features=["stats:x"], feature_service="only_y")
    with pytest.raises(ValueError, match="features must be a list"):
        training_set(repo, tmp_path, features="stats:x")
    with pytest.raises(ValueError, match="max_row_loss"):
        training_set(repo, tmp_path, features=["stats:x"], max_row_loss=5)
    no_time = entity_file(repo, name="no_time.parquet", event_timestamp="when")
    with pytest.raises(ValueError, match="no 'event_timestamp' column"):
        training_set(repo, tmp_path, entity_rows=no_time, features=["stats:x"])
    garbage = repo["root"] / "garbage.csv"
    garbage.write_text("customer_id,event_timestamp,label\n1,yesterday,0\n")
    with pytest.raises(ValueError, match="is not a timestamp"):
        training_set(repo, tmp_path, entity_rows=str(garbage), features=["stats:x"])


def _operator(**kwargs) -> FeastBuildTrainingSetOperator:
    return FeastBuildTrainingSetOperator(
        task_id=kwargs.pop("task_id"), feast_conn_id="feast_test", features=["stats:x", "stats:y"], **kwargs
    )


def test_operator_reads_entity_rows_from_csv_with_their_own_timestamp_column(repo):
    uri = entity_file(repo, name="entities.csv", event_timestamp="seen_at")  # timestamps as text
    result = _operator(
        task_id="from_csv", entity_rows=uri, timestamp_column="seen_at", max_row_loss=0.4
    ).execute(task_context("from_csv", dag_id=DAG_ID))
    assert result["uri"] == str(artefacts.local_path(f"{PREFIX}/from_csv/training_set.parquet"))
    assert read_table(result["uri"])["x"].tolist() == [1.0, 2.0, 3.0]
    assert result["entity_rows"] == uri and result["fingerprint"]["rows"] == 3


def test_operator_runs_an_entity_query_and_keeps_its_result(repo, monkeypatch):
    database = repo["root"] / "labels.db"
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE labels (customer_id INTEGER, event_timestamp TEXT, label INTEGER)")
        db.executemany(
            "INSERT INTO labels VALUES (?, ?, ?)", [(c, t.isoformat(), y) for c, t, y in ENTITY_ROWS]
        )
    monkeypatch.setenv("AIRFLOW_CONN_LABELS_DB", json.dumps({"conn_type": "sqlite", "host": str(database)}))
    operator = _operator(
        task_id="from_sql",
        sql_conn_id="labels_db",
        entity_sql="SELECT * FROM labels WHERE customer_id < 3 ORDER BY event_timestamp",
    )
    result = operator.execute(task_context("from_sql", dag_id=DAG_ID))
    assert (result["rows_in"], result["rows_out"], result["row_loss"]) == (3, 3, 0.0)
    assert read_table(result["uri"])["x"].tolist() == [3.0, 1.0, 2.0]  # the query's order
    assert read_table(result["entity_rows"])["customer_id"].tolist() == [2, 1, 1]


def test_operator_fails_over_the_threshold_and_checks_its_arguments(repo):
    with pytest.raises(AirflowFailException, match="3 complete rows for 5 entity rows"):
        _operator(task_id="lossy", entity_rows=entity_file(repo)).execute(
            task_context("lossy", dag_id=DAG_ID)
        )
    assert not artefacts.local_path(f"{PREFIX}/lossy/training_set.parquet").exists()
    with pytest.raises(ValueError, match="exactly one of entity_rows and entity_sql"):
        _operator(task_id="both", entity_rows="x.parquet", entity_sql="SELECT 1").execute(
            task_context("both", dag_id=DAG_ID)
        )


def online(hook: FeastHook, *customers: int) -> list[float | None]:
    rows = [{"customer_id": c} for c in customers]
    return hook.store.get_online_features(features=["stats:x"], entity_rows=rows).to_dict()["x"]


def test_materialize_a_range_then_incrementally(repo):
    hook = repo["hook"]
    ranged = steps.materialize(
        {
            "store": hook.store_config,
            "start": (T0 - timedelta(hours=1)).isoformat(),
            "end": (T0 + timedelta(hours=1)).isoformat(),
        }
    )
    assert ranged["mode"] == "range" and ranged["feature_views"] == ["stats"]
    assert online(hook, 1, 2, 4) == [2.0, 3.0, None]  # customer 4's row is after the range
    later = (T0 + timedelta(hours=3)).isoformat()
    incremental = steps.materialize({"store": hook.store_config, "end": later})
    assert incremental["mode"] == "incremental"
    assert online(hook, 1, 2, 4) == [2.0, 3.0, 5.0]
    with pytest.raises(ValueError, match="must be before end"):
        steps.materialize({"store": hook.store_config, "start": T0.isoformat(), "end": T0.isoformat()})
    with pytest.raises(ValueError, match="start must be an ISO 8601 timestamp"):
        steps.materialize({"store": hook.store_config, "start": "last tuesday"})


def test_hook_configuration(repo, monkeypatch):
    embedded = FeastHook().store_config  # no feast_default connection
    assert embedded["repo_path"].endswith("dags/features")
    assert embedded["config"]["registry"] == str(settings.feast_dir() / "registry.db")
    assert embedded["config"]["online_store"]["type"] == "sqlite"
    monkeypatch.setenv("AIRFLOW_CONN_FEAST_EMPTY", json.dumps({"conn_type": "feast"}))
    with pytest.raises(ValueError, match="'feast_empty'.*repo_path"):
        _ = FeastHook(feast_conn_id="feast_empty").store_config
    monkeypatch.setenv(
        "AIRFLOW_CONN_FEAST_NOWHERE",
        json.dumps({"conn_type": "feast", "extra": {"repo_path": str(repo["root"] / "nowhere")}}),
    )
    ok, message = FeastHook(feast_conn_id="feast_nowhere").test_connection()
    assert not ok and "nowhere" in message
    with pytest.raises(ValueError, match="only online_store and offline_store"):
        store_config(str(repo["root"] / "repo"), overrides={"registry": "elsewhere.db"})
    yaml_only = store_config(feature_store_yaml=str(repo["root"] / "repo" / "feature_store.yaml"))
    assert yaml_only["repo_path"] == str(repo["root"] / "repo") and yaml_only["config"]["project"] == "tests"


@pytest.fixture
def redis_port():
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    process = subprocess.Popen(
        [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, "redis-server did not start"
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_redis_online_store_from_the_connection(repo, redis_port, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_FEAST_REDIS",
        json.dumps(
            {
                "conn_type": "feast",
                "extra": {
                    "repo_path": str(repo["root"] / "repo"),
                    "online_store": {"type": "redis", "connection_string": f"127.0.0.1:{redis_port}"},
                },
            }
        ),
    )
    hook = FeastHook(feast_conn_id="feast_redis")
    assert online(hook, 2) == [None]  # an empty Redis, whatever SQLite holds
    steps.materialize(
        {
            "store": hook.store_config,
            "start": (T0 - timedelta(hours=1)).isoformat(),
            "end": (T0 + timedelta(hours=3)).isoformat(),
        }
    )
    assert online(hook, 1, 2, 4, 99) == [2.0, 3.0, 5.0, None]
    import redis

    assert redis.Redis(port=redis_port).dbsize() == 3  # one hash per customer


def test_serving_feature_lookup_configuration(tmp_path):
    from airloop.serving.features import FeatureLookup
    from airloop.serving.local import LocalServingTarget

    lookup = FeatureLookup.from_config(
        {"url": "http://feast:6566/", "entities": ["customer_id"], "features": ["stats:y", "stats:x"]}
    )
    assert (lookup.url, lookup.names) == ("http://feast:6566", ["y", "x"])
    assert lookup.wants(["customer_id"]) and not lookup.wants(["y", "x"]) and not lookup.wants(None)
    assert FeatureLookup.from_config(None) is None
    good = {"url": "http://feast:6566", "entities": ["customer_id"], "features": ["stats:x"]}
    for change, problem in [
        ({"url": "feast:6566"}, "http"),
        ({"entities": []}, "non-empty"),
        ({"features": ["x"]}, "'view:feature'"),
        ({"features": ["a:x", "b:x"]}, "distinct"),
    ]:
        with pytest.raises(ValueError, match=problem):
            FeatureLookup.from_config({**good, **change})
    target = LocalServingTarget(home=str(tmp_path), features={"url": "http://feast:6566"})
    with pytest.raises(ValueError, match="features must be"):
        target.deploy("churn", [])
    assert not (tmp_path / "churn").exists()  # refused before anything started
