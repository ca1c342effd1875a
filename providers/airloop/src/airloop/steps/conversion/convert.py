"""Convert a trained model to OpenVINO IR, optimise it within an accuracy budget, prove it agrees
with the original and benchmark it; log the selected variant to the run.

The route depends on the model's MLflow flavour and, for scikit-learn, on its family (``ROUTES``):

- ``skl2onnx`` (scikit-learn ``MLPClassifier``, main environment): skl2onnx -> keep only the
  ``probabilities`` branch (the ``label`` branch uses ``ai.onnx.ml`` operators OpenVINO cannot
  read) -> OpenVINO.
- ``hummingbird`` (scikit-learn tree models, ``torch`` runtime): hummingbird-ml rewrites the trees as
  tensor operations in a torch graph -> ``openvino.convert_model`` with the input declared as
  ``[-1, n_features]``. skl2onnx's graph of the same model (``ai.onnx.ml`` operators included) is
  what ONNX Runtime runs in the benchmark. hummingbird-ml downgrades onnx, so it lives in that runtime.
- ``pytorch`` (MLflow ``pytorch`` flavour saved as ``pt2``, ``torch`` runtime): the ``torch.export``
  program -> ``openvino.convert_model``. The pickle format is refused (loading it runs code). ONNX
  Runtime runs torch's TorchScript ONNX export of the program's module in the benchmark, when it exports.
- ``onnx`` (MLflow ``onnx`` flavour): the first 2-D float output's subgraph -> OpenVINO; a graph that
  still needs ``ai.onnx.ml`` operators is refused. ONNX Runtime is then the native framework.

From that one fp32 graph come the fp32, fp16 and int8 variants (``airloop.steps.conversion.optimise``). The fp32
IR is the parity gate: compiled with f32 inference precision (this CPU defaults to bf16), its outputs
must match the native model's on the holdout split. The selected variant is logged as ``openvino/``
with ``manifest.json`` (SHA-256 of each IR file, precision); the model server, batch scoring and
``fetch_ir`` check it. Nothing is logged as ``openvino/`` when a gate fails, and the model registry is
never touched here (registration comes after this step).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

from airloop.openvino_ir import IR_FILES, write_manifest
from airloop.steps.conversion import optimise
from airloop.steps.conversion.routes import ROUTE_RUNTIMES, class_index, identify, load_source, route_for
from airloop.tracking.artifacts import HOLDOUT_PATH, REFERENCE_PATH, read_data
from airloop.tracking.models import MODEL_NAME
from airloop.tracking.session import mlflow_step

if TYPE_CHECKING:
    pass

IR_PATH = "openvino"
REPORT_PATH = "openvino_report.json"
BATCH_ROWS = 1024
# The optimisation report's keys that also go in the result (and so in XCom and the audit record).
RESULT_KEYS = ("parity", "variant", "reason", "native_accuracy", "variants", "benchmark", "ratios", "cpu")


@mlflow_step
def plan(request: dict[str, Any]) -> dict[str, Any]:
    """Which route converts the model and which runtime it needs, without converting it.

    Request ``{"tracking_uri", "run_id", "model_uri"?}`` -> ``{"flavour", "family", "route", "runtime"}``.
    An unsupported flavour or family raises ``UnsupportedModelError`` naming it and the supported ones.
    """
    tracking_uri, model_uri = _model_location(request)
    with tempfile.TemporaryDirectory() as tmp:
        flavour, family = identify(tracking_uri, model_uri, tmp)
    route = route_for(flavour, family)
    return {"flavour": flavour, "family": family, "route": route, "runtime": ROUTE_RUNTIMES[route]}


@mlflow_step
def convert(request: dict[str, Any]) -> dict[str, Any]:
    """Request ``{"tracking_uri", "run_id", "model_uri"?, "holdout_uri"?, "calibration_uri"?, "label",
    "tolerance", "min_label_agreement", "variants", "accuracy_budget", "objective", "calibration_rows",
    "benchmark_calls", "classes"?}`` -> ``{"ir_uri", "files", "parity", "passed", "variant", "reason",
    "route", ...}``; see docs/openvino.md."""
    import mlflow
    from mlflow.entities import Metric

    tracking_uri, model_uri = _model_location(request)
    run_id = request["run_id"]
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

    holdout = read_data(tracking_uri, request.get("holdout_uri") or f"runs:/{run_id}/{HOLDOUT_PATH}")
    if label not in holdout.columns:
        raise ValueError(f"holdout has no label column {label!r} (columns {list(holdout.columns)})")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        source = load_source(
            tracking_uri, model_uri, tmp, holdout.drop(columns=[label]), request.get("classes")
        )
        features = holdout[source.feature_names]
        calibration = None
        if "int8" in variants:
            uri = request.get("calibration_uri") or f"runs:/{run_id}/{REFERENCE_PATH}"
            rows = int(request.get("calibration_rows", 300))
            calibration = read_data(tracking_uri, uri)[source.feature_names].to_numpy(dtype="float32")[:rows]
        report = optimise.optimise(
            source.native,
            source.graph,
            features,
            class_index(source.classes, holdout[label]),
            tmp,
            native_input=source.native_input,
            onnx_path=source.onnx_path,
            variants=variants,
            calibration=calibration,
            budget=budget,
            objective=objective,
            calls=int(request.get("benchmark_calls", 200)),
            batch_rows=BATCH_ROWS,
        )
        fp32 = report["variants"]["fp32"]
        parity = {
            "max_abs_diff": fp32["max_abs_diff"],
            "label_agreement": fp32["label_agreement"],
            "rows": int(len(holdout)),
            "tolerance": tolerance,
        }
        diff = parity["max_abs_diff"]
        parity_passed = diff is not None and diff <= tolerance and parity["label_agreement"] >= min_agreement
        if not parity_passed:
            shown = (
                f"{diff:.3g}"
                if diff is not None
                else f"undefined ({fp32['non_finite_rows']} rows NaN or inf)"
            )
            report.update(
                variant=None,
                ratios={},
                reason=(
                    f"fp32 IR failed the parity gate: max abs diff {shown} (tolerance {tolerance}), label "
                    f"agreement {parity['label_agreement']:.4f} (minimum {min_agreement})"
                ),
            )
        selected = report["variant"]
        passed = selected is not None

        files: dict[str, str] = {}
        if passed:
            ir_dir = os.path.join(tmp, IR_PATH)
            os.makedirs(ir_dir)
            for name in IR_FILES:
                shutil.copy(os.path.join(tmp, selected, name), ir_dir)
            files = write_manifest(ir_dir, selected, source.feature_names, source.classes)["files"]
            client.log_artifacts(run_id, ir_dir, IR_PATH)

    report = {
        **report,
        "objective": objective,
        "accuracy_budget": budget,
        "parity": parity,
        "batch_rows": BATCH_ROWS,
        "flavour": source.flavour,
        "family": source.family,
        "route": source.route,
        "native": source.native_name,
        "notes": source.notes,
    }
    client.log_dict(run_id, report, REPORT_PATH)
    metrics = {
        "openvino.max_abs_diff": parity["max_abs_diff"],
        "openvino.label_agreement": parity["label_agreement"],
        "openvino.parity_passed": float(parity_passed),
        "openvino.passed": float(passed),
    }
    for variant, score in report["variants"].items():
        if "accuracy" in score:
            metrics.update(
                {
                    f"openvino.{variant}.accuracy": score["accuracy"],
                    f"openvino.{variant}.accuracy_drop": score["accuracy_drop"],
                }
            )
    for name, numbers in report["benchmark"].items():
        metrics.update({f"benchmark.{name}.{key}": value for key, value in numbers.items()})
    # A NaN output leaves max_abs_diff undefined (None): not logged.
    client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items() if v is not None])
    if passed:
        client.set_tag(run_id, "airloop.openvino.variant", selected)
    return {
        "ir_uri": f"runs:/{run_id}/{IR_PATH}" if passed else None,
        "files": files,
        "passed": passed,
        "report_uri": f"runs:/{run_id}/{REPORT_PATH}",
        "family": source.family,
        "route": source.route,
        "notes": source.notes,
        **{k: report[k] for k in RESULT_KEYS},
    }


def _model_location(request: dict[str, Any]) -> tuple[str, str]:
    tracking_uri, run_id = request.get("tracking_uri"), request.get("run_id")
    if not tracking_uri or not run_id:
        raise ValueError("request needs 'tracking_uri' and 'run_id'")
    return tracking_uri, request.get("model_uri") or f"runs:/{run_id}/{MODEL_NAME}"
