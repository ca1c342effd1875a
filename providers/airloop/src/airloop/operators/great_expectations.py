"""The data gate: validate a data set against a Great Expectations suite before anything learns from it."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from airloop import artefacts, runtimes
from airloop.links.reports import DataDocsLink
from airloop.operators.base import StepOperator
from airloop.steps.data.requests import ValidateRequest
from airloop.validation import ValidationResult, ValidationSummary


class GreatExpectationsValidateDataOperator(StepOperator):
    """
    Validate a data set against a Great Expectations suite; fail the task when any expectation fails,
    naming each one with its observed value. Data Docs are built for every run (the task's "Data Docs"
    link) and the task returns a compact summary (pass it to ``MlflowTrainModelOperator(validation=...)``).

    The data: ``data_uri`` (parquet or CSV, a local path or any URI Airflow's ObjectStoragePath opens,
    such as ``s3://``), read with the worker's own credentials or through the Airflow connection
    ``conn_id`` (e.g. an ``aws`` connection); or the result of ``sql`` on the database connection
    ``conn_id``. Either is staged in a local file first (``airloop.staging``), so the step reads a file
    in whichever runtime it runs; in a pod, the pod reads ``data_uri`` itself.

    :param suite_path: the suite: a JSON or YAML file (kept next to the DAGs) or ``package.module:function``
        returning a suite dict or a GX ``ExpectationSuite``. Resolved in the worker, so the step gets the
        suite itself whichever runtime it runs in.
    :param data_uri: the data set to validate.
    :param sql: a query whose result is validated (needs ``conn_id``, a database connection).
    :param conn_id: the connection to read ``data_uri`` through, or to run ``sql`` on.
    :param expected_fingerprint: the fingerprint its producer gave the data (``{"sha256", "rows"?}`` or the
        sha256), e.g. the Feast training set's; a different content fails the gate.
    :param batch_rows: validate a parquet file this many rows at a time (0: all at once; default: in batches
        of 1M rows above 2M rows).
    :param label_column: the target column, counted per class in the result.
    :param fail_on_error: set to False to let the task succeed on failed expectations (the result still
        says ``success: false``); the default fails the task.
    """

    template_fields: Sequence[str] = (
        "suite_path",
        "data_uri",
        "sql",
        "conn_id",
        "expected_fingerprint",
        "batch_rows",
        "label_column",
        "fail_on_error",
    )
    template_fields_renderers = {"sql": "sql"}
    operator_extra_links = (DataDocsLink(),)

    def __init__(
        self,
        *,
        suite_path: str,
        data_uri: str | None = None,
        sql: str | None = None,
        conn_id: str | None = None,
        expected_fingerprint: dict[str, Any] | str | None = ValidateRequest.expected_fingerprint,
        batch_rows: int | None = ValidateRequest.batch_rows,
        label_column: str = ValidateRequest.label_column,
        fail_on_error: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.suite_path = suite_path
        self.data_uri = data_uri
        self.sql = sql
        self.conn_id = conn_id
        self.expected_fingerprint = expected_fingerprint
        self.batch_rows = batch_rows
        self.label_column = label_column
        self.fail_on_error = fail_on_error

    def execute(self, context: Context) -> ValidationSummary:
        from airloop.staging import stage
        from airloop.steps.data.validate import load_suite

        prefix = artefacts.task_prefix(context, "validation")
        docs = f"{prefix}/data_docs/index.html"
        DataDocsLink.persist(context, path=docs)
        with tempfile.TemporaryDirectory(prefix="airloop-gate-") as scratch:
            data = stage(
                scratch,
                uri=self.data_uri,
                sql=self.sql,
                conn_id=self.conn_id,
                pod=self.runtime == runtimes.POD,
            )
            suite = load_suite(self.suite_path)
            with artefacts.staging(prefix) as folder:
                request = ValidateRequest(
                    data_uri=data.path,
                    data_name=data.name,
                    suite_path=self.suite_path,
                    suite=suite,
                    docs_dir=str(folder / "data_docs"),
                    label_column=self.label_column,
                    expected_fingerprint=self.expected_fingerprint,
                    batch_rows=self.batch_rows,
                )
                result: ValidationResult = self.run_step(
                    "airloop.steps.data.validate:validate", request.to_dict(), context
                )
        summary: ValidationSummary = {
            "success": result["success"],
            "evaluated": result["evaluated"],
            "successful": result["successful"],
            "failed": result["failed"],
            "fingerprint": result["fingerprint"],
            "suite": result["suite"],
            "rows": result["rows"],
            "batches": result["batches"],
            "data_uri": data.name,
            "docs": docs,
            "docs_uri": f"{artefacts.root() / docs}",
        }
        name = data.name
        if result["success"]:
            self.log.info("%s passed %d expectations of suite %s", name, result["evaluated"], result["suite"])
            return summary
        for failure in result["failed"]:
            self.log.error(
                "failed expectation %s on column %s: observed %s (kwargs %s)",
                failure["expectation"],
                failure.get("column"),
                failure.get("observed"),
                failure.get("kwargs"),
            )
        names = ", ".join(f"{f['expectation']}({f.get('column') or 'table'})" for f in result["failed"])
        message = f"{name} failed {len(result['failed'])} of {result['evaluated']} expectations: {names}"
        if self.fail_on_error:
            raise AirflowFailException(message)
        self.log.warning("%s; continuing because fail_on_error=False", message)
        return summary
