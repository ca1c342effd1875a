from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest
from sklearn.tree import DecisionTreeClassifier

from airloop.steps.convert import convert, export_ir, fetch_ir
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
    converted = convert({"tracking_uri": tracking_uri, "run_id": result["run_id"]})
    return {"tracking_uri": tracking_uri, "run": result, "converted": converted}


def _fetch_request(trained: dict, dst: Path) -> dict:
    ir_uri = trained["converted"]["ir_uri"]
    return {"tracking_uri": trained["tracking_uri"], "ir_uri": ir_uri, "dst_dir": str(dst)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_conversion_passes_parity_and_logs_to_the_run(trained):
    converted, run_id = trained["converted"], trained["run"]["run_id"]
    assert converted["passed"] is True
    assert converted["ir_uri"] == f"runs:/{run_id}/openvino"
    parity = converted["parity"]
    assert parity["max_abs_diff"] <= 1e-4 and parity["label_agreement"] == 1.0 and parity["rows"] == 300
    run = mlflow.MlflowClient(trained["tracking_uri"]).get_run(run_id)
    assert run.data.metrics["openvino.parity_passed"] == 1.0
    assert run.data.metrics["openvino.max_abs_diff"] == pytest.approx(parity["max_abs_diff"])


def test_fetched_ir_matches_its_manifest(trained, tmp_path):
    fetched = fetch_ir(_fetch_request(trained, tmp_path))
    model_dir = Path(fetched["model_dir"])
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert set(manifest) == {"format", "files", "feature_names", "classes", "precision"}
    assert manifest["format"] == "openvino-ir" and manifest["precision"] == "fp32"
    assert manifest["feature_names"] == FEATURES and manifest["classes"] == [0, 1]
    assert manifest["files"] == fetched["files"] == trained["converted"]["files"]
    assert all(_sha256(model_dir / name) == digest for name, digest in manifest["files"].items())


def test_fetch_ir_detects_a_corrupted_file(trained, tmp_path):
    run = mlflow.MlflowClient(trained["tracking_uri"]).get_run(trained["run"]["run_id"])
    stored = Path(urlparse(run.info.artifact_uri).path) / "openvino" / "model.bin"
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[:-4] + b"\x00\x00\x80\x7f")
        with pytest.raises(ValueError, match="model.bin does not match its manifest"):
            fetch_ir(_fetch_request(trained, tmp_path))
    finally:
        stored.write_bytes(original)


def test_parity_gate_can_fail(trained):
    request = {"tracking_uri": trained["tracking_uri"], "run_id": trained["run"]["run_id"], "tolerance": 0.0}
    strict = convert(request)
    assert strict["passed"] is (strict["parity"]["max_abs_diff"] == 0.0)
    assert strict["parity"]["tolerance"] == 0.0


def test_unsupported_family_names_itself_and_the_supported_ones(tmp_path):
    frame = generate(100)
    tree = DecisionTreeClassifier(max_depth=2).fit(frame[FEATURES], frame["label"])
    with pytest.raises(ValueError, match=r"DecisionTreeClassifier.*MLPClassifier"):
        export_ir(tree, str(tmp_path))
