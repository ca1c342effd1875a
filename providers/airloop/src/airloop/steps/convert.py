"""Convert a trained model to OpenVINO IR, prove it agrees with the original, and log it to the run.

Route for scikit-learn MLPClassifier: skl2onnx -> keep only the ``probabilities`` branch (the
``label`` branch uses ``ai.onnx.ml`` operators OpenVINO cannot convert) -> ``openvino.convert_model``
-> IR saved in fp32. The parity gate compiles the IR with f32 inference precision (this CPU
defaults to bf16) and compares probabilities with the scikit-learn model on the holdout split.
``manifest.json`` records the SHA-256 of each IR file; the model server and ``fetch_ir`` check it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

from airloop.steps.train import HOLDOUT_PATH, MODEL_NAME, download, load_model, read_data

IR_PATH = "openvino"
IR_FILES = ("model.xml", "model.bin")
MANIFEST = "manifest.json"
SUPPORTED_FAMILIES = ("MLPClassifier",)


def convert(request: dict[str, Any]) -> dict[str, Any]:
    """Request ``{"tracking_uri", "run_id", "model_uri", "holdout_uri", "label", "tolerance",
    "min_label_agreement"}`` -> ``{"ir_uri", "files", "parity", "passed"}``; see docs/steps.md."""
    import mlflow
    from mlflow.entities import Metric

    tracking_uri, run_id = request.get("tracking_uri"), request.get("run_id")
    if not tracking_uri or not run_id:
        raise ValueError("request needs 'tracking_uri' and 'run_id'")
    label = request.get("label", "label")
    tolerance = float(request.get("tolerance", 1e-4))
    min_agreement = float(request.get("min_label_agreement", 0.999))
    estimator = load_model(tracking_uri, request.get("model_uri") or f"runs:/{run_id}/{MODEL_NAME}")
    holdout = read_data(tracking_uri, request.get("holdout_uri") or f"runs:/{run_id}/{HOLDOUT_PATH}")
    features = holdout.drop(columns=[label], errors="ignore")

    with tempfile.TemporaryDirectory() as tmp:
        ir_dir = os.path.join(tmp, IR_PATH)
        manifest = export_ir(estimator, ir_dir)
        features = features[manifest["feature_names"]]
        expected = estimator.predict_proba(features)
        actual = _infer(os.path.join(ir_dir, "model.xml"), features.to_numpy(dtype="float32"))
        parity = {
            "max_abs_diff": float(abs(actual - expected).max()),
            "label_agreement": float((actual.argmax(axis=1) == expected.argmax(axis=1)).mean()),
            "rows": int(len(features)),
            "tolerance": tolerance,
        }
        passed = parity["max_abs_diff"] <= tolerance and parity["label_agreement"] >= min_agreement
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        client.log_artifacts(run_id, ir_dir, IR_PATH)
    client.log_batch(
        run_id,
        metrics=[
            Metric("openvino.max_abs_diff", parity["max_abs_diff"], 0, 0),
            Metric("openvino.label_agreement", parity["label_agreement"], 0, 0),
            Metric("openvino.parity_passed", float(passed), 0, 0),
        ],
    )
    ir_uri = f"runs:/{run_id}/{IR_PATH}"
    return {"ir_uri": ir_uri, "files": manifest["files"], "parity": parity, "passed": passed}


def export_ir(estimator: Any, ir_dir: str) -> dict[str, Any]:
    """Write ``model.xml``, ``model.bin`` and ``manifest.json`` for ``estimator`` into ``ir_dir``."""
    import onnx.utils
    import openvino
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    family = type(estimator).__name__
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"cannot convert a {family} to OpenVINO: supported families are {list(SUPPORTED_FAMILIES)} "
            "(tree ensembles are planned through a torch-graph route)"
        )
    n_features = int(estimator.n_features_in_)
    feature_names = [str(name) for name in getattr(estimator, "feature_names_in_", [])]
    os.makedirs(ir_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        full, probabilities = os.path.join(tmp, "full.onnx"), os.path.join(tmp, "probabilities.onnx")
        graph = convert_sklearn(
            estimator,
            initial_types=[("input", FloatTensorType([None, n_features]))],
            options={id(estimator): {"zipmap": False}},
        )
        onnx.save(graph, full)
        onnx.utils.extract_model(full, probabilities, ["input"], ["probabilities"])
        model = openvino.convert_model(probabilities, input=[("input", [-1, n_features])])
    openvino.save_model(model, os.path.join(ir_dir, "model.xml"), compress_to_fp16=False)
    manifest = {
        "format": "openvino-ir",
        "files": {name: _sha256(os.path.join(ir_dir, name)) for name in IR_FILES},
        "feature_names": feature_names or [f"x{i}" for i in range(n_features)],
        "classes": [value.item() if hasattr(value, "item") else value for value in estimator.classes_],
        "precision": "fp32",
    }
    with open(os.path.join(ir_dir, MANIFEST), "w") as handle:
        json.dump(manifest, handle, indent=2)
    return manifest


def _infer(xml_path: str, rows: Any) -> Any:
    import openvino

    compiled = openvino.Core().compile_model(xml_path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(rows)[compiled.output(0)]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_ir(request: dict[str, Any]) -> dict[str, Any]:
    """Download an IR folder and verify it against its manifest.

    Request ``{"tracking_uri", "ir_uri", "dst_dir"}`` -> ``{"model_dir", "files"}``; a missing or
    altered file raises ValueError naming it.
    """
    for key in ("tracking_uri", "ir_uri", "dst_dir"):
        if not request.get(key):
            raise ValueError(f"request is missing {key!r}")
    os.makedirs(request["dst_dir"], exist_ok=True)
    model_dir = download(request["tracking_uri"], request["ir_uri"], request["dst_dir"])
    return {"model_dir": model_dir, "files": verify_ir(model_dir)}


def verify_ir(model_dir: str) -> dict[str, str]:
    """Check every file of ``model_dir/manifest.json`` against its SHA-256; returns the manifest's files."""
    manifest_path = os.path.join(model_dir, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ValueError(f"{manifest_path} is missing: not an Airloop IR folder")
    with open(manifest_path) as handle:
        files = json.load(handle)["files"]
    for name, expected in files.items():
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            raise ValueError(f"IR file {name} listed in the manifest is missing from {model_dir}")
        if _sha256(path) != expected:
            raise ValueError(f"IR file {name} does not match its manifest checksum (corrupted or altered)")
    return files
