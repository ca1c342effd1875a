"""Ground truth that lands later than its predictions, joined to the serving request log."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context

from airloop import runtimes, settings
from airloop.operators.base import StepOperator
from airloop.steps.rollout.requests import IngestLabelsRequest, IngestResult


class LabelsIngestOperator(StepOperator):
    """
    Ingest ground truth for served predictions: join each label to the gateway's request log on the
    request id (the prediction's ``meta.puid``) and append the matched ones to the labels log, which
    also holds the labels sent to the gateway's feedback endpoint. Duplicates, unknown ids, labels that
    came too late and invalid rows are counted in the result, never silently dropped or counted twice;
    a retry counts the rows it already wrote as duplicates. See ``airloop.steps.rollout.labels``.

    The ground truth is staged like every operator's data (``airloop.staging``): ``labels_uri``, a
    parquet or CSV file or a folder of them, local or any URI Airflow's ObjectStoragePath opens (read
    through ``labels_conn_id``, e.g. an ``aws`` connection for S3), or ``labels_sql`` on the database
    connection ``labels_conn_id``.

    :param deployment: the serving deployment whose request log the labels belong to.
    :param labels_uri: the ground truth as a file or a folder of files.
    :param labels_sql: a query whose result is the ground truth (needs ``labels_conn_id``).
    :param labels_conn_id: the connection to read ``labels_uri`` through, or to run ``labels_sql`` on.
    :param id_column: the column holding the request id.
    :param label_column: the column holding the true label.
    :param time_column: the column holding when each label became known (timestamps or epoch
        seconds); without it, the time of the ingest.
    :param max_label_delay_hours: a label later than this after its prediction is counted too late.
    :param lookback_hours: how far back the request log is read (older ids count as unknown).

    Returns an ``IngestResult``: the counts, examples of ids per count, the labels log file written,
    and per predictor the matured labels (labelled requests, accuracy, label lag p50 / p90).
    """

    template_fields: Sequence[str] = (
        "deployment",
        "labels_uri",
        "labels_sql",
        "labels_conn_id",
        "id_column",
        "label_column",
        "time_column",
        "max_label_delay_hours",
        "lookback_hours",
    )
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers = {"labels_sql": "sql"}

    def __init__(
        self,
        *,
        deployment: str = "airloop",
        labels_uri: str | None = None,
        labels_sql: str | None = None,
        labels_conn_id: str | None = None,
        id_column: str = IngestLabelsRequest.id_column,
        label_column: str = IngestLabelsRequest.label_column,
        time_column: str | None = IngestLabelsRequest.time_column,
        max_label_delay_hours: float | str = IngestLabelsRequest.max_label_delay_hours,
        lookback_hours: float | str = IngestLabelsRequest.lookback_hours,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.deployment = deployment
        self.labels_uri = labels_uri
        self.labels_sql = labels_sql
        self.labels_conn_id = labels_conn_id
        self.id_column = id_column
        self.label_column = label_column
        self.time_column = time_column
        self.max_label_delay_hours = max_label_delay_hours
        self.lookback_hours = lookback_hours

    def execute(self, context: Context) -> IngestResult:
        from airloop.staging import Arguments, stage

        with tempfile.TemporaryDirectory(prefix="airloop-labels-") as scratch:
            staged = stage(
                scratch,
                uri=self.labels_uri,
                sql=self.labels_sql,
                conn_id=self.labels_conn_id,
                arguments=Arguments("ground truth", "labels_uri", "labels_sql", "labels_conn_id"),
                pod=self.runtime == runtimes.POD,
            )
            request = IngestLabelsRequest(
                labels_path=staged.path,
                deployment=self.deployment,
                artefact_root=settings.artefact_root(),
                source=staged.name,
                id_column=self.id_column,
                label_column=self.label_column,
                time_column=self.time_column or None,
                max_label_delay_hours=float(self.max_label_delay_hours),
                lookback_hours=float(self.lookback_hours),
            )
            result: IngestResult = self.run_step("airloop.steps.rollout.labels:ingest", request, context)
        self.log.info(
            "ground truth %s: %d rows, %d matched, %d duplicates, %d unknown ids, %d too late, %d invalid",
            result["source"],
            result["rows"],
            result["matched"],
            result["duplicates"],
            result["unknown"],
            result["too_late"],
            result["invalid"],
        )
        for name, arm in result["quality"].items():
            self.log.info(
                "%s (v%s): %d labelled requests, accuracy %s, label lag p50 %.0f s, p90 %.0f s",
                name,
                arm["model_version"],
                arm["labelled"],
                arm["accuracy"],
                arm["label_lag_p50_s"],
                arm["label_lag_p90_s"],
            )
        return result
