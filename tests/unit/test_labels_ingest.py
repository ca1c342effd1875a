"""Ground truth that comes after its predictions, joined to the request log: the counts that keep it
honest, from a file, a folder in S3 (moto) and SQL (SQLite through an Airflow connection).

The request and labels logs are written with the gateway's own writer (``RequestLog``), as it writes
them while serving."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from airloop.operators.labels import LabelsIngestOperator
from airloop.serving.logs import LABELS_FOLDER, RequestLog
from airloop.steps.rollout.labels import ingest
from tests.fakes.context import task_context

DEPLOYMENT = "churn"
NOW = time.time()
HOUR = 3600.0
BUCKET = "airloop-ground-truth"


def request_id(n: int) -> str:
    return f"{n:032x}"


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An artefact root whose request log holds 10 predictions (class "1" predicted for ids 0-9): ids 0-5
    answered by v1 two hours ago, ids 6-9 by v2 an hour ago; one failed request (id 10); and a labels log
    holding the gateway's feedback for id 3."""
    uri = (tmp_path / "artefacts").as_uri()
    monkeypatch.setenv("AIRLOOP_ARTEFACTS", uri)
    log = RequestLog(uri, DEPLOYMENT, 100)
    for n in range(10):
        arm, version, ts = ("v1", "1", NOW - 2 * HOUR) if n < 6 else ("v2", "2", NOW - HOUR)
        log.add(
            {
                "request_id": request_id(n),
                "ts": ts + n,
                "predictor": arm,
                "model_version": version,
                "prediction": [[0.3, 0.7]],
                "classes": ["0", "1"],
                "status": 200,
            }
        )
    log.add(
        {"request_id": request_id(10), "ts": NOW - HOUR, "predictor": "v2", "prediction": None, "status": 502}
    )
    log.write(log.take())
    feedback = RequestLog(uri, DEPLOYMENT, 100, folder=LABELS_FOLDER)
    feedback.write([{"request_id": request_id(3), "ts": NOW - HOUR, "truth": [1.0], "source": "feedback"}])
    return uri


# id, label, when it became known
TRUTH = [
    (request_id(0), 1, NOW - HOUR),  # v1, right
    (request_id(1), 0, NOW - HOUR),  # v1, wrong
    (request_id(1), 1, NOW - HOUR),  # a second label for id 1 in the same batch
    (request_id(3), 0, NOW - HOUR),  # id 3 already has the gateway's feedback
    (request_id(6), 1, NOW - 0.5 * HOUR),  # v2, right
    (request_id(7), 1, NOW),  # v2, right
    (request_id(8), 1, NOW + 30 * HOUR),  # 31 hours after its prediction: too late for a 24 h limit
    (request_id(99), 1, NOW),  # no such prediction
    (request_id(10), 1, NOW),  # its request failed: nothing was predicted
    (request_id(9), None, NOW),  # no label
    (request_id(2), 1, NOW - 3 * HOUR),  # labelled before it was predicted
    (request_id(9), 1, NOW),  # v2, right: an invalid row of the same id does not make it a duplicate
]


def truth_table() -> pd.DataFrame:
    frame = pd.DataFrame(TRUTH, columns=["request_id", "label", "labelled_at"])
    frame["labelled_at"] = pd.to_datetime(frame["labelled_at"], unit="s", utc=True)
    return frame


def request(path: Path, root: str, **changes: Any) -> dict[str, Any]:
    return {
        "labels_path": str(path),
        "deployment": DEPLOYMENT,
        "artefact_root": root,
        "time_column": "labelled_at",
        "max_label_delay_hours": 24,
        "now": NOW,
        **changes,
    }


def counts(result: dict[str, Any]) -> tuple[int, ...]:
    return tuple(result[k] for k in ("rows", "matched", "duplicates", "unknown", "too_late", "invalid"))


def test_each_row_is_counted_once_and_matched_ones_join_their_arm(root, tmp_path):
    path = tmp_path / "truth.parquet"
    truth_table().to_parquet(path)
    result = ingest(request(path, root))
    assert counts(result) == (12, 5, 2, 2, 1, 2)
    assert result["examples"]["duplicates"] == [request_id(1), request_id(3)]
    assert result["examples"]["unknown"] == [request_id(99), request_id(10)]
    assert result["examples"]["too_late"] == [request_id(8)]
    assert result["examples"]["invalid"] == [request_id(9), request_id(2)]
    # Per arm, over the whole labels log: v1 has ids 0, 1 and the feedback for 3; v2 ids 6, 7 and 9.
    v1, v2 = result["quality"]["v1"], result["quality"]["v2"]
    assert (v1["labelled"], v1["correct"], v1["model_version"]) == (3, 2, "1")
    assert (v2["labelled"], v2["correct"], v2["accuracy"]) == (3, 3, 1.0)
    # Lags of 0.5 h - 6 s, 1 h - 9 s and 1 h - 7 s: the nearest-rank median and p90.
    assert v2["label_lag_p50_s"] == pytest.approx(HOUR - 9, abs=0.01)
    assert v2["label_lag_p90_s"] == pytest.approx(HOUR - 7, abs=0.01)
    written = [json.loads(line) for line in Path(result["written"]).read_text().splitlines()]
    assert [(r["request_id"], r["predictor"], r["correct"]) for r in written] == [
        (request_id(0), "v1", 1),
        (request_id(1), "v1", 0),
        (request_id(6), "v2", 1),
        (request_id(7), "v2", 1),
        (request_id(9), "v2", 1),
    ]


def test_a_retried_ingest_counts_its_rows_as_duplicates_and_writes_nothing_twice(root, tmp_path):
    path = tmp_path / "truth.parquet"
    truth_table().to_parquet(path)
    first = ingest(request(path, root))
    again = ingest(request(path, root))
    assert again["matched"] == 0 and again["written"] is None
    # What was written is now a duplicate; what was not used is counted as before.
    assert counts(again) == (12, 0, first["matched"] + first["duplicates"], 2, 1, 2)
    assert again["quality"] == first["quality"]


def test_without_a_time_column_labels_are_as_of_the_ingest(root, tmp_path):
    path = tmp_path / "truth.csv"
    pd.DataFrame({"id": [request_id(0), request_id(6)], "y": ["1", "0"]}).to_csv(path, index=False)
    result = ingest(request(path, root, id_column="id", label_column="y", time_column=None))
    assert counts(result) == (2, 2, 0, 0, 0, 0)
    assert result["quality"]["v2"]["correct"] == 0 and result["quality"]["v2"][
        "label_lag_p50_s"
    ] == pytest.approx(HOUR - 6, abs=1)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        (
            {"label_column": "truth"},
            r"has no column \['truth'\] \(it has \['request_id', 'label', 'labelled_at'\]\)",
        ),
        ({"max_label_delay_hours": 0}, "max_label_delay_hours must be a positive number of hours"),
        ({"lookback_hours": "a week"}, "lookback_hours must be a number of hours"),
    ],
)
def test_bad_requests_name_the_problem(root, tmp_path, changes, problem):
    path = tmp_path / "truth.parquet"
    truth_table().to_parquet(path)
    with pytest.raises(ValueError, match=problem):
        ingest(request(path, root, **changes))


def test_the_operator_reads_ground_truth_from_sql_through_a_connection(root, tmp_path, monkeypatch):
    with sqlite3.connect(tmp_path / "warehouse.db") as db:
        truth_table().assign(labelled_at=lambda f: f["labelled_at"].astype("int64") / 1e9).to_sql(
            "outcomes", db, index=False
        )
    monkeypatch.setenv(
        "AIRFLOW_CONN_WAREHOUSE", json.dumps({"conn_type": "sqlite", "host": str(tmp_path / "warehouse.db")})
    )
    operator = LabelsIngestOperator(
        task_id="labels",
        deployment=DEPLOYMENT,
        labels_sql="SELECT request_id, label, labelled_at FROM outcomes",
        labels_conn_id="warehouse",
        time_column="labelled_at",  # epoch seconds in this table
        max_label_delay_hours="24",
    )
    result = operator.execute(task_context("labels"))
    assert result["source"] == "sql on warehouse: SELECT request_id, label, labelled_at FROM outcomes"
    # SQLite gives the labels back as floats (a NULL among them): the counts are those of the file.
    assert counts(result) == (12, 5, 2, 2, 1, 2)


def test_the_operator_reads_a_folder_of_drops_from_s3(root, moto_s3, monkeypatch):
    client = moto_s3["client"]
    client.create_bucket(Bucket=BUCKET)
    table = truth_table()
    for part, rows in enumerate((table.iloc[:5], table.iloc[5:])):
        client.put_object(Bucket=BUCKET, Key=f"drops/part-{part}.parquet", Body=rows.to_parquet(index=False))
    client.put_object(Bucket=BUCKET, Key="drops/_SUCCESS", Body=b"")
    extra = {"endpoint_url": moto_s3["endpoint"], "region_name": "us-east-1"}
    connection = {"conn_type": "aws", "login": "testing", "password": "testing", "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_TRUTH_S3", json.dumps(connection))
    result = LabelsIngestOperator(
        task_id="labels",
        deployment=DEPLOYMENT,
        labels_uri=f"s3://{BUCKET}/drops",
        labels_conn_id="truth_s3",
        time_column="labelled_at",
        max_label_delay_hours=24,
    ).execute(task_context("labels"))
    assert counts(result) == (12, 5, 2, 2, 1, 2)
