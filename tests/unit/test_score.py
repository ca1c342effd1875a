"""Batch scoring with a model version's OpenVINO IR: chunks, resume, the row count check, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import mlflow
import pandas as pd
import pytest

from airloop.serving.model import ModelIntegrityError
from airloop.steps import score as score_step
from airloop.steps.convert import convert
from airloop.steps.data import FEATURES, generate, write_table
from airloop.steps.train import train

MODEL = "airloop-score"


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    trained = train(
        {
            "tracking_uri": tracking_uri,
            "artifact_root": (root / "artefacts").as_uri(),
            "data_uri": write_table(generate(1200, seed=0), str(root / "train.parquet")),
            "params": {"hidden_layer_sizes": [16], "max_iter": 300},
        }
    )
    converted = convert(
        {
            "tracking_uri": tracking_uri,
            "run_id": trained["run_id"],
            "variants": ["fp32", "fp16"],
            "benchmark_calls": 20,
        }
    )
    client = mlflow.MlflowClient(tracking_uri)
    client.create_registered_model(MODEL)
    registered = client.create_model_version(MODEL, trained["model_uri"], run_id=trained["run_id"])
    data = generate(2500, seed=4).reset_index(names="customer_id")
    data_uri = write_table(data, str(root / "to_score.parquet"))
    return {
        "tracking_uri": tracking_uri,
        "version": str(registered.version),
        "converted": converted,
        "data": data,
        "data_uri": data_uri,
        "root": root,
        "run_id": trained["run_id"],
    }


def _request(version: dict, output: Path, **extra) -> dict:
    return {
        "tracking_uri": version["tracking_uri"],
        "model_name": MODEL,
        "model_version": version["version"],
        "data_uri": version["data_uri"],
        "output_uri": str(output),
        "chunk_rows": 1000,
        "passthrough_columns": ["customer_id"],
        **extra,
    }


def _manifest(output: Path) -> dict:
    return json.loads((output / "_manifest.json").read_text())


def _stored_ir(version: dict) -> Path:
    run = mlflow.MlflowClient(version["tracking_uri"]).get_run(version["run_id"])
    return Path(urlparse(run.info.artifact_uri).path) / "openvino"


def test_a_data_set_is_scored_in_chunks_with_the_selected_variant(version, tmp_path):
    output = tmp_path / "predictions"
    result = score_step.score(_request(version, output))
    assert result == {
        "output_uri": str(output),
        "manifest_uri": f"{output}/_manifest.json",
        "model_name": MODEL,
        "model_version": version["version"],
        "ir_uri": f"runs:/{version['run_id']}/openvino",
        "variant": version["converted"]["variant"],
        "rows_in": 2500,
        "rows_out": 2500,
        "parts": 3,
        "chunks_scored": 3,
        "chunks_skipped": 0,
    }
    assert sorted(path.name for path in output.glob("part-*.parquet")) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    predictions = pd.read_parquet(output)
    assert list(predictions.columns) == [
        "customer_id",
        "prediction",
        "probability_0",
        "probability_1",
        "model_name",
        "model_version",
    ]
    assert predictions["customer_id"].tolist() == version["data"]["customer_id"].tolist()
    assert set(predictions["model_name"]) == {MODEL}
    assert set(predictions["model_version"]) == {version["version"]}
    # The IR's labels are the model's: the same accuracy on these rows as the native model, within a row.
    accuracy = (predictions["prediction"].astype(int) == version["data"]["label"]).mean()
    assert accuracy > 0.85
    manifest = _manifest(output)
    assert manifest["complete"] is True and manifest["rows"] == 2500
    assert manifest["parts"] == {
        "part-00000.parquet": 1000,
        "part-00001.parquet": 1000,
        "part-00002.parquet": 500,
    }


def test_an_interrupted_run_resumes_where_it_stopped(version, tmp_path):
    output = tmp_path / "predictions"
    score_step.score(_request(version, output))
    first = pd.read_parquet(output)
    # The state a crash after the first chunk leaves: one part, a manifest that lists only it.
    manifest = _manifest(output)
    manifest.update(complete=False, parts={"part-00000.parquet": 1000})
    (output / "_manifest.json").write_text(json.dumps(manifest))
    (output / "part-00002.parquet").unlink()
    (output / "part-00001.parquet").write_bytes(b"PAR1 half-written")  # a local writer's torn file
    before = (output / "part-00000.parquet").stat().st_mtime_ns

    result = score_step.score(_request(version, output))
    assert result["chunks_skipped"] == 1 and result["chunks_scored"] == 2 and result["rows_out"] == 2500
    assert (output / "part-00000.parquet").stat().st_mtime_ns == before  # left as it was
    pd.testing.assert_frame_equal(pd.read_parquet(output), first)
    assert _manifest(output)["complete"] is True

    again = score_step.score(_request(version, output))
    assert again["chunks_skipped"] == 3 and again["chunks_scored"] == 0


def test_a_short_part_fails_the_row_count_check(version, tmp_path, monkeypatch):
    output = tmp_path / "predictions"
    predictions = score_step._predictions
    # A fault between scoring and storage: the second part loses its last row.
    monkeypatch.setattr(
        score_step,
        "_predictions",
        lambda frame, *args: (
            predictions(frame, *args).iloc[:-1] if frame.index[0] == 1000 else predictions(frame, *args)
        ),
    )
    with pytest.raises(
        score_step.RowCountError,
        match=r"row count check failed .*: 2500 rows in .*, 2499 rows in its 3 prediction",
    ):
        score_step.score(_request(version, output))
    assert _manifest(output)["complete"] is False
    monkeypatch.undo()
    # The next run sees the short part for what it is and scores that chunk again.
    result = score_step.score(_request(version, output))
    assert result["chunks_scored"] == 1 and result["rows_out"] == 2500


def test_a_corrupted_ir_is_refused_before_anything_is_written(version, tmp_path):
    stored = _stored_ir(version) / "model.bin"
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[:-4] + b"\x00\x00\x80\x7f")
        with pytest.raises(ModelIntegrityError, match="checksum mismatch for model file 'model.bin'"):
            score_step.score(_request(version, tmp_path / "predictions"))
    finally:
        stored.write_bytes(original)
    assert not (tmp_path / "predictions").exists()


def test_an_output_folder_of_another_request_is_not_mixed_with(version, tmp_path):
    output = tmp_path / "predictions"
    score_step.score(_request(version, output))
    with pytest.raises(ValueError, match="holds predictions of another request \\(its chunk_rows differ\\)"):
        score_step.score(_request(version, output, chunk_rows=500))
    changed = tmp_path / "changed.parquet"
    shutil.copy(version["data_uri"], changed)
    score_step.score(_request(version, tmp_path / "other", data_uri=str(changed)))
    write_table(version["data"].head(10), str(changed))  # the file at the same URI replaced
    with pytest.raises(ValueError, match="its data_version differ"):
        score_step.score(_request(version, tmp_path / "other", data_uri=str(changed)))


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        ({"data_uri": "/nowhere/data.parquet"}, ValueError, "data set /nowhere/data.parquet does not exist"),
        ({"passthrough_columns": ["account"]}, ValueError, r"lacks columns \['account'\]"),
        ({"chunk_rows": 0}, ValueError, "chunk_rows must be at least 1"),
        ({"model_version": "99"}, Exception, "99"),
    ],
)
def test_bad_requests_name_the_problem(version, tmp_path, extra, error, message):
    with pytest.raises(error, match=message):
        score_step.score(_request(version, tmp_path / "predictions", **extra))


def test_the_operator_scores_through_the_mlflow_connection(version, tmp_path, monkeypatch):
    from airloop.operators.openvino import OpenvinoScoreDatasetOperator

    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_SCORE", json.dumps({"conn_type": "mlflow", "host": version["tracking_uri"]})
    )
    ti = SimpleNamespace(xcom={}, xcom_push=lambda key, value: ti.xcom.__setitem__(key, value))
    operator = OpenvinoScoreDatasetOperator(
        task_id="score",
        mlflow_conn_id="mlflow_score",
        model_name=MODEL,
        model_version=version["version"],
        data_uri=version["data_uri"],
        output_uri=str(tmp_path / "predictions"),
        chunk_rows=1000,
        passthrough_columns=["customer_id"],
    )
    result = operator.execute({"ti": ti})
    assert result["rows_out"] == 2500 and result["chunks_scored"] == 3
    assert json.loads(json.dumps(result)) == result
    assert ti.xcom["airloop_mlflow_model_version"]["version"] == version["version"]
    assert FEATURES[0] not in pd.read_parquet(tmp_path / "predictions").columns  # features are not copied
