"""The training set of a loop turn, built from a declared source and window of table files."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context

from airloop import artefacts
from airloop.operators.base import StepOperator
from airloop.steps.training.requests import BuildTrainingSetRequest, TrainingSet

TABLE = "training_set.parquet"


class TablesBuildTrainingSetOperator(StepOperator):
    """
    Build the training set from the loop's declared source and window: the rows of ``data_uri`` (a
    parquet or CSV file, or a folder of data drops that sort in arrival order) that ``window`` selects,
    or the result of ``sql``, written once as one table in the artefact store. The data gate validates
    that table and training reads it, whatever lands in the source meanwhile; a drift-triggered retrain
    trains on the declared window, not on whatever file sits at a default path.

    The source is staged like every operator's data (``airloop.staging``): a local path or any URI
    Airflow's ObjectStoragePath opens, read through ``conn_id``, or ``sql`` on the database connection
    ``conn_id``. The step runs in the worker.

    :param data_uri: the source: a file, or a folder of files (``.parquet``, ``.csv``, ``.csv.gz``; names
        starting with ``.`` or ``_`` are skipped).
    :param sql: a query whose result is the training set (needs ``conn_id``).
    :param conn_id: the connection to read ``data_uri`` through, or to run ``sql`` on.
    :param window: which drops of a folder: ``"all"``, the ``"latest"`` (last in name order), or the
        latest n (``"latest:3"``), each optionally with a seeded share of every earlier drop's rows
        (``"latest+history:0.2"``); a file, or a query's result, is itself.
    :param label_column: the label: it must be in the data, and the table holds it last.
    :param features: the model's inputs, in this order (default: every column but the label and
        ``exclude``); each must be in the data.
    :param exclude: columns that are not inputs (keys, timestamps), dropped; each must be in the data.

    Returns a ``TrainingSet``: ``{"uri", "source", "window", "files", "rows", "columns", "sha256"}``; pass
    ``uri`` to the gate and to training, ``sha256`` as the gate's ``expected_fingerprint``, and the whole
    result as ``MlflowTrainModelOperator(training_set=...)``, which keeps it in the audit record.
    """

    template_fields: Sequence[str] = ("data_uri", "sql", "conn_id", "window")
    template_fields_renderers = {"sql": "sql"}

    def __init__(
        self,
        *,
        data_uri: str | None = None,
        sql: str | None = None,
        conn_id: str | None = None,
        window: str = BuildTrainingSetRequest.window,
        label_column: str | None = BuildTrainingSetRequest.label_column,
        features: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.data_uri = data_uri
        self.sql = sql
        self.conn_id = conn_id
        self.window = window
        self.label_column = label_column
        self.features = list(features) if features is not None else None
        self.exclude = list(exclude)

    def execute(self, context: Context) -> TrainingSet:
        from airloop.staging import Arguments, stage

        prefix = artefacts.task_prefix(context, "training-sets")
        with tempfile.TemporaryDirectory(prefix="airloop-training-set-") as scratch:
            source = stage(
                scratch,
                uri=self.data_uri,
                sql=self.sql,
                conn_id=self.conn_id,
                arguments=Arguments("training data", "data_uri", "sql", "conn_id"),
            )
            with artefacts.staging(prefix) as folder:
                request = BuildTrainingSetRequest(
                    data_uri=source.path,
                    window=self.window,
                    out_path=str(folder / TABLE),
                    label_column=self.label_column,
                    features=self.features,
                    exclude=self.exclude,
                )
                result: TrainingSet = self.run_step(
                    "airloop.steps.training.data:build_training_set", request, context
                )
        # Named as the DAG declared them, not as staged.
        result["source"] = source.name
        if not artefacts.is_local():
            result["uri"] = str(artefacts.root() / prefix / TABLE)
        self.log.info(
            "training set %s: %d rows from %s (window %s: %s), sha256 %s",
            result["uri"],
            result["rows"],
            result["source"],
            result["window"],
            ", ".join(file["name"] for file in result["files"][-5:]),
            result["sha256"],
        )
        return result
