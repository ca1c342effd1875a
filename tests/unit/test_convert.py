from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest
import yaml
from sklearn.tree import DecisionTreeClassifier

from airloop.steps.convert import convert, export_onnx, fetch_ir
from airloop.steps.data import FEATURES, generate, write_table
from airloop.steps.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    result = train(
        {
            "tracking_uri": tracking_uri,
            "artifact_root": (root / "artefacts").as_uri(),
            "data_uri": write_table(generate(1200, seed=0), str(root / "data.parquet")),
            "params": {"hidden_layer_sizes": [16, 8], "max_iter": 300, "early_stopping": True},
        }
    )
    converted = convert({"tracking_uri": tracking_uri, "run_id": result["run_id"], "benchmark_calls": 50})
    return {"tracking_uri": tracking_uri, "run": result, "converted": converted, "root": root}


def _request(trained: dict, **extra) -> dict:
    run_id = trained["run"]["run_id"]
    return {"tracking_uri": trained["tracking_uri"], "run_id": run_id, "benchmark_calls": 20, **extra}


def _fetch_request(trained: dict, dst: Path) -> dict:
    ir_uri = trained["converted"]["ir_uri"]
    return {"tracking_uri": trained["tracking_uri"], "ir_uri": ir_uri, "dst_dir": str(dst)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stored_ir(trained: dict) -> Path:
    run = mlflow.MlflowClient(trained["tracking_uri"]).get_run(trained["run"]["run_id"])
    return Path(urlparse(run.info.artifact_uri).path) / "openvino"


def test_conversion_passes_parity_and_logs_to_the_run(trained):
    converted, run_id = trained["converted"], trained["run"]["run_id"]
    assert converted["passed"] is True
    assert converted["ir_uri"] == f"runs:/{run_id}/openvino"
    parity = converted["parity"]
    assert parity["max_abs_diff"] <= 1e-4 and parity["label_agreement"] == 1.0 and parity["rows"] == 300
    run = mlflow.MlflowClient(trained["tracking_uri"]).get_run(run_id)
    assert run.data.metrics["openvino.parity_passed"] == 1.0
    assert run.data.metrics["openvino.max_abs_diff"] == pytest.approx(parity["max_abs_diff"])


def test_every_variant_is_scored_and_benchmarked_next_to_native_and_onnx_runtime(trained):
    converted = trained["converted"]
    assert set(converted["variants"]) == {"fp32", "fp16", "int8"}
    assert set(converted["benchmark"]) == {"native", "onnxruntime", "fp32", "fp16", "int8"}
    for numbers in converted["benchmark"].values():
        assert 0 < numbers["p50_ms"] <= numbers["p99_ms"] and numbers["rows_per_s"] > 0
    sizes = {name: scores["size_bytes"] for name, scores in converted["variants"].items()}
    assert sizes["fp16"] < sizes["fp32"] and sizes["int8"] < sizes["fp32"]
    fp32 = converted["variants"]["fp32"]
    assert fp32["accuracy"] == pytest.approx(converted["native_accuracy"], abs=1 / 300)
    for scores in converted["variants"].values():
        drop = (converted["native_accuracy"] - scores["accuracy"]) * 100
        assert scores["accuracy_drop"] == pytest.approx(drop)
        assert scores["within_budget"] is (drop <= 1.0 + 1e-9)


def test_the_selected_variant_is_the_fastest_within_budget_and_is_what_gets_served(trained, tmp_path):
    converted, run_id = trained["converted"], trained["run"]["run_id"]
    kept = [name for name, scores in converted["variants"].items() if scores["within_budget"]]
    fastest = max(kept, key=lambda name: converted["benchmark"][name]["rows_per_s"])
    assert converted["variant"] == fastest and converted["reason"].startswith(f"{fastest}: best throughput")
    ratios = converted["ratios"]
    assert ratios["throughput_vs_onnxruntime"] == pytest.approx(
        converted["benchmark"][fastest]["rows_per_s"] / converted["benchmark"]["onnxruntime"]["rows_per_s"]
    )
    # The reference MLP is tiny: whether OpenVINO wins is reported either way, with the numbers.
    loses = min(ratios.values()) < 1
    assert ("does not win everywhere" in converted["reason"]) is loses
    model_dir = Path(fetch_ir(_fetch_request(trained, tmp_path))["model_dir"])
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["precision"] == fastest
    client = mlflow.MlflowClient(trained["tracking_uri"])
    run = client.get_run(run_id)
    assert run.data.tags["airloop.openvino.variant"] == fastest
    assert run.data.metrics["benchmark.onnxruntime.rows_per_s"] > 0
    report_path = client.download_artifacts(run_id, "openvino_report.json", str(tmp_path / "report"))
    report = json.loads(Path(report_path).read_text())
    assert report["variant"] == fastest and report["benchmark"] == converted["benchmark"]
    assert report["batch_rows"] == 1024


def test_fetched_ir_matches_its_manifest(trained, tmp_path):
    fetched = fetch_ir(_fetch_request(trained, tmp_path))
    model_dir = Path(fetched["model_dir"])
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert set(manifest) == {"format", "files", "feature_names", "classes", "precision"}
    assert manifest["format"] == "openvino-ir" and manifest["precision"] in {"fp32", "fp16", "int8"}
    assert manifest["feature_names"] == FEATURES and manifest["classes"] == [0, 1]
    assert manifest["files"] == fetched["files"] == trained["converted"]["files"]
    assert all(_sha256(model_dir / name) == digest for name, digest in manifest["files"].items())


def test_fetch_ir_detects_a_corrupted_file(trained, tmp_path):
    stored = _stored_ir(trained) / "model.bin"
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[:-4] + b"\x00\x00\x80\x7f")
        with pytest.raises(ValueError, match="model.bin does not match its manifest"):
            fetch_ir(_fetch_request(trained, tmp_path))
    finally:
        stored.write_bytes(original)


def test_a_parity_failure_is_reported_and_leaves_the_stored_ir_alone(trained):
    before = {path.name: _sha256(path) for path in _stored_ir(trained).iterdir()}
    strict = convert(_request(trained, min_label_agreement=1.01, variants=["fp16"]))
    assert strict["passed"] is False and strict["variant"] is None and strict["ir_uri"] is None
    assert strict["reason"].startswith("fp32 IR failed the parity gate") and "1.01" in strict["reason"]
    assert {path.name: _sha256(path) for path in _stored_ir(trained).iterdir()} == before


def test_a_budget_no_variant_meets_fails_with_each_drop(trained, tmp_path):
    # Calibrating on rows 1000x wider than the data leaves int8 too coarse to separate the classes.
    wide = generate(300, seed=1)[FEATURES] * 1000
    calibration = write_table(wide, str(tmp_path / "wide.parquet"))
    before = {path.name: _sha256(path) for path in _stored_ir(trained).iterdir()}
    result = convert(_request(trained, variants=["int8"], calibration_uri=calibration, accuracy_budget=0.5))
    assert result["passed"] is False and result["variant"] is None
    assert result["reason"].startswith(
        "no OpenVINO variant meets the 0.5-point accuracy budget: int8 (accuracy drop"
    )
    assert result["variants"]["int8"]["accuracy_drop"] > 0.5
    assert {path.name: _sha256(path) for path in _stored_ir(trained).iterdir()} == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"variants": ["int4"]}, r"unknown OpenVINO variants \['int4'\]"),
        ({"objective": "size"}, "objective 'size' is not one of"),
        ({"accuracy_budget": -1}, "accuracy_budget must be >= 0"),
        ({"label": "target"}, "holdout has no label column 'target'"),
    ],
)
def test_bad_requests_name_the_problem(trained, extra, message):
    with pytest.raises(ValueError, match=message):
        convert(_request(trained, **extra))


def test_a_model_without_the_sklearn_flavour_is_refused(trained, tmp_path):
    flavours = {"flavors": {"python_function": {"loader_module": "x"}}}
    (tmp_path / "MLmodel").write_text(yaml.safe_dump(flavours))
    with pytest.raises(ValueError, match="not a scikit-learn model saved in the skops format"):
        convert(_request(trained, model_uri=tmp_path.as_uri()))


def test_unsupported_family_names_itself_and_the_supported_ones(tmp_path):
    frame = generate(100)
    tree = DecisionTreeClassifier(max_depth=2).fit(frame[FEATURES], frame["label"])
    with pytest.raises(ValueError, match=r"DecisionTreeClassifier.*MLPClassifier"):
        export_onnx(tree, str(tmp_path / "tree.onnx"))
