"""The data gate: validate a table against a Great Expectations 1.x suite.

A suite is a JSON or YAML file, Python code (``package.module:function`` returning a suite dict or a
GX ``ExpectationSuite``) or the dict itself. Runs in an ephemeral GX context (nothing written but
the Data Docs, no network). Failed expectations are reported, never raised: the operator decides
what a failure means. Unreadable data or a broken suite raise ValueError, since there is nothing to
report on.

Parquet files above ``AUTO_BATCH_ABOVE`` rows (or any, with ``batch_rows``) are validated in row
batches so the table is never in memory at once: row-wise expectations run on every batch and their
counts are added up as GX would count them on the whole table; expectations on a column as a whole
(aggregates, uniqueness, order) run on the columns they need, read alone; schema expectations run
on the schema. The result is the one the whole table gives.
"""

from __future__ import annotations

import collections
import datetime
import importlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airloop.steps.data.requests import ValidateRequest
from airloop.tables import Fingerprint, fingerprint, is_csv, parquet_table, read_table
from airloop.validation import Failure, ValidationResult

if TYPE_CHECKING:
    import pandas as pd

    from airloop.tables import ParquetTable

_SITE = "airloop"
# Enough of a failing column's values to see the problem; the full list stays in the Data Docs.
_SAMPLE = 5
# Parquet files with more rows than this are validated in batches unless the request sets batch_rows.
AUTO_BATCH_ABOVE = 2_000_000
AUTO_BATCH_ROWS = 1_000_000
# Map expectations whose verdict on one row depends on other rows: run on whole columns, never in batches.
_WHOLE_COLUMN = frozenset(
    {
        "expect_column_values_to_be_unique",
        "expect_compound_columns_to_be_unique",
        "expect_column_values_to_be_increasing",
        "expect_column_values_to_be_decreasing",
    }
)
# Table metrics that need the column names and dtypes only, not the rows.
_SCHEMA_METRICS = frozenset({"table.columns", "table.column_count", "table.column_types"})
_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
FINGERPRINT_CHECK = "expect_fingerprint_to_match"


def load_suite(source: Any) -> dict[str, Any]:
    """The suite as ``{"name", "expectations": [{"type", "kwargs", "meta"?}], "meta"?}``.

    ``source``: a JSON or YAML file path; ``package.module:function`` (a function returning a suite,
    or the suite itself); a suite dict; a GX ``ExpectationSuite``.
    """
    if isinstance(source, str):
        where = f"suite {source}"
        suite = (
            _from_code(source)
            if _IMPORT_PATH.fullmatch(source) and not os.path.exists(source)
            else (_from_file(source))
        )
    else:
        where, suite = "suite", source
    if hasattr(suite, "to_json_dict"):  # a GX ExpectationSuite
        suite = suite.to_json_dict()
        suite["expectations"] = [
            {key: item[key] for key in ("type", "kwargs", "meta") if item.get(key)}
            for item in suite.get("expectations") or []
        ]
    if (
        not isinstance(suite, dict)
        or not suite.get("name")
        or not isinstance(suite.get("expectations"), list)
    ):
        raise ValueError(f"{where} needs a 'name' and an 'expectations' list")
    for index, item in enumerate(suite["expectations"]):
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise ValueError(f"{where}: expectation {index} has no 'type'")
    return {key: suite[key] for key in ("name", "expectations", "meta") if key in suite}


def _from_file(path: str) -> Any:
    import yaml

    try:
        with open(path) as handle:
            return yaml.safe_load(handle) if path.endswith((".yml", ".yaml")) else json.load(handle)
    except OSError as exc:
        raise ValueError(f"suite file {path} cannot be read: {exc}") from exc
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"suite file {path} is not valid JSON/YAML: {exc}") from exc


def _from_code(path: str) -> Any:
    module, _, name = path.partition(":")
    try:
        found = getattr(importlib.import_module(module), name)
        return found() if callable(found) else found
    except Exception as exc:  # the user's code: any error means there is no suite
        raise ValueError(f"suite {path} cannot be loaded: {type(exc).__name__}: {exc}") from exc


def validate(request: ValidateRequest | Mapping[str, Any]) -> ValidationResult:
    """Validate ``data_uri`` (parquet or CSV; path, ``file://`` or fsspec URL); see docs/validation.md."""
    request = ValidateRequest.parse(request)
    source = request.suite or request.suite_path
    if not request.data_uri or not source:
        raise ValueError("request needs 'data_uri' and 'suite' (or 'suite_path')")
    suite = load_suite(source)
    uri, options = request.data_uri, request.storage_options
    reporting: dict[str, Any] = {
        "docs_dir": request.docs_dir,
        "label": request.label_column,
        "expected_fingerprint": request.expected_fingerprint,
        "data_name": request.data_name or uri,
    }
    batch_rows = request.batch_rows
    if batch_rows is not None and (isinstance(batch_rows, bool) or int(batch_rows) < 0):
        raise ValueError(f"batch_rows must be a whole number >= 0, got {batch_rows!r}")
    if is_csv(uri):
        if batch_rows:
            raise ValueError(f"batch_rows needs a parquet file; {uri} is CSV")
        return validate_frame(read_table(uri, options), suite, **reporting)
    with parquet_table(uri, options) as table:
        size = (
            int(batch_rows)
            if batch_rows is not None
            else (AUTO_BATCH_ROWS if table.rows > AUTO_BATCH_ABOVE else 0)
        )
        if not size or size >= table.rows:
            return validate_frame(table.frame(), suite, **reporting)
        return _validate_batches(table, suite, size, **reporting)


def validate_frame(
    frame: pd.DataFrame,
    suite: Any,
    *,
    docs_dir: str | None = None,
    label: str = "label",
    expected_fingerprint: dict[str, Any] | str | None = None,
    data_name: str = "dataframe",
) -> ValidationResult:
    """Validate an in-memory DataFrame; ``suite`` is anything ``load_suite`` takes. Result as ``validate``."""
    gate = _Gate(load_suite(suite))
    results = gate.run(frame, range(len(gate.configs)))
    labels = collections.Counter(frame[label].value_counts().to_dict()) if label in frame.columns else None
    return gate.finish(
        results,
        fingerprint(frame),
        labels,
        batches=1,
        docs_dir=docs_dir,
        expected_fingerprint=expected_fingerprint,
        data_name=data_name,
    )


def _validate_batches(
    table: ParquetTable, suite: dict[str, Any], batch_rows: int, *, label: str, **options: Any
) -> ValidationResult:
    gate = _Gate(suite)
    rowwise, schema, whole = gate.split()
    schema_frame = table.schema_frame()
    digest = Fingerprint()
    digest.update(schema_frame)
    labels: collections.Counter | None = collections.Counter() if label in table.columns else None
    parts: list[list[Any]] = [[] for _ in rowwise]
    batches = 0
    for frame in table.batches(batch_rows):
        digest.update(frame)
        if labels is not None:
            labels.update(frame[label].value_counts().to_dict())
        if rowwise:
            for collected, result in zip(parts, gate.run(frame, rowwise), strict=True):
                collected.append(result)
        batches += 1
    results = dict(zip(rowwise, (_combine(collected) for collected in parts), strict=True))
    if schema:
        results.update(zip(schema, gate.run(schema_frame, schema), strict=True))
    if whole:
        needed = gate.columns(whole)
        # A missing column is left for GX to report, as it does on the whole table.
        columns = None if needed is None else [name for name in table.columns if name in needed]
        results.update(zip(whole, gate.run(table.frame(columns), whole), strict=True))
    return gate.finish(
        [results[index] for index in range(len(gate.configs))],
        digest.result(),
        labels,
        batches=batches,
        **options,
    )


class _Gate:
    """One suite in one ephemeral GX context: runs parts of it on frames and reports the whole."""

    def __init__(self, suite: dict[str, Any]) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig
        from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

        import airloop.expectations  # noqa: F401 (registers Airloop's expectations with GX)

        self.name = suite["name"]
        try:
            self.configs = [
                ExpectationConfiguration(
                    type=item["type"], kwargs=item.get("kwargs") or {}, meta=item.get("meta")
                )
                for item in suite["expectations"]
            ]
            self.expectations = [config.to_domain_obj() for config in self.configs]
        except Exception as exc:  # GX raises its own error types for unknown types and bad kwargs
            raise ValueError(f"suite {self.name!r} has an invalid expectation: {exc}") from exc
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.batch_definition = (
            self.context.data_sources.add_pandas("airloop")
            .add_dataframe_asset("table")
            .add_batch_definition_whole_dataframe("whole")
        )
        self.meta: dict[str, Any] | None = None
        self.batch_id: str | None = None

    def run(self, frame: pd.DataFrame, indices: Iterable[int]) -> list[Any]:
        """The results of the expectations at ``indices`` on ``frame``, in that order."""
        import great_expectations as gx

        indices = list(indices)
        suite = gx.ExpectationSuite(
            name=self.name, expectations=[self.configs[index].to_domain_obj() for index in indices]
        )
        batch = self.batch_definition.get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(suite, result_format="SUMMARY")
        if self.meta is None:
            self.meta, self.batch_id = dict(result.meta), result.batch_id
        # GX returns the results grouped by column: put them back in the suite's order.
        # Each result carries its expectation's configuration (GX types it optional).
        remaining: list[Any] = list(result.results)
        ordered = []
        for index in indices:
            config = self.expectations[index].configuration  # kwargs as GX keeps them (defaults left out)
            found = next(
                position
                for position, item in enumerate(remaining)
                if item.expectation_config.type == config.type
                and {k: v for k, v in item.expectation_config.kwargs.items() if k != "batch_id"}
                == config.kwargs
            )
            ordered.append(remaining.pop(found))
        return ordered

    def split(self) -> tuple[list[int], list[int], list[int]]:
        """Indices of the row-wise expectations, the schema ones and those needing whole columns."""
        from great_expectations.expectations.expectation import (
            ColumnMapExpectation,
            ColumnPairMapExpectation,
            MulticolumnMapExpectation,
        )

        rowwise, schema, whole = [], [], []
        for index, expectation in enumerate(self.expectations):
            row_map = (ColumnMapExpectation, ColumnPairMapExpectation, MulticolumnMapExpectation)
            metrics = set(getattr(expectation, "metric_dependencies", ()) or ())
            if isinstance(expectation, row_map) and self.configs[index].type not in _WHOLE_COLUMN:
                rowwise.append(index)
            elif metrics and metrics <= _SCHEMA_METRICS:
                schema.append(index)
            else:
                whole.append(index)
        return rowwise, schema, whole

    def columns(self, indices: Sequence[int]) -> set[str] | None:
        """The columns the expectations at ``indices`` read; None when one needs the whole table."""
        needed: set[str] = set()
        for index in indices:
            kwargs = self.configs[index].kwargs
            given = [kwargs.get(key) for key in ("column", "column_A", "column_B", "label")] + list(
                kwargs.get("column_list") or []
            )
            named = [name for name in given if isinstance(name, str)]
            if named:
                needed.update(named)
            elif set(getattr(self.expectations[index], "metric_dependencies", ()) or ()) != {
                "table.row_count"
            }:
                return None
        return needed

    def finish(
        self,
        results: list[Any],
        data_print: dict[str, Any],
        labels: collections.Counter | None,
        *,
        batches: int,
        docs_dir: str | None,
        expected_fingerprint: dict[str, Any] | str | None,
        data_name: str,
    ) -> ValidationResult:
        from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResult

        for item in results:
            item.success = bool(item.success)  # some GX expectations report a numpy bool, which JSON refuses
        successful = sum(1 for item in results if item.success)
        statistics: dict[str, Any] = {
            "evaluated_expectations": float(len(results)),
            "successful_expectations": float(successful),
            "unsuccessful_expectations": float(len(results) - successful),
            "success_percent": 100.0 * successful / len(results) if results else None,
        }
        docs_index = None
        if docs_dir:
            meta = {
                **(self.meta or {}),
                "airloop": {"data": data_name, "rows": data_print["rows"], "batches": batches},
            }
            docs_index = self._docs(
                ExpectationSuiteValidationResult(
                    success=successful == len(results),
                    results=results,
                    suite_name=self.name,
                    statistics=statistics,
                    meta=meta,
                    batch_id=self.batch_id,
                ),
                docs_dir,
            )
        failed = [_failure(item) for item in results if not item.success]
        evaluated = len(results)
        if expected_fingerprint:
            evaluated += 1
            mismatch = _fingerprint_mismatch(expected_fingerprint, data_print)
            if mismatch:
                failed.append(mismatch)
        if labels is not None:
            statistics["label_counts"] = {str(key): int(count) for key, count in labels.most_common()}
        return {
            "success": not failed,
            "evaluated": evaluated,
            "successful": evaluated - len(failed),
            "failed": failed,
            "statistics": statistics,
            "fingerprint": data_print,
            "rows": data_print["rows"],
            "batches": batches,
            "docs_index": docs_index,
            "suite": self.name,
            "data": data_name,
        }

    def _docs(self, result: Any, docs_dir: str) -> str:
        """Build this run's Data Docs site under ``docs_dir``: the index and the validation result's page.

        No page for the suite itself: the result's page shows every expectation, and rendering the suite
        again would add half as much time (GX compiles its Jinja templates on every build).
        """
        from great_expectations.core.run_identifier import RunIdentifier
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
            ValidationResultIdentifier,
        )

        folder = os.path.abspath(docs_dir)
        self.context.add_data_docs_site(
            _SITE,
            {
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": folder},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        run_id = RunIdentifier(run_time=datetime.datetime.now(datetime.UTC))
        result.meta.update(run_id=run_id, validation_time=run_id.run_time)
        suite_id = ExpectationSuiteIdentifier(name=self.name)
        key = ValidationResultIdentifier(
            expectation_suite_identifier=suite_id, run_id=run_id, batch_identifier=result.batch_id
        )
        self.context.validation_results_store.store_validation_results(result, key, suite_id)
        self.context.build_data_docs(site_names=[_SITE], resource_identifiers=[key])
        return os.path.join(folder, "index.html")


def _combine(parts: list[Any]) -> Any:
    """One row-wise expectation's results on consecutive row batches -> its result on all those rows.

    Counts add up and the success rule is GX's own (``mostly`` of the non-null rows, or of all rows
    for the null checks, which report no missing count); the samples are the first of the table.
    """
    from great_expectations.core.expectation_validation_result import ExpectationValidationResult
    from great_expectations.expectations.expectation import _format_map_output
    from great_expectations.expectations.expectation_configuration import parse_result_format

    first = parts[0]
    broken = next((part for part in parts if _error(part.exception_info or {})), None)
    if len(parts) == 1 or broken is not None:
        return broken or first
    results = [part.result or {} for part in parts]
    if not all(isinstance(item.get("unexpected_count"), int) for item in results):
        # A verdict on the column's dtype, the same in every batch: the first failure speaks for all.
        return next((part for part in parts if not part.success), first)
    element = sum(item["element_count"] for item in results)
    unexpected = sum(item["unexpected_count"] for item in results)
    nonnull = (
        element - sum(item["missing_count"] for item in results)
        if all("missing_count" in item for item in results)
        else None
    )
    considered = element if nonnull is None else nonnull
    mostly = first.expectation_config.kwargs.get("mostly", 1.0)
    success = considered == 0 or (considered - unexpected) / considered >= mostly
    samples = [value for item in results for value in item.get("partial_unexpected_list") or []]
    indices = [value for item in results for value in item.get("partial_unexpected_index_list") or []]
    has_indices = all("partial_unexpected_index_list" in item for item in results)
    # GX's own formatter: the combined result has exactly the shape and arithmetic of a whole-table one.
    combined = _format_map_output(
        result_format=parse_result_format("SUMMARY"),
        success=success,
        element_count=element,
        nonnull_count=nonnull,
        unexpected_count=unexpected,
        unexpected_list=samples,
        unexpected_index_list=indices if has_indices else None,
    )
    return ExpectationValidationResult(
        success=success,
        expectation_config=first.expectation_config,
        result=combined["result"],
        exception_info=first.exception_info,
        meta=first.meta,
    )


def _fingerprint_mismatch(expected: dict[str, Any] | str, actual: dict[str, Any]) -> Failure | None:
    """A failure when the data is not what its producer fingerprinted (sha256, and rows when given)."""
    wanted: dict[str, Any] = (
        {"sha256": expected}
        if isinstance(expected, str)
        else {key: expected[key] for key in ("sha256", "rows") if key in expected}
    )
    if not wanted.get("sha256"):
        raise ValueError(f"expected_fingerprint needs a 'sha256', got {expected!r}")
    if all(actual[key] == value for key, value in wanted.items()):
        return None
    return {
        "expectation": FINGERPRINT_CHECK,
        "column": None,
        "kwargs": wanted,
        "observed": {"sha256": actual["sha256"], "rows": actual["rows"]},
    }


def _failure(item: Any) -> Failure:
    kwargs = {k: v for k, v in item.expectation_config.kwargs.items() if k != "batch_id"}
    result = item.result or {}
    error = _error(item.exception_info or {})
    if error:
        observed: Any = {"error": error}
    elif "observed_value" in result:
        observed = result["observed_value"]
    else:
        observed = {
            "unexpected_count": result.get("unexpected_count"),
            "unexpected_percent": result.get("unexpected_percent"),
            "sample": (result.get("partial_unexpected_list") or [])[:_SAMPLE],
        }
    # Round-trip through JSON: GX results hold numpy scalars and other non-JSON types; NaN becomes "NaN".
    failure = {
        "expectation": item.expectation_config.type,
        "column": kwargs.get("column") or kwargs.get("column_A"),
        "kwargs": kwargs,
        "observed": observed,
    }
    return json.loads(json.dumps(failure, default=str), parse_constant=str)


def _error(info: dict[str, Any]) -> str | None:
    """The message of an expectation that raised; GX nests it per metric when a metric failed."""
    if "exception_message" in info:
        return info["exception_message"]
    messages = [value.get("exception_message") for value in info.values() if isinstance(value, dict)]
    return next((message for message in messages if message), None)
