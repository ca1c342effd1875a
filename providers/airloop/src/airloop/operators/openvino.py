"""Conversion of a trained model to OpenVINO IR, gated by numerical parity with the original."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from airloop.links.mlflow import MlflowRunLink
from airloop.operators.mlflow import _MlflowOperator


class OpenvinoConvertModelOperator(_MlflowOperator):
    """
    Convert the run's model to OpenVINO IR, check parity on held-out rows (max abs difference of
    probabilities, label agreement) and store the IR with a SHA-256 manifest as the run's artefacts.

    :param run_id: the MLflow run holding the model.
    :param holdout_uri: held-out rows (features and label) for the parity check.
    :param tolerance: largest allowed absolute difference of probabilities.
    :param min_label_agreement: smallest allowed share of identical predicted labels.
    """

    template_fields: Sequence[str] = ("run_id", "model_uri", "holdout_uri", "tolerance", "min_label_agreement")
    operator_extra_links = (MlflowRunLink(),)

    def __init__(self, *, run_id: str, holdout_uri: str, model_uri: str | None = None, label_column: str = "label",
                 tolerance: float = 1e-4, min_label_agreement: float = 0.999, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run_id = run_id
        self.model_uri = model_uri
        self.holdout_uri = holdout_uri
        self.label_column = label_column
        self.tolerance = tolerance
        self.min_label_agreement = min_label_agreement

    def execute(self, context: Context) -> dict[str, Any]:
        self.persist_run_link(context, self.run_id)
        config = self.hook.step_config()
        result = self.run_step(
            "airloop.steps.convert:convert",
            {**config, "run_id": self.run_id, "model_uri": self.model_uri or f"runs:/{self.run_id}/model",
             "holdout_uri": self.holdout_uri, "label": self.label_column, "tolerance": self.tolerance,
             "min_label_agreement": self.min_label_agreement},
            context,
        )
        from airloop.steps.registry import append_audit

        append_audit({"tracking_uri": config["tracking_uri"], "run_id": self.run_id, "stage": "conversion",
                      "record": result})
        parity = result["parity"]
        self.log.info("OpenVINO IR %s: max abs diff %.3g, label agreement %.4f", result["ir_uri"],
                      parity["max_abs_diff"], parity["label_agreement"])
        if not result["passed"]:
            raise AirflowFailException(
                f"OpenVINO IR of run {self.run_id} failed the parity gate: max abs diff "
                f"{parity['max_abs_diff']:.3g} (tolerance {self.tolerance}), label agreement "
                f"{parity['label_agreement']:.4f} (minimum {self.min_label_agreement})"
            )
        return result
