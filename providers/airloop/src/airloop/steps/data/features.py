"""Feast: apply a feature repo, materialise the online store, build training sets by point-in-time join.

A store is described by plain values, ``{"repo_path": folder of the definitions, "config": the
feature_store.yaml content as a dict}`` (``store_config`` builds it), so a request stays JSON-able and
the hook that owns the ``feast`` connection is the only place that reads a connection.

Feast's point-in-time join drops an entity row when its entity has feature rows but none inside the
feature view's TTL before the row's timestamp, keeps only one of several rows with the same keys and
timestamp, and returns an entity it has never seen with empty features. ``training_set`` counts all
three as lost, writes only complete rows and refuses to write anything when the loss is over the
threshold, so a model never trains on fewer rows than asked for without anyone noticing.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airloop.feast_store import feature_store
from airloop.steps.data.requests import (
    TIMESTAMP,
    Applied,
    ApplyRequest,
    Materialized,
    MaterializeRequest,
    TrainingSet,
    TrainingSetRequest,
)
from airloop.tables import fingerprint, read_table, write_table

if TYPE_CHECKING:
    from collections.abc import Mapping

    import pandas as pd

__all__ = ["TIMESTAMP", "RowLossError", "apply", "materialize", "reference_tables", "training_set"]
# The reference repo (dags/features) reads its feature rows from this file under settings.feast_dir().
REFERENCE_FEATURES = "observations.parquet"
REFERENCE_ENTITY = "observation_id"
_ROW = "__airloop_row"  # carries each entity row's position through the join


class RowLossError(ValueError):
    """More entity rows were lost in the point-in-time join than the threshold allows."""


def apply(request: ApplyRequest | Mapping[str, Any]) -> Applied:
    """``feast apply`` on the repo; returns the registered project, entities, views and services.

    Feast's CLI runs in a child process: it imports the repo's modules fresh each time, changes the
    working directory and exits on bad definitions, none of which belongs in an Airflow worker. The
    configuration goes to it as a private temporary file, never through the environment.
    """
    import yaml

    request = ApplyRequest.parse(request)
    store = request.store
    feast = Path(sys.executable).parent / "feast"
    with tempfile.TemporaryDirectory(prefix="airloop-feast-") as tmp:
        config_file = Path(tmp) / "feature_store.yaml"  # mkdtemp's folder is private to this user
        config_file.write_text(yaml.safe_dump(store["config"]))
        command = [
            str(feast),
            "--chdir",
            store["repo_path"],
            "--feature-store-yaml",
            str(config_file),
            "apply",
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=request.timeout_s)
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise RuntimeError(
            f"feast apply of {store['repo_path']} failed (exit {done.returncode}): {output[-2000:]}"
        )
    fs = feature_store(store)
    return {
        "project": fs.project,
        "entities": sorted(e.name for e in fs.list_entities()),
        "feature_views": sorted(v.name for v in fs.list_feature_views()),
        "feature_services": sorted(s.name for s in fs.list_feature_services()),
        "output": output[-4000:],
    }


def _timestamp(value: str | datetime | None, name: str) -> datetime | None:
    if value is None or value == "":
        return None
    try:
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except ValueError as exc:
        raise ValueError(f"{name} must be an ISO 8601 timestamp, got {value!r}") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def materialize(request: MaterializeRequest | Mapping[str, Any]) -> Materialized:
    """Load feature values into the online store.

    With ``start``, the range [start, end); without, incrementally from where the last run of each
    view ended (or ``end`` minus the view's TTL on its first run) to ``end`` (default: now).
    ``feature_views`` defaults to every online view.
    """
    request = MaterializeRequest.parse(request)
    fs = feature_store(request.store)
    start = _timestamp(request.start, "start")
    end = _timestamp(request.end, "end") or datetime.now(UTC)
    views = request.feature_views or [v.name for v in fs.list_feature_views() if v.online]
    if not views:
        raise ValueError(
            f"Feast project {fs.project!r} has no online feature view to materialise: "
            "apply the feature repo first"
        )
    if start is None:
        fs.materialize_incremental(end_date=end, feature_views=views)
    else:
        if start >= end:
            raise ValueError(f"start {start.isoformat()} must be before end {end.isoformat()}")
        fs.materialize(start_date=start, end_date=end, feature_views=views)
    return {
        "mode": "incremental" if start is None else "range",
        "start": None if start is None else start.isoformat(),
        "end": end.isoformat(),
        "feature_views": views,
    }


def _entity_rows(uri: str, timestamp: str, storage_options: dict[str, Any] | None) -> pd.DataFrame:
    import pandas as pd

    rows = read_table(uri, storage_options)
    if rows.empty:
        raise ValueError(f"entity rows {uri} hold no row")
    if timestamp not in rows.columns:
        raise ValueError(f"entity rows {uri} have no {timestamp!r} column (columns: {list(rows.columns)})")
    if _ROW in rows.columns or (timestamp != TIMESTAMP and TIMESTAMP in rows.columns):
        raise ValueError(f"entity rows {uri} must not have a column named {_ROW!r} or {TIMESTAMP!r}")
    try:  # CSV files and SQL results give timestamps as text
        rows[timestamp] = pd.to_datetime(rows[timestamp], utc=True, format="ISO8601")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"column {timestamp!r} of entity rows {uri} is not a timestamp: {exc}") from exc
    if rows[timestamp].isna().any():
        raise ValueError(f"{int(rows[timestamp].isna().sum())} entity rows of {uri} have no {timestamp!r}")
    return rows.rename(columns={timestamp: TIMESTAMP})


def training_set(request: TrainingSetRequest | Mapping[str, Any]) -> TrainingSet:
    """Join features onto entity rows as of each row's timestamp; write the complete rows as parquet.

    ``features`` (``["view:feature", ...]``) or ``feature_service`` name what is joined. Entity rows
    carry the join keys, a timestamp and anything else the training set needs (the label); the join
    keys and the timestamp are dropped unless ``keep_entity_columns``. Raises RowLossError, writing
    nothing, when more than ``max_row_loss`` (a fraction) of the entity rows come back missing or
    incomplete.
    """
    request = TrainingSetRequest.parse(request)
    features, service = request.features, request.feature_service
    if bool(features) == bool(service):
        raise ValueError("give either features (a list of 'view:feature') or feature_service, not both")
    if isinstance(features, str):
        raise ValueError(f"features must be a list of 'view:feature', got the string {features!r}")
    max_loss = float(request.max_row_loss)
    if not 0.0 <= max_loss <= 1.0:
        raise ValueError(f"max_row_loss is a fraction within [0, 1], got {max_loss}")
    timestamp = request.timestamp_column or TIMESTAMP
    uri = request.entity_rows
    rows = _entity_rows(uri, timestamp, request.storage_options)
    fs = feature_store(request.store)
    keys = sorted({e.join_key for e in fs.list_entities()} & set(rows.columns))
    rows[_ROW] = range(len(rows))
    wanted = fs.get_feature_service(service) if service else list(features or [])
    joined = fs.get_historical_features(entity_df=rows, features=wanted).to_df()
    names = [c for c in joined.columns if c not in rows.columns]
    complete = joined[joined[names].notna().all(axis=1)].sort_values(_ROW)
    rows_in, rows_returned, rows_out = len(rows), len(joined), len(complete)
    loss = 1.0 - rows_out / rows_in
    if loss > max_loss:
        duplicates = int(rows.duplicated(subset=[*keys, TIMESTAMP]).sum())
        raise RowLossError(
            f"Feast returned {rows_out} complete rows for {rows_in} entity rows "
            f"of {uri}: {loss:.2%} lost, more than max_row_loss {max_loss:.2%} "
            f"({rows_in - rows_returned} dropped: no feature value within the TTL or "
            f"{duplicates} with the same keys and timestamp as another; "
            f"{rows_returned - rows_out} returned without every feature)"
        )
    dropped = [_ROW] if request.keep_entity_columns else [_ROW, *keys, TIMESTAMP]
    table = complete.drop(columns=dropped).reset_index(drop=True)
    if request.keep_entity_columns:
        table = table.rename(columns={TIMESTAMP: timestamp})
    write_table(table, request.output_uri, request.storage_options)
    return {
        "uri": request.output_uri,
        "rows_in": rows_in,
        "rows_returned": rows_returned,
        "rows_out": rows_out,
        "row_loss": round(loss, 6),
        "features": names,
        "fingerprint": fingerprint(table),
    }


def reference_tables(
    n_rows: int,
    shift: float = 0.0,
    seed: int = 0,
    end: datetime | None = None,
    every: timedelta = timedelta(seconds=1),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The reference data set (``data.generate``) as the reference repo's feature rows and entity rows.

    Observation ``i`` gets id ``i`` and the timestamp ``end - (n_rows - i) * every``: its features
    (``observation_id``, ``event_timestamp``, f0..f7) and its label (``observation_id``,
    ``event_timestamp``, ``label``) share the timestamp, so the join gives back ``generate``'s rows.
    """
    import numpy as np
    import pandas as pd

    from airloop.embedded.demo import LABEL, generate

    frame = generate(n_rows, shift=shift, seed=seed)
    end = pd.Timestamp(end or datetime.now(UTC)).floor("s")
    keys = pd.DataFrame(
        {
            REFERENCE_ENTITY: np.arange(n_rows, dtype="int64"),
            TIMESTAMP: end - (n_rows - np.arange(n_rows)) * pd.Timedelta(every),
        }
    )
    return (pd.concat([keys, frame.drop(columns=[LABEL])], axis=1), pd.concat([keys, frame[[LABEL]]], axis=1))
