"""The data gate: validate a data set against a Great Expectations suite before anything learns from it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from airloop import artefacts
from airloop.links.reports import DataDocsLink
from airloop.operators.base import StepOperator


class GreatExpectationsValidateDataOperator(StepOperator):
    """
    Validate ``data_uri`` (parquet or CSV) against the suite in ``suite_path``; fail the task when any
    expectation fails, naming each one with its observed value. Data Docs are built for every run.

    :param data_uri: the data set to validate (local path, ``file://`` or fsspec URL).
    :param suite_path: the expectation suite, a JSON or YAML file (kept next to the DAGs).
    :param fail_on_error: set to False to let the task succeed on failed expectations (the result still
        says ``success: false``); the default fails the task.
    """

    template_fields: Sequence[str] = ("data_uri", "suite_path", "fail_on_error")
    operator_extra_links = (DataDocsLink(),)

    def __init__(self, *, data_uri: str, suite_path: str, fail_on_error: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_uri = data_uri
        self.suite_path = suite_path
        self.fail_on_error = fail_on_error

    def execute(self, context: Context) -> dict[str, Any]:
        prefix = artefacts.task_prefix(context, "validation")
        DataDocsLink.persist(context, path=f"{prefix}/data_docs/index.html")
        with artefacts.staging(prefix) as folder:
            result = self.run_step(
                "airloop.steps.validate:validate",
                {"data_uri": self.data_uri, "suite_path": self.suite_path,
                 "docs_dir": str(folder / "data_docs")},
                context,
            )
        summary = {key: result[key] for key in ("success", "evaluated", "successful", "failed", "fingerprint",
                                                "suite")}
        summary["data_uri"] = self.data_uri
        summary["docs"] = f"{prefix}/data_docs/index.html"
        if result["success"]:
            self.log.info("%s passed %d expectations of suite %s", self.data_uri, result["evaluated"],
                          result["suite"])
            return summary
        for failure in result["failed"]:
            self.log.error("failed expectation %s on column %s: observed %s (kwargs %s)",
                           failure["expectation"], failure.get("column"), failure.get("observed"),
                           failure.get("kwargs"))
        names = ", ".join(f"{f['expectation']}({f.get('column') or 'table'})" for f in result["failed"])
        message = f"{self.data_uri} failed {len(result['failed'])} of {result['evaluated']} expectations: {names}"
        if self.fail_on_error:
            raise AirflowFailException(message)
        self.log.warning("%s; continuing because fail_on_error=False", message)
        return summary
