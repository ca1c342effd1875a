"""Batch scoring with a model version's OpenVINO IR: chunks, resume, the row count check, bad input;
local files and S3 (moto) through an aws connection."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pandas as pd
import pytest

from airloop.embedded.demo import FEATURES, generate
from airloop.openvino_ir import ModelIntegrityError
from airloop.steps.conversion import score as score_step
from airloop.steps.conversion.convert import convert
from airloop.steps.training.train import train
from airloop.tables import write_table
from tests.fakes.context import TaskInstance, task_context

MODEL = "airloop-score"
BUCKET = "airloop-score"
SECRET = "score-secret-7f3a"  # the connection's; found nowhere in os.environ but its AIRFLOW_CONN_ variable


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    trained = train(
        {
            "tracking_uri": tracking_uri,
            "artifact_root": (root / "artefacts").as_uri(),
            "data_uri": write_table(generate(1200, seed=0), str(root / "train.parquet")),
            "estimator_params": {"hidden_layer_sizes": [16], "max_iter": 300},
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


def _execute(operator) -> tuple[dict, TaskInstance]:
    context = task_context(operator.task_id)
    return operator.execute(context), context["ti"]


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
    result, ti = _execute(
        OpenvinoScoreDatasetOperator(
            task_id="score",
            mlflow_conn_id="mlflow_score",
            model_name=MODEL,
            model_version=version["version"],
            data_uri=version["data_uri"],
            output_uri=str(tmp_path / "predictions"),
            chunk_rows=1000,
            passthrough_columns=["customer_id"],
        )
    )
    assert result["rows_out"] == 2500 and result["chunks_scored"] == 3
    assert json.loads(json.dumps(result)) == result
    assert ti.xcom["airloop_mlflow_model_version"]["version"] == version["version"]
    assert FEATURES[0] not in pd.read_parquet(tmp_path / "predictions").columns  # features are not copied


@pytest.fixture(scope="module")
def s3(moto_s3: dict, version: dict) -> dict:
    """A versioned bucket holding the data set: each object's versions tell which parts a run wrote."""
    client = moto_s3["client"]
    client.create_bucket(Bucket=BUCKET)
    client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    client.upload_file(version["data_uri"], BUCKET, "data/rows.parquet")
    return {**moto_s3, "data_uri": f"s3://{BUCKET}/data/rows.parquet"}


@pytest.fixture
def s3_operator(version, s3, monkeypatch):
    """An operator factory scoring the S3 data set into ``s3://<bucket>/<prefix>/`` through connections."""
    from airloop.operators.openvino import OpenvinoScoreDatasetOperator

    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_SCORE", json.dumps({"conn_type": "mlflow", "host": version["tracking_uri"]})
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_S3_SCORE",
        json.dumps(
            {
                "conn_type": "aws",
                "login": "score-key",
                "password": SECRET,
                "extra": {"endpoint_url": s3["endpoint"], "region_name": "us-east-1"},
            }
        ),
    )
    return lambda prefix: OpenvinoScoreDatasetOperator(
        task_id="score_s3",
        mlflow_conn_id="mlflow_score",
        conn_id="s3_score",
        model_name=MODEL,
        model_version=version["version"],
        data_uri=s3["data_uri"],
        output_uri=f"s3://{BUCKET}/{prefix}/",
        chunk_rows=1000,
        passthrough_columns=["customer_id"],
    )


def _s3_manifest(s3: dict, prefix: str) -> dict:
    return json.loads(s3["client"].get_object(Bucket=BUCKET, Key=f"{prefix}/_manifest.json")["Body"].read())


def _s3_predictions(s3: dict, prefix: str) -> pd.DataFrame:
    listed = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/part-")["Contents"]
    parts = [
        pd.read_parquet(io.BytesIO(s3["client"].get_object(Bucket=BUCKET, Key=key)["Body"].read()))
        for key in sorted(item["Key"] for item in listed)
    ]
    return pd.concat(parts, ignore_index=True)


def _writes(s3: dict, prefix: str) -> dict[str, int]:
    """How many times each object under ``prefix`` was written (its versions, delete markers aside)."""
    listed = s3["client"].list_object_versions(Bucket=BUCKET, Prefix=f"{prefix}/").get("Versions", [])
    keys = [item["Key"].removeprefix(f"{prefix}/") for item in listed]
    return {key: keys.count(key) for key in sorted(set(keys))}


def test_the_operator_scores_s3_data_into_s3_through_an_aws_connection(version, s3, s3_operator, tmp_path):
    result, _ = _execute(s3_operator("scores/v1"))
    assert result["output_uri"] == f"s3://{BUCKET}/scores/v1/"
    assert result["manifest_uri"] == f"s3://{BUCKET}/scores/v1/_manifest.json"
    assert result["rows_in"] == result["rows_out"] == 2500 and result["chunks_scored"] == 3
    listed = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="scores/v1/")["Contents"]
    assert sorted(item["Key"] for item in listed) == [
        "scores/v1/_manifest.json",
        "scores/v1/part-00000.parquet",
        "scores/v1/part-00001.parquet",
        "scores/v1/part-00002.parquet",
    ]
    manifest = _s3_manifest(s3, "scores/v1")
    assert manifest["complete"] is True and manifest["rows"] == 2500
    assert manifest["data_uri"] == s3["data_uri"]
    assert manifest["parts"] == {
        "part-00000.parquet": 1000,
        "part-00001.parquet": 1000,
        "part-00002.parquet": 500,
    }
    local = tmp_path / "predictions"
    score_step.score(_request(version, local))
    pd.testing.assert_frame_equal(_s3_predictions(s3, "scores/v1"), pd.read_parquet(local))
    # The credentials went to the step as fsspec options, not through the environment, and as plain
    # values: a request any runtime (another interpreter, a pod) can take as JSON.
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(os.environ)
    assert not [key for key, value in os.environ.items() if SECRET in value and "AIRFLOW_CONN_" not in key]
    options = s3_operator("scores/v1")._storage_options()
    assert json.loads(json.dumps(options)) == options
    assert options == {
        "key": "score-key",
        "secret": SECRET,
        "endpoint_url": s3["endpoint"],
        "client_kwargs": {"region_name": "us-east-1"},
    }


def test_a_connection_that_is_not_aws_is_refused_by_name(s3_operator, monkeypatch):
    operator = s3_operator("scores/other")
    monkeypatch.setenv("AIRFLOW_CONN_S3_SCORE", json.dumps({"conn_type": "sqlite", "host": "/tmp/x.db"}))
    with pytest.raises(ValueError, match="conn_id 's3_score' is a 'sqlite' connection: batch scoring reads"):
        _execute(operator)


def test_an_interrupted_run_on_s3_resumes_where_it_stopped(s3, s3_operator):
    prefix = "scores/resume"
    _execute(s3_operator(prefix))
    first = _s3_predictions(s3, prefix)
    # The state a crash after the second chunk leaves (its manifest lists two parts, the third upload never
    # completed), with the second part's object lost since: the manifest alone is not trusted.
    manifest = _s3_manifest(s3, prefix)
    manifest.update(complete=False, parts={"part-00000.parquet": 1000, "part-00001.parquet": 1000})
    s3["client"].put_object(Bucket=BUCKET, Key=f"{prefix}/_manifest.json", Body=json.dumps(manifest))
    for part in ("part-00001.parquet", "part-00002.parquet"):
        s3["client"].delete_object(Bucket=BUCKET, Key=f"{prefix}/{part}")
    before = _writes(s3, prefix)

    result, _ = _execute(s3_operator(prefix))
    assert result["chunks_skipped"] == 1 and result["chunks_scored"] == 2 and result["rows_out"] == 2500
    after = _writes(s3, prefix)
    assert after["part-00000.parquet"] == before["part-00000.parquet"] == 1  # left as it was
    assert after["part-00001.parquet"] == after["part-00002.parquet"] == 2  # scored again
    pd.testing.assert_frame_equal(_s3_predictions(s3, prefix), first)
    assert _s3_manifest(s3, prefix)["complete"] is True

    again, _ = _execute(s3_operator(prefix))
    assert again["chunks_skipped"] == 3 and again["chunks_scored"] == 0


def test_the_ir_is_verified_once_per_scoring_run(version, tmp_path, monkeypatch):
    from airloop import openvino_ir

    verified: list[Path] = []
    read_verified_manifest = openvino_ir.read_verified_manifest

    def counted(model_dir: Path) -> dict:
        verified.append(model_dir)
        return read_verified_manifest(model_dir)

    monkeypatch.setattr(openvino_ir, "read_verified_manifest", counted)
    assert score_step.score(_request(version, tmp_path / "predictions"))["rows_out"] == 2500
    assert len(verified) == 1
