"""Conversion of a trained model to OpenVINO IR, gated by parity and an accuracy budget, benchmarked;
batch scoring of a data set with a model version's IR."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from airloop import runtimes
from airloop.links.mlflow import MlflowModelVersionLink, MlflowRunLink
from airloop.operators.mlflow import _MlflowOperator
from airloop.steps.conversion.requests import (
    ConversionPlan,
    ConversionResult,
    ConvertRequest,
    ScoreRequest,
    ScoreResult,
)


class OpenvinoConvertModelOperator(_MlflowOperator):
    """
    Convert the run's model to OpenVINO IR (fp32, fp16, int8, int8-weights variants), check parity on
    held-out rows (max abs difference of probabilities, label agreement) of the fp32 IR and of each
    variant, keep the variants that pass their own gate within the accuracy budget, benchmark them
    against the native model and ONNX Runtime, and store the fastest as the run's ``openvino/``
    artefacts with a SHA-256 manifest. The report goes to the run as ``openvino_report.json``, metrics
    and tags (the served variant's parity and accuracy); the result names the variant and why.

    :param run_id: the MLflow run holding the model.
    :param holdout_uri: held-out rows (features and label) for the parity and accuracy checks.
    :param tolerance: largest allowed absolute difference of the fp32 IR's probabilities.
    :param variant_tolerance: the same for a lossy variant (fp16, int8, int8-weights) to be selectable.
    :param min_label_agreement: smallest allowed share of identical predicted labels (every variant).
    :param variants: candidate variants, a subset of ``["fp32", "fp16", "int8", "int8-weights"]``
        (default: all).
    :param accuracy_budget: largest allowed holdout accuracy drop vs the native model, in points.
    :param objective: ``"throughput"`` (rows/s at batch 1024) or ``"latency"`` (p50 at batch 1).
    :param calibration_uri: rows for int8 calibration (default: the run's training sample).
    :param classes: class labels of a PyTorch or ONNX model's output columns (default ``0..k-1``).
    :param runtime: where the conversion runs; ``None`` (default) picks the route's runtime: ``"torch"``
        for scikit-learn tree models (hummingbird-ml) and PyTorch modules, the worker otherwise.

    Defaults: ``ConvertRequest``.
    """

    template_fields: Sequence[str] = (
        "run_id",
        "model_uri",
        "holdout_uri",
        "tolerance",
        "variant_tolerance",
        "min_label_agreement",
        "variants",
        "accuracy_budget",
        "objective",
        "calibration_uri",
    )
    operator_extra_links = (MlflowRunLink(),)

    def __init__(
        self,
        *,
        run_id: str,
        holdout_uri: str,
        model_uri: str | None = None,
        label_column: str = ConvertRequest.label_column,
        tolerance: float = ConvertRequest.tolerance,
        variant_tolerance: float = ConvertRequest.variant_tolerance,
        min_label_agreement: float = ConvertRequest.min_label_agreement,
        variants: Sequence[str] | None = None,
        accuracy_budget: float = ConvertRequest.accuracy_budget,
        objective: str = ConvertRequest.objective,
        calibration_uri: str | None = None,
        classes: Sequence[Any] | None = None,
        runtime: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(runtime=runtime, **kwargs)
        self.run_id = run_id
        self.model_uri = model_uri
        self.holdout_uri = holdout_uri
        self.label_column = label_column
        self.tolerance = tolerance
        self.variant_tolerance = variant_tolerance
        self.min_label_agreement = min_label_agreement
        self.variants = variants
        self.accuracy_budget = accuracy_budget
        self.objective = objective
        self.calibration_uri = calibration_uri
        self.classes = classes

    def execute(self, context: Context) -> ConversionResult:
        self.persist_run_link(context, self.run_id)
        request = ConvertRequest(
            **self.hook.step_config(),
            run_id=self.run_id,
            model_uri=self.model_uri,
            holdout_uri=self.holdout_uri,
            label_column=self.label_column,
            tolerance=self.tolerance,
            variant_tolerance=self.variant_tolerance,
            min_label_agreement=self.min_label_agreement,
            variants=list(self.variants) if self.variants else None,
            accuracy_budget=self.accuracy_budget,
            objective=self.objective,
            calibration_uri=self.calibration_uri,
            classes=list(self.classes) if self.classes else None,
        )
        runtime = self.runtime
        if runtime is None:
            route: ConversionPlan = self.run_step(
                "airloop.steps.conversion.convert:plan", request, context, runtime=runtimes.WORKER
            )
            runtime = route["runtime"]
            self.log.info(
                "%s (%s flavour): %s route, in the %r runtime",
                route["family"],
                route["flavour"],
                route["route"],
                runtime,
            )
        result: ConversionResult = self.run_step(
            "airloop.steps.conversion.convert:convert", request, context, runtime=runtime
        )
        self.audit(self.run_id, {"conversion": result})
        for parity in (result["conversion_check"], result["parity"]):
            if parity is not None:
                self.log.info(
                    "OpenVINO %s parity: max abs diff %s (tolerance %g), label agreement %.4f, accuracy %.4f",
                    parity["variant"],
                    parity["max_abs_diff"],
                    parity["tolerance"],
                    parity["label_agreement"],
                    parity["accuracy"],
                )
        if not result["passed"]:
            raise AirflowFailException(f"OpenVINO conversion of run {self.run_id} failed: {result['reason']}")
        self.log.info("OpenVINO IR %s, variant %s: %s", result["ir_uri"], result["variant"], result["reason"])
        return result


class OpenvinoScoreDatasetOperator(_MlflowOperator):
    """
    Score a data set with a registered model version's OpenVINO IR (the variant its conversion
    selected, checksums verified first), in chunks, into parquet parts with the model name and version
    on every row. Resumable: a retry or re-run skips the parts already written whole and scores the
    rest; the run ends with a row count check (rows in == rows out). See ``airloop.steps.conversion.score``.

    :param model_name: the registered model.
    :param model_version: its version (a number, or a template such as ``{{ ti.xcom_pull(...) }}``).
    :param data_uri: a parquet or CSV file: a local path or any URI Airflow's ObjectStoragePath opens
        (``s3://bucket/key.parquet``). A Feast training set: its retrieval written to parquet.
    :param output_uri: the folder for the prediction parts and ``_manifest.json``.
    :param conn_id: the connection to read and write with (an ``aws`` connection for S3); optional.
    :param chunk_rows: rows scored at a time.
    :param passthrough_columns: data set columns copied to the predictions (entity keys, timestamps).
    """

    template_fields: Sequence[str] = (
        "model_name",
        "model_version",
        "data_uri",
        "output_uri",
        "conn_id",
        "chunk_rows",
        "passthrough_columns",
    )
    operator_extra_links = (MlflowModelVersionLink(),)

    def __init__(
        self,
        *,
        model_name: str,
        model_version: str | int,
        data_uri: str,
        output_uri: str,
        conn_id: str | None = None,
        chunk_rows: int = ScoreRequest.chunk_rows,
        passthrough_columns: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.model_version = model_version
        self.data_uri = data_uri
        self.output_uri = output_uri
        self.conn_id = conn_id
        self.chunk_rows = chunk_rows
        self.passthrough_columns = passthrough_columns

    def _storage_options(self) -> dict[str, Any]:
        """The ``aws`` connection's s3fs options (plain values, JSON like every step request): handed
        to the step, never to os.environ."""
        if not self.conn_id:
            return {}
        from airflow.sdk import BaseHook

        from airloop.hooks.aws import fsspec_options, s3_settings

        conn_type = BaseHook.get_connection(self.conn_id).conn_type
        if conn_type != "aws":
            raise ValueError(
                f"conn_id {self.conn_id!r} is a {conn_type!r} connection: batch scoring reads and writes "
                "S3 through an 'aws' connection (other stores: the worker's own credentials, no conn_id)"
            )
        return fsspec_options(s3_settings(self.conn_id, f"conn_id {self.conn_id!r}"))

    def execute(self, context: Context) -> ScoreResult:
        MlflowModelVersionLink.persist(
            context, ui_url=self.hook.ui_url, model_name=self.model_name, version=str(self.model_version)
        )
        request = ScoreRequest(
            **self.hook.step_config(),
            model_name=self.model_name,
            model_version=str(self.model_version),
            data_uri=self.data_uri,
            output_uri=self.output_uri,
            # Template fields: a rendered template is a string.
            chunk_rows=int(self.chunk_rows),
            passthrough_columns=list(self.passthrough_columns or []),
            storage_options=self._storage_options(),
        )
        result: ScoreResult = self.run_step("airloop.steps.conversion.score:score", request, context)
        self.log.info(
            "%s v%s (%s): %d rows scored into %s (%d chunks scored, %d already written)",
            self.model_name,
            self.model_version,
            result["variant"],
            result["rows_out"],
            result["output_uri"],
            result["chunks_scored"],
            result["chunks_skipped"],
        )
        return result
