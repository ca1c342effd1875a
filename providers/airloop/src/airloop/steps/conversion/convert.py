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

From that one fp32 graph come the fp32, fp16 and int8 variants (``airloop.steps.conversion.optimise``).
The model is resolved and downloaded once (``routes.load_source``); ``plan`` reads its MLmodel file only.
Two parity gates, both on the holdout rows, with IRs compiled with f32 inference precision (this CPU
defaults to bf16): the fp32 IR must match the native model within ``tolerance`` (the conversion itself
is right), and the variant that serves must pass its own gate (``variant_tolerance`` for the lossy
ones, ``min_label_agreement`` for all): a variant that fails it is not selectable. The result's
``parity``, the run's ``openvino.*`` metrics and ``airloop.openvino.*`` tags are the served variant's.
It is logged as ``openvino/`` with ``manifest.json`` (SHA-256 of each IR file, precision); the model
server, batch scoring and ``fetch_ir`` check it. Nothing is logged as ``openvino/`` when a gate fails,
and the model registry is never touched here (registration comes after this step).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from airloop.encoding import encode
from airloop.openvino_ir import IR_FILES, IR_PATH, TAG_PREFIX, write_manifest
from airloop.steps.conversion import optimise
from airloop.steps.conversion.requests import (
    ConversionPlan,
    ConversionResult,
    ConvertRequest,
    Parity,
    PlanRequest,
)
from airloop.steps.conversion.routes import (
    ROUTE_RUNTIMES,
    Source,
    class_index,
    identify,
    load_source,
    route_for,
)
from airloop.tracking.artifacts import HOLDOUT_PATH, MODEL_NAME, REFERENCE_PATH, read_data
from airloop.tracking.session import mlflow_step

if TYPE_CHECKING:
    import numpy as np

REPORT_PATH = "openvino_report.json"
BATCH_ROWS = 1024


@mlflow_step
def plan(request: PlanRequest | Mapping[str, Any]) -> ConversionPlan:
    """Which route converts the model and which runtime it needs, without converting it: reads the
    model's MLmodel file, not the model. -> ``{"flavour", "family", "route", "runtime"}``.

    The request is the conversion's own (a ``ConvertRequest``, of which plan reads the ``PlanRequest``
    fields). An unsupported flavour or family raises ``UnsupportedModelError`` naming it and the
    supported ones.
    """
    request = request if isinstance(request, PlanRequest) else ConvertRequest.parse(request)
    flavour, family = identify(request.tracking_uri, _model_uri(request))
    route = route_for(flavour, family)
    return {"flavour": flavour, "family": family, "route": route, "runtime": ROUTE_RUNTIMES[route]}


@mlflow_step
def convert(request: ConvertRequest | Mapping[str, Any]) -> ConversionResult:
    """The run's model as OpenVINO IR -> ``{"ir_uri", "files", "parity", "passed", "variant", "reason",
    "route", ...}``; see docs/openvino.md."""
    import mlflow
    from mlflow.entities import Metric, RunTag

    request = ConvertRequest.parse(request)
    tracking_uri, run_id, label = request.tracking_uri, request.run_id, request.label_column
    # Template fields: a rendered template is a string.
    tolerance, variant_tolerance = float(request.tolerance), float(request.variant_tolerance)
    min_agreement = float(request.min_label_agreement)
    budget = float(request.accuracy_budget)
    objective = request.objective
    variants = list(request.variants or optimise.VARIANTS)
    unknown = sorted(set(variants) - set(optimise.VARIANTS))
    if unknown:
        raise ValueError(f"unknown OpenVINO variants {unknown}: choose from {list(optimise.VARIANTS)}")
    if objective not in optimise.OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {list(optimise.OBJECTIVES)}")
    if budget < 0:
        raise ValueError(f"accuracy_budget must be >= 0 points, got {budget}")

    holdout = read_data(tracking_uri, request.holdout_uri or f"runs:/{run_id}/{HOLDOUT_PATH}")
    if label not in holdout.columns:
        raise ValueError(f"holdout has no label column {label!r} (columns {list(holdout.columns)})")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        source = load_source(
            tracking_uri, _model_uri(request), tmp, holdout.drop(columns=[label]), request.classes
        )
        features = holdout[source.feature_names]
        calibration = None
        if "int8" in variants:
            uri = request.calibration_uri or f"runs:/{run_id}/{REFERENCE_PATH}"
            rows = request.calibration_rows
            calibration = read_data(tracking_uri, uri)[source.feature_names].iloc[:rows]
        report = optimise.optimise(
            source.native,
            source.graph,
            features,
            class_index(source.classes, holdout[label]),
            tmp,
            native_input=source.native_input,
            encode=_encoder(source),
            onnx_path=source.onnx_path,
            variants=variants,
            tolerance=optimise.tolerances(tolerance, variant_tolerance),
            min_label_agreement=min_agreement,
            calibration=calibration,
            budget=budget,
            objective=objective,
            calls=request.benchmark_calls,
            batch_rows=BATCH_ROWS,
        )
        check = _parity(report, "fp32", len(holdout), min_agreement)
        if not check["passed"]:
            failures = ", ".join(report["variants"]["fp32"]["parity_failures"])
            report.update(
                variant=None,
                ratios={},
                reason=(
                    f"fp32 IR failed the parity gate: {failures}: the conversion itself does not match "
                    "the model, so no variant is selectable"
                ),
            )
        selected = report["variant"]
        passed = selected is not None
        served = _parity(report, selected, len(holdout), min_agreement) if selected else None

        files: dict[str, str] = {}
        if selected is not None:
            ir_dir = os.path.join(tmp, IR_PATH)
            os.makedirs(ir_dir)
            for name in IR_FILES:
                shutil.copy(os.path.join(tmp, selected, name), ir_dir)
            manifest = write_manifest(ir_dir, selected, source.feature_names, source.classes, source.encoding)
            files = manifest["files"]
            client.log_artifacts(run_id, ir_dir, IR_PATH)

    report = {
        **report,
        "objective": objective,
        "accuracy_budget": budget,
        "parity": served,
        "conversion_check": check,
        "batch_rows": BATCH_ROWS,
        "flavour": source.flavour,
        "family": source.family,
        "route": source.route,
        "native": source.native_name,
        "notes": source.notes,
    }
    client.log_dict(run_id, report, REPORT_PATH)
    metrics: dict[str, float | None] = {
        "openvino.parity_passed": float(passed),
        "openvino.passed": float(passed),
    }
    if served is not None:
        metrics.update(
            {
                "openvino.accuracy": served["accuracy"],
                "openvino.max_abs_diff": served["max_abs_diff"],
                "openvino.label_agreement": served["label_agreement"],
            }
        )
    for variant, score in report["variants"].items():
        if "accuracy" in score:
            metrics.update(
                {
                    f"openvino.{variant}.{key}": score[key]
                    for key in ("accuracy", "accuracy_drop", "max_abs_diff", "label_agreement")
                }
            )
    for name, numbers in report["benchmark"].items():
        metrics.update({f"benchmark.{name}.{key}": value for key, value in numbers.items()})
    tags = []
    if served is not None:
        figures = {key: served[key] for key in ("variant", "accuracy", "max_abs_diff", "label_agreement")}
        tags = [
            RunTag(f"{TAG_PREFIX}{key}", f"{value:.6g}" if isinstance(value, float) else str(value))
            for key, value in figures.items()
        ]
    # A NaN output leaves max_abs_diff undefined (None): not logged.
    client.log_batch(
        run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items() if v is not None], tags=tags
    )
    return {
        "ir_uri": f"runs:/{run_id}/{IR_PATH}" if passed else None,
        "files": files,
        "passed": passed,
        "report_uri": f"runs:/{run_id}/{REPORT_PATH}",
        "family": source.family,
        "route": source.route,
        "notes": source.notes,
        "parity": served,
        "conversion_check": check,
        "variant": selected,
        "reason": report["reason"],
        "native_accuracy": report["native_accuracy"],
        "variants": report["variants"],
        "benchmark": report["benchmark"],
        "ratios": report["ratios"],
        "cpu": report["cpu"],
    }


def _parity(report: dict[str, Any], variant: str, rows: int, min_agreement: float) -> Parity:
    """The parity gate's figures for ``variant`` (built: the fp32 one always is, a selected one too)."""
    scores = report["variants"][variant]
    return {
        "variant": variant,
        "max_abs_diff": scores["max_abs_diff"],
        "label_agreement": scores["label_agreement"],
        "accuracy": scores["accuracy"],
        "rows": rows,
        "tolerance": scores["tolerance"],
        "min_label_agreement": min_agreement,
        "passed": not scores["parity_failures"],
    }


def _encoder(source: Source) -> Callable[[np.ndarray], np.ndarray] | None:
    """The model's input encoding as serving applies it (``airloop.encoding.encode``), if it has one."""
    encoding = source.encoding
    if encoding is None:
        return None
    return lambda raw: encode(encoding, source.feature_names, raw)


def _model_uri(request: PlanRequest) -> str:
    return request.model_uri or f"runs:/{request.run_id}/{MODEL_NAME}"
