"""Convert a trained model to OpenVINO IR, optimise it within an accuracy budget, prove it agrees
with the original and benchmark it; log the selected variant to the run.

Route for scikit-learn MLPClassifier: skl2onnx -> keep only the ``probabilities`` branch (the
``label`` branch uses ``ai.onnx.ml`` operators OpenVINO cannot convert) -> ``openvino.convert_model``.
From that one graph come the fp32, fp16 and int8 variants (``airloop.steps.optimise``). The fp32 IR
is the parity gate: compiled with f32 inference precision (this CPU defaults to bf16), its
probabilities must match the scikit-learn model's on the holdout split. The selected variant is
logged as ``openvino/`` with ``manifest.json`` (SHA-256 of each IR file, precision); the model server
and ``fetch_ir`` check it. Nothing is logged as ``openvino/`` when a gate fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from airloop.steps import optimise
from airloop.steps.train import HOLDOUT_PATH, MODEL_NAME, REFERENCE_PATH, download, load_model, read_data

IR_PATH = "openvino"
REPORT_PATH = "openvino_report.json"
IR_FILES = ("model.xml", "model.bin")
MANIFEST = "manifest.json"
SUPPORTED_FAMILIES = ("MLPClassifier",)
BATCH_ROWS = 1024
# The optimisation report's keys that also go in the result (and so in XCom and the audit record).
RESULT_KEYS = ("parity", "variant", "reason", "native_accuracy", "variants", "benchmark", "ratios")


def convert(request: dict[str, Any]) -> dict[str, Any]:
    """Request ``{"tracking_uri", "run_id", "model_uri"?, "holdout_uri"?, "calibration_uri"?, "label",
    "tolerance", "min_label_agreement", "variants", "accuracy_budget", "objective", "calibration_rows",
    "benchmark_calls"}`` -> ``{"ir_uri", "files", "parity", "passed", "variant", "reason", ...}``;
    see docs/openvino.md."""
    import mlflow
    from mlflow.entities import Metric

    tracking_uri, run_id = request.get("tracking_uri"), request.get("run_id")
    if not tracking_uri or not run_id:
        raise ValueError("request needs 'tracking_uri' and 'run_id'")
    label = request.get("label", "label")
    tolerance = float(request.get("tolerance", 1e-4))
    min_agreement = float(request.get("min_label_agreement", 0.999))
    budget = float(request.get("accuracy_budget", 1.0))
    objective = request.get("objective", "throughput")
    variants = list(request.get("variants") or optimise.VARIANTS)
    unknown = sorted(set(variants) - set(optimise.VARIANTS))
    if unknown:
        raise ValueError(f"unknown OpenVINO variants {unknown}: choose from {list(optimise.VARIANTS)}")
    if objective not in optimise.OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {list(optimise.OBJECTIVES)}")
    if budget < 0:
        raise ValueError(f"accuracy_budget must be >= 0 points, got {budget}")

    estimator = load_model(tracking_uri, request.get("model_uri") or f"runs:/{run_id}/{MODEL_NAME}")
    holdout = read_data(tracking_uri, request.get("holdout_uri") or f"runs:/{run_id}/{HOLDOUT_PATH}")
    if label not in holdout.columns:
        raise ValueError(f"holdout has no label column {label!r} (columns {list(holdout.columns)})")
    feature_names = _feature_names(estimator)
    missing = sorted(set(feature_names) - set(holdout.columns))
    if missing:
        raise ValueError(f"holdout lacks the model's features {missing}")
    calibration = None
    if "int8" in variants:
        uri = request.get("calibration_uri") or f"runs:/{run_id}/{REFERENCE_PATH}"
        calibration_rows = int(request.get("calibration_rows", 300))
        calibration = read_data(tracking_uri, uri)[feature_names].to_numpy(dtype="float32")[:calibration_rows]

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = os.path.join(tmp, "model.onnx")
        export_onnx(estimator, onnx_path)
        report = optimise.optimise(
            estimator, onnx_path, holdout[feature_names], _class_index(estimator, holdout[label]), tmp,
            variants=variants, calibration=calibration, budget=budget, objective=objective,
            calls=int(request.get("benchmark_calls", 200)), batch_rows=BATCH_ROWS,
        )
        fp32 = report["variants"]["fp32"]
        parity = {"max_abs_diff": fp32["max_abs_diff"], "label_agreement": fp32["label_agreement"],
                  "rows": int(len(holdout)), "tolerance": tolerance}
        parity_passed = parity["max_abs_diff"] <= tolerance and parity["label_agreement"] >= min_agreement
        if not parity_passed:
            report.update(variant=None, ratios={}, reason=(
                f"fp32 IR failed the parity gate: max abs diff {parity['max_abs_diff']:.3g} (tolerance "
                f"{tolerance}), label agreement {parity['label_agreement']:.4f} (minimum {min_agreement})"))
        selected = report["variant"]
        passed = selected is not None

        files: dict[str, str] = {}
        if passed:
            ir_dir = os.path.join(tmp, IR_PATH)
            os.makedirs(ir_dir)
            for name in IR_FILES:
                shutil.copy(os.path.join(tmp, selected, name), ir_dir)
            files = write_manifest(estimator, ir_dir, selected)["files"]
            client.log_artifacts(run_id, ir_dir, IR_PATH)

    report = {**report, "objective": objective, "accuracy_budget": budget, "parity": parity,
              "batch_rows": BATCH_ROWS}
    client.log_dict(run_id, report, REPORT_PATH)
    metrics = {"openvino.max_abs_diff": parity["max_abs_diff"],
               "openvino.label_agreement": parity["label_agreement"],
               "openvino.parity_passed": float(parity_passed), "openvino.passed": float(passed)}
    for variant, score in report["variants"].items():
        metrics.update({f"openvino.{variant}.accuracy": score["accuracy"],
                        f"openvino.{variant}.accuracy_drop": score["accuracy_drop"]})
    for name, numbers in report["benchmark"].items():
        metrics.update({f"benchmark.{name}.{key}": value for key, value in numbers.items()})
    client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
    if passed:
        client.set_tag(run_id, "airloop.openvino.variant", selected)
    return {"ir_uri": f"runs:/{run_id}/{IR_PATH}" if passed else None, "files": files, "passed": passed,
            "report_uri": f"runs:/{run_id}/{REPORT_PATH}", **{k: report[k] for k in RESULT_KEYS}}


def export_onnx(estimator: Any, onnx_path: str) -> None:
    """Write the probabilities-only ONNX graph of ``estimator`` (input ``input``: ``[N, n_features]``)."""
    import onnx.utils
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    family = type(estimator).__name__
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"cannot convert a {family} to OpenVINO: supported families are {list(SUPPORTED_FAMILIES)} "
            "(tree ensembles need a torch-graph route that cannot share this environment; "
            "see docs/openvino.md)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        full = os.path.join(tmp, "full.onnx")
        graph = convert_sklearn(
            estimator,
            initial_types=[("input", FloatTensorType([None, int(estimator.n_features_in_)]))],
            options={id(estimator): {"zipmap": False}},
        )
        onnx.save(graph, full)
        onnx.utils.extract_model(full, onnx_path, ["input"], ["probabilities"])


def write_manifest(estimator: Any, ir_dir: str, precision: str) -> dict[str, Any]:
    """Write ``manifest.json`` for the IR files in ``ir_dir``; returns the manifest."""
    manifest = {
        "format": "openvino-ir",
        "files": {name: _sha256(os.path.join(ir_dir, name)) for name in IR_FILES},
        "feature_names": _feature_names(estimator),
        "classes": [value.item() if hasattr(value, "item") else value for value in estimator.classes_],
        "precision": precision,
    }
    with open(os.path.join(ir_dir, MANIFEST), "w") as handle:
        json.dump(manifest, handle, indent=2)
    return manifest


def _feature_names(estimator: Any) -> list[str]:
    names = [str(name) for name in getattr(estimator, "feature_names_in_", [])]
    return names or [f"x{i}" for i in range(int(estimator.n_features_in_))]


def _class_index(estimator: Any, labels: Any) -> np.ndarray:
    """Each label's column in ``predict_proba``; a label the model never saw raises ValueError."""
    classes = list(estimator.classes_)
    unknown = sorted(set(labels) - set(classes), key=str)
    if unknown:
        raise ValueError(f"holdout labels {unknown[:5]} are not among the model's classes {classes}")
    lookup = {value: i for i, value in enumerate(classes)}
    return np.array([lookup[value] for value in labels])


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
