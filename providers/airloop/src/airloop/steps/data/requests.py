"""The data steps' requests (the validation gate, suite profiling, the three Feast steps) and the Feast
steps' results.

Standard library only, so the operators import them at the top without slowing DAG parsing; each
default is written here once, and an operator argument of the same name reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

from airloop.requests import StepRequest

if TYPE_CHECKING:
    from airloop.feast_store import StoreConfig

# Feast's own name for the entity rows' timestamp column, and the default of ``timestamp_column``.
TIMESTAMP = "event_timestamp"


@dataclass(frozen=True, kw_only=True)
class ValidateRequest(StepRequest):
    """``validate``: ``data_uri`` (parquet or CSV) against a suite.

    ``suite`` is the suite itself (a dict); without it the step loads ``suite_path`` (a JSON or YAML
    file, or ``package.module:function``). The operator loads the suite in the worker and sends both,
    so the step gets the suite whichever runtime it runs in.
    """

    data_uri: str
    suite_path: str | None = None
    suite: dict[str, Any] | None = None
    # The name results and Data Docs give the data (default: data_uri), e.g. the URI a copy came from.
    data_name: str | None = None
    docs_dir: str | None = None
    label_column: str = "label"
    expected_fingerprint: dict[str, Any] | str | None = None
    batch_rows: int | None = None
    storage_options: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class ProfileRequest(StepRequest):
    """``profile``: draft a suite from the trusted table at ``data_uri`` into ``out`` (YAML or JSON).

    ``margin``: numeric ranges are widened on each side by this many times the observed span (a range
    rejects garbage; the drift monitor watches the distribution); ``mostly``: the share of rows each
    range and value set must hold for; ``categorical`` / ``numeric``: columns whose kind is given
    rather than read from the data.
    """

    data_uri: str
    out: str
    name: str | None = None
    key: str | None = None
    label: str | None = None
    margin: float = 10.0
    mostly: float = 1.0
    categorical: list[str] | None = None
    numeric: list[str] | None = None
    storage_options: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class ApplyRequest(StepRequest):
    """``apply``: ``feast apply`` on the store's repo."""

    store: StoreConfig
    timeout_s: float = 900


@dataclass(frozen=True, kw_only=True)
class MaterializeRequest(StepRequest):
    """``materialize``: ISO 8601 ``start`` (unset: incremental) to ``end`` (unset: now)."""

    store: StoreConfig
    start: str | None = None
    end: str | None = None
    feature_views: list[str] | None = None


@dataclass(frozen=True, kw_only=True)
class TrainingSetRequest(StepRequest):
    """``training_set``: join ``features`` (or ``feature_service``) onto ``entity_rows``."""

    store: StoreConfig
    entity_rows: str
    output_uri: str
    features: list[str] | None = None
    feature_service: str | None = None
    max_row_loss: float = 0.0
    timestamp_column: str = TIMESTAMP
    keep_entity_columns: bool = False
    storage_options: dict[str, Any] | None = None


class Applied(TypedDict):
    """What ``apply`` registered, and the end of ``feast apply``'s output."""

    project: str
    entities: list[str]
    feature_views: list[str]
    feature_services: list[str]
    output: str


class Materialized(TypedDict):
    """What ``materialize`` loaded: ``incremental`` or ``range``, up to ``end`` (ISO 8601)."""

    mode: str
    start: str | None
    end: str
    feature_views: list[str]


class TrainingSet(TypedDict):
    """The training set ``training_set`` wrote, its row counts and content fingerprint.

    ``rows_in`` entity rows, ``rows_returned`` by Feast's join, ``rows_out`` complete and written.
    """

    uri: str
    rows_in: int
    rows_returned: int
    rows_out: int
    row_loss: float
    features: list[str]
    fingerprint: dict[str, Any]
