"""Feast: apply a feature repo, materialise the online store, build a training set by point-in-time join."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from airloop import artefacts, runtimes
from airloop.hooks.feast import FeastHook
from airloop.operators.base import StepOperator
from airloop.steps.data.features import RowLossError
from airloop.steps.data.requests import ApplyRequest, MaterializeRequest, TrainingSetRequest


class _FeastOperator(StepOperator):
    def __init__(self, *, feast_conn_id: str = FeastHook.default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.feast_conn_id = feast_conn_id

    @cached_property
    def hook(self) -> FeastHook:
        return FeastHook(feast_conn_id=self.feast_conn_id)


class FeastApplyRepoOperator(_FeastOperator):
    """
    Register the feature repo's definitions (``feast apply``) and create their online store tables.
    Idempotent: applying unchanged definitions changes nothing. Returns the registered project,
    entities, feature views and feature services.

    :param feast_conn_id: Airflow connection of type ``feast`` (default: the embedded default).
    """

    def execute(self, context: Context) -> dict[str, Any]:
        request = ApplyRequest(store=self.hook.store_config)
        result = self.run_step("airloop.steps.data.features:apply", request.to_dict(), context)
        self.log.info("feast apply:\n%s", result.pop("output"))
        return result


class FeastMaterializeFeaturesOperator(_FeastOperator):
    """
    Load feature values from the offline store into the online store, for serving.

    Without ``start``, incrementally: each view from where its last materialisation ended (on the
    first run, ``end`` minus the view's TTL) up to ``end``. With ``start``, the range [start, end),
    e.g. ``start="{{ data_interval_start }}", end="{{ data_interval_end }}"`` for a backfill.

    :param start: ISO 8601 start of a ranged run; leave unset for an incremental run.
    :param end: ISO 8601 end (default: now).
    :param feature_views: the views to load (default: every online view).
    :param feast_conn_id: Airflow connection of type ``feast``.
    """

    template_fields: Sequence[str] = ("start", "end", "feature_views")

    def __init__(
        self,
        *,
        start: str | None = MaterializeRequest.start,
        end: str | None = MaterializeRequest.end,
        feature_views: list[str] | None = MaterializeRequest.feature_views,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.start = start
        self.end = end
        self.feature_views = feature_views

    def execute(self, context: Context) -> dict[str, Any]:
        request = MaterializeRequest(
            store=self.hook.store_config, start=self.start, end=self.end, feature_views=self.feature_views
        )
        result = self.run_step("airloop.steps.data.features:materialize", request.to_dict(), context)
        self.log.info("materialised %s (%s) up to %s", result["feature_views"], result["mode"], result["end"])
        return result


class FeastBuildTrainingSetOperator(_FeastOperator):
    """
    Build a training set by point-in-time join: for each entity row, the feature values as they were
    at the row's timestamp, never later ones. Writes it as parquet to the artefact store and returns
    ``uri``, the row counts (``rows_in``, ``rows_returned``, ``rows_out``), ``row_loss``, the feature
    names and the content ``fingerprint``.

    Feast drops an entity row that has no feature value within the view's TTL (and all but one of
    rows sharing keys and timestamp) and returns rows of unknown entities without features. Such rows
    are lost: none is written, and when more than ``max_row_loss`` of the rows are lost the task fails
    with the counts instead of training on fewer rows.

    :param entity_rows: a parquet or CSV file of entity rows (a local path or any URI Airflow's
        ObjectStoragePath opens, e.g. ``s3://``, read with the worker's credentials): the join keys,
        ``timestamp_column`` and any other column to keep, such as the label.
    :param entity_sql: instead of ``entity_rows``, a query that returns them ...
    :param sql_conn_id: ... through this Airflow database connection (any ``DbApiHook``); its result is
        kept next to the training set (``entity_rows.parquet``), so what went in stays on record.
    :param features: feature references (``"view:feature"``), in the order the model takes them ...
    :param feature_service: ... or the name of a FeatureService.
    :param max_row_loss: the fraction of entity rows that may be lost (default 0: none).
    :param timestamp_column: the entity rows' timestamp column.
    :param keep_entity_columns: keep the join keys and the timestamp in the training set.
    :param feast_conn_id: Airflow connection of type ``feast``.
    """

    template_fields: Sequence[str] = (
        "entity_rows",
        "entity_sql",
        "sql_conn_id",
        "features",
        "feature_service",
        "max_row_loss",
        "timestamp_column",
    )
    template_ext: Sequence[str] = (".sql",)

    def __init__(
        self,
        *,
        entity_rows: str | None = None,
        entity_sql: str | None = None,
        sql_conn_id: str | None = None,
        features: list[str] | None = TrainingSetRequest.features,
        feature_service: str | None = TrainingSetRequest.feature_service,
        max_row_loss: float = TrainingSetRequest.max_row_loss,
        timestamp_column: str = TrainingSetRequest.timestamp_column,
        keep_entity_columns: bool = TrainingSetRequest.keep_entity_columns,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.entity_rows = entity_rows
        self.entity_sql = entity_sql
        self.sql_conn_id = sql_conn_id
        self.features = features
        self.feature_service = feature_service
        self.max_row_loss = max_row_loss
        self.timestamp_column = timestamp_column
        self.keep_entity_columns = keep_entity_columns

    def execute(self, context: Context) -> dict[str, Any]:
        from airloop.staging import Arguments, stage

        prefix = artefacts.task_prefix(context, "features")
        with artefacts.staging(prefix) as folder:
            entity_rows = stage(
                folder,
                uri=self.entity_rows,
                sql=self.entity_sql,
                conn_id=self.sql_conn_id,
                arguments=Arguments("entity rows", "entity_rows", "entity_sql", "sql_conn_id"),
                pod=self.runtime == runtimes.POD,
            )
            request = TrainingSetRequest(
                store=self.hook.store_config,
                entity_rows=entity_rows.path,
                features=self.features,
                feature_service=self.feature_service,
                max_row_loss=float(self.max_row_loss),
                timestamp_column=self.timestamp_column,
                keep_entity_columns=self.keep_entity_columns,
                output_uri=str(folder / "training_set.parquet"),
            )
            try:
                result = self.run_step("airloop.steps.data.features:training_set", request.to_dict(), context)
            except RowLossError as exc:
                raise AirflowFailException(str(exc)) from exc
        # What went in: the file named, or the query's result where the artefact store keeps it.
        recorded = entity_rows.path
        if not artefacts.is_local():
            result["uri"] = str(artefacts.root() / prefix / "training_set.parquet")
            recorded = str(artefacts.root() / prefix / Path(recorded).name)
        result["entity_rows"] = self.entity_rows or recorded
        self.log.info(
            "training set %s: %d of %d entity rows (loss %.2f%%), features %s",
            result["uri"],
            result["rows_out"],
            result["rows_in"],
            100 * result["row_loss"],
            result["features"],
        )
        return result
