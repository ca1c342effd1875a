"""The conversion steps' requests and results: plan, convert, score.

Each field carries the name of the operator argument that sets it (``airloop.operators.openvino``) and
its one default. Standard library only: operator modules import this at the top.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypedDict

from airloop.tracking.requests import MlflowRequest


@dataclass(frozen=True, kw_only=True)
class PlanRequest(MlflowRequest):
    """What ``plan`` reads of a conversion's request: which model (the route and runtime follow)."""

    run_id: str
    # Default: the run's logged model, ``runs:/<run_id>/model``.
    model_uri: str | None = None


@dataclass(frozen=True, kw_only=True)
class ConvertRequest(PlanRequest):
    """``convert``: the model as OpenVINO IR variants, gated by parity and the accuracy budget."""

    # Rows with features and label for the parity and accuracy checks; default: the run's holdout split.
    holdout_uri: str | None = None
    label_column: str = "label"
    # The parity gates against the native model on the holdout rows: largest allowed absolute
    # difference of probabilities, of the fp32 IR (the conversion itself) and of a lossy variant (fp16,
    # int8, int8-weights) that would serve; smallest share of equal labels, of every variant.
    tolerance: float = 1e-4
    variant_tolerance: float = 0.1
    min_label_agreement: float = 0.999
    # A subset of ``airloop.steps.conversion.optimise.VARIANTS``; ``None``: all of them.
    variants: list[str] | None = None
    # Largest allowed holdout accuracy drop against the native model, in points.
    accuracy_budget: float = 1.0
    # "throughput" (rows/s at batch 1024) or "latency" (p50 at batch 1).
    objective: str = "throughput"
    # Rows for int8 calibration; default: the run's drift reference sample.
    calibration_uri: str | None = None
    calibration_rows: int = 300
    benchmark_calls: int = 200
    # Class labels of a PyTorch or ONNX model's output columns; default ``0..k-1``.
    classes: list[Any] | None = None


@dataclass(frozen=True, kw_only=True)
class ScoreRequest(MlflowRequest):
    """``score``: a data set scored in chunks by a model version's IR, resumably."""

    model_name: str
    model_version: str
    data_uri: str
    output_uri: str
    # Default: the IR the conversion stored with the version's run.
    ir_uri: str | None = None
    chunk_rows: int = 100_000
    passthrough_columns: list[str] = field(default_factory=list)
    # fsspec options for ``data_uri`` and ``output_uri`` (an ``aws`` connection's, plain values).
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)


class ConversionPlan(TypedDict):
    flavour: str
    family: str
    route: str
    runtime: str


class Parity(TypedDict):
    """A variant's parity gate against the native model on the holdout rows."""

    variant: str
    max_abs_diff: float | None  # None when an output is NaN or infinite
    label_agreement: float
    accuracy: float
    rows: int
    tolerance: float
    min_label_agreement: float
    passed: bool


class ConversionResult(TypedDict):
    """What ``convert`` returns (and the audit record keeps): the IR, the selected variant and its
    parity gate (``parity``, ``None`` when no variant serves), the fp32 IR's (``conversion_check``)."""

    ir_uri: str | None
    files: dict[str, str]
    passed: bool
    report_uri: str
    family: str
    route: str
    notes: list[str]
    parity: Parity | None
    conversion_check: Parity
    variant: str | None
    reason: str
    native_accuracy: float
    variants: dict[str, dict[str, Any]]
    benchmark: dict[str, dict[str, float]]
    ratios: dict[str, float]
    cpu: dict[str, Any]


class ScoreResult(TypedDict):
    output_uri: str
    manifest_uri: str
    model_name: str
    model_version: str
    ir_uri: str
    variant: str
    rows_in: int
    rows_out: int
    parts: int
    chunks_scored: int
    chunks_skipped: int
