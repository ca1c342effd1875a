"""Conversion of a trained model to OpenVINO IR, gated by parity and an accuracy budget, benchmarked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from airloop.links.mlflow import MlflowRunLink
from airloop.operators.mlflow import _MlflowOperator


class OpenvinoConvertModelOperator(_MlflowOperator):
    """
    Convert the run's model to OpenVINO IR (fp32, fp16 and int8 variants), check fp32 parity on
    held-out rows (max abs difference of probabilities, label agreement), keep the variants whose
    accuracy is within the budget, benchmark them against the native model and ONNX Runtime, and
    store the fastest as the run's ``openvino/`` artefacts with a SHA-256 manifest. The report goes
    to the run as ``openvino_report.json`` and metrics; the result names the variant and why.

    :param run_id: the MLflow run holding the model.
    :param holdout_uri: held-out rows (features and label) for the parity and accuracy checks.
    :param tolerance: largest allowed absolute difference of fp32 probabilities.
    :param min_label_agreement: smallest allowed share of identical predicted labels (fp32).
    :param variants: candidate variants, a subset of ``["fp32", "fp16", "int8"]`` (default: all).
    :param accuracy_budget: largest allowed holdout accuracy drop vs the native model, in points.
    :param objective: ``"throughput"`` (rows/s at batch 1024) or ``"latency"`` (p50 at batch 1).
    :param calibration_uri: rows for int8 calibration (default: the run's training sample).
    """

    template_fields: Sequence[str] = (
        "run_id", "model_uri", "holdout_uri", "tolerance", "min_label_agreement", "variants",
        "accuracy_budget", "objective", "calibration_uri",
    )
    operator_extra_links = (MlflowRunLink(),)

    def __init__(self, *, run_id: str, holdout_uri: str, model_uri: str | None = None,
                 label_column: str = "label", tolerance: float = 1e-4, min_label_agreement: float = 0.999,
                 variants: Sequence[str] | None = None, accuracy_budget: float = 1.0,
                 objective: str = "throughput", calibration_uri: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run_id = run_id
        self.model_uri = model_uri
        self.holdout_uri = holdout_uri
        self.label_column = label_column
        self.tolerance = tolerance
        self.min_label_agreement = min_label_agreement
        self.variants = variants
        self.accuracy_budget = accuracy_budget
        self.objective = objective
        self.calibration_uri = calibration_uri

    def execute(self, context: Context) -> dict[str, Any]:
        self.persist_run_link(context, self.run_id)
        result = self.run_step(
            "airloop.steps.convert:convert",
            {**self.hook.step_config(), "run_id": self.run_id,
             "model_uri": self.model_uri or f"runs:/{self.run_id}/model",
             "holdout_uri": self.holdout_uri, "label": self.label_column, "tolerance": self.tolerance,
             "min_label_agreement": self.min_label_agreement,
             "variants": list(self.variants) if self.variants else None,
             "accuracy_budget": self.accuracy_budget, "objective": self.objective,
             "calibration_uri": self.calibration_uri},
            context,
        )
        self.audit(self.run_id, "conversion", result)
        parity = result["parity"]
        self.log.info("OpenVINO fp32 parity: max abs diff %.3g, label agreement %.4f", parity["max_abs_diff"],
                      parity["label_agreement"])
        if not result["passed"]:
            raise AirflowFailException(f"OpenVINO conversion of run {self.run_id} failed: {result['reason']}")
        self.log.info("OpenVINO IR %s, variant %s: %s", result["ir_uri"], result["variant"], result["reason"])
        return result
