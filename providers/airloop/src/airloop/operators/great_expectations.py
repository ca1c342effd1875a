"""The data gate: validate a data set against a Great Expectations suite before anything learns from it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from airloop import artefacts, runtimes
from airloop.links.reports import DataDocsLink
from airloop.operators.base import StepOperator

# Copy size when staging an object through its connection: constant memory whatever the file's size.
_COPY_BUFFER = 8 * 2**20


class GreatExpectationsValidateDataOperator(StepOperator):
    """
    Validate a data set against a Great Expectations suite; fail the task when any expectation fails,
    naming each one with its observed value. Data Docs are built for every run (the task's "Data Docs"
    link) and the task returns a compact summary (pass it to ``MlflowTrainModelOperator(validation=...)``).

    The data: ``data_uri`` (parquet or CSV on a local path or an fsspec URL such as ``s3://``), read with
    the worker's own credentials, or through the Airflow connection ``conn_id`` (``ObjectStoragePath``,
    e.g. an ``aws`` connection); or the result of ``sql`` on the database connection ``conn_id``.

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
        expected_fingerprint: dict[str, Any] | str | None = None,
        batch_rows: int | None = None,
        label_column: str = "label",
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

    def execute(self, context: Context) -> dict[str, Any]:
        from airloop.steps.data.validate import load_suite

        if bool(self.data_uri) == bool(self.sql):
            raise ValueError("give either data_uri or sql")
        if self.sql and not self.conn_id:
            raise ValueError("sql needs conn_id, the database connection to run it on")
        if self.conn_id and self.runtime == runtimes.POD:
            raise ValueError(
                "data read through conn_id is staged on the worker, where a pod cannot read it:"
                " give the pod a data_uri it can read itself"
            )
        prefix = artefacts.task_prefix(context, "validation")
        docs = f"{prefix}/data_docs/index.html"
        DataDocsLink.persist(context, path=docs)
        suite = load_suite(self.suite_path)
        with self._local_data() as (data_uri, name), artefacts.staging(prefix) as folder:
            result = self.run_step(
                "airloop.steps.data.validate:validate",
                {
                    "data_uri": data_uri,
                    "data_name": name,
                    "suite": suite,
                    "docs_dir": str(folder / "data_docs"),
                    "label": self.label_column,
                    "expected_fingerprint": self.expected_fingerprint,
                    "batch_rows": self.batch_rows,
                },
                context,
            )
        summary = {
            key: result[key]
            for key in (
                "success",
                "evaluated",
                "successful",
                "failed",
                "fingerprint",
                "suite",
                "rows",
                "batches",
            )
        }
        summary["data_uri"] = name
        summary["docs"] = docs
        summary["docs_uri"] = f"{artefacts.root() / docs}"
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

    @contextmanager
    def _local_data(self) -> Iterator[tuple[str, str]]:
        """``(uri the step reads, name to report)``: data behind a connection is staged in a local file.

        Connection credentials stay in the worker: the step, whichever runtime it runs in, reads a file.
        """
        if not self.conn_id:
            yield self.data_uri, self.data_uri
            return
        folder = Path(tempfile.mkdtemp(prefix="airloop-gate-"))
        try:
            if self.sql:
                yield str(self._query(folder / "query.parquet")), f"sql on {self.conn_id}: {self.sql}"
            else:
                yield str(self._copy(folder)), self.data_uri
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _copy(self, folder: Path) -> Path:
        from airflow.sdk import ObjectStoragePath

        source = ObjectStoragePath(self.data_uri, conn_id=self.conn_id)
        if not source.is_file():
            raise ValueError(
                f"data file {self.data_uri} does not exist (read through connection {self.conn_id})"
            )
        target = folder / source.name
        with source.open("rb") as reader, open(target, "wb") as writer:
            shutil.copyfileobj(reader, writer, _COPY_BUFFER)
        return target

    def _query(self, target: Path) -> Path:
        from airflow.providers.common.sql.hooks.sql import DbApiHook
        from airflow.sdk import BaseHook

        hook = BaseHook.get_connection(self.conn_id).get_hook()
        if not isinstance(hook, DbApiHook):
            raise ValueError(
                f"connection {self.conn_id} ({type(hook).__name__}) is not a database connection"
            )
        frame = hook.get_df(self.sql, df_type="pandas")
        frame.to_parquet(target, index=False)
        return target
