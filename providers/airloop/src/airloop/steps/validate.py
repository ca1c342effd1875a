"""The data gate: validate a table against a Great Expectations 1.x suite kept as a file.

Runs in an ephemeral GX context (nothing written but the Data Docs, no network). Failed
expectations are reported, never raised: the operator decides what a failure means. Unreadable
data or a broken suite file raise ValueError, since there is nothing to report on.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from airloop.steps.data import fingerprint, read_table

if TYPE_CHECKING:
    import pandas as pd

_SITE = "airloop"
# Enough of a failing column's values to see the problem; the full list stays in the Data Docs.
_SAMPLE = 5


def load_suite(path: str) -> dict[str, Any]:
    """Read a GX 1.x suite file (JSON or YAML): ``{"name", "expectations": [{"type", "kwargs"}]}``."""
    import yaml

    try:
        with open(path) as handle:
            suite = yaml.safe_load(handle) if path.endswith((".yml", ".yaml")) else json.load(handle)
    except OSError as exc:
        raise ValueError(f"suite file {path} cannot be read: {exc}") from exc
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"suite file {path} is not valid JSON/YAML: {exc}") from exc
    if (
        not isinstance(suite, dict)
        or not suite.get("name")
        or not isinstance(suite.get("expectations"), list)
    ):
        raise ValueError(f"suite file {path} needs a 'name' and an 'expectations' list")
    for index, item in enumerate(suite["expectations"]):
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise ValueError(f"suite file {path}: expectation {index} has no 'type'")
    return suite


def validate(request: dict[str, Any]) -> dict[str, Any]:
    """Request ``{"data_uri", "suite_path", "docs_dir"?, "label"?, "storage_options"?}`` -> result.

    Result: ``{"success", "evaluated", "successful", "failed": [{"expectation", "column", "kwargs",
    "observed"}], "statistics", "fingerprint", "docs_index", "suite"}``.
    """
    if not request.get("data_uri") or not request.get("suite_path"):
        raise ValueError("request needs 'data_uri' and 'suite_path'")
    suite = load_suite(request["suite_path"])
    frame = read_table(request["data_uri"], request.get("storage_options"))
    run = _run_suite(frame, suite, request.get("docs_dir"))
    failed = [_failure(item) for item in run.results if not item.success]
    statistics: dict[str, Any] = {key: float(value) for key, value in run.statistics.items()}
    label = request.get("label", "label")
    if label in frame.columns:
        statistics["label_counts"] = {str(k): int(v) for k, v in frame[label].value_counts().items()}
    docs_dir = request.get("docs_dir")
    return {
        "success": bool(run.success),
        "evaluated": int(run.statistics["evaluated_expectations"]),
        "successful": int(run.statistics["successful_expectations"]),
        "failed": failed,
        "statistics": statistics,
        "fingerprint": fingerprint(frame),
        "docs_index": os.path.join(os.path.abspath(docs_dir), "index.html") if docs_dir else None,
        "suite": suite["name"],
    }


def _run_suite(frame: pd.DataFrame, suite: dict[str, Any], docs_dir: str | None) -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    try:
        expectations = [
            ExpectationConfiguration(
                type=item["type"], kwargs=item.get("kwargs") or {}, meta=item.get("meta")
            ).to_domain_obj()
            for item in suite["expectations"]
        ]
    except Exception as exc:  # GX raises its own error types for unknown types and bad kwargs
        raise ValueError(f"suite {suite['name']!r} has an invalid expectation: {exc}") from exc
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("airloop")
        .add_dataframe_asset("table")
        .add_batch_definition_whole_dataframe("whole")
    )
    gx_suite = context.suites.add(gx.ExpectationSuite(name=suite["name"], expectations=expectations))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=suite["name"], data=batch, suite=gx_suite)
    )
    actions: list[Any] = []
    if docs_dir:
        store = {"class_name": "TupleFilesystemStoreBackend", "base_directory": os.path.abspath(docs_dir)}
        context.add_data_docs_site(
            _SITE,
            {
                "class_name": "SiteBuilder",
                "store_backend": store,
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[_SITE]))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=suite["name"],
            validation_definitions=[definition],
            actions=actions,
            result_format="SUMMARY",
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    return next(iter(result.run_results.values()))


def _failure(item: Any) -> dict[str, Any]:
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
    # Round-trip through JSON: GX results hold numpy scalars and other non-JSON types.
    failure = {
        "expectation": item.expectation_config.type,
        "column": kwargs.get("column"),
        "kwargs": kwargs,
        "observed": observed,
    }
    return json.loads(json.dumps(failure, default=str))


def _error(info: dict[str, Any]) -> str | None:
    """The message of an expectation that raised; GX nests it per metric when a metric failed."""
    if "exception_message" in info:
        return info["exception_message"]
    messages = [value.get("exception_message") for value in info.values() if isinstance(value, dict)]
    return next((message for message in messages if message), None)


def _expect(kind: str, **kwargs: Any) -> dict[str, Any]:
    return {"type": f"expect_{kind}", "kwargs": kwargs}


def profile_suite(df: pd.DataFrame, name: str, margin: float = 0.5) -> dict[str, Any]:
    """A starter suite from a trusted data set, for a person to review before it gates anything.

    Exact column set, a minimum row count, and per column: not null, its dtype, and for numbers a
    range widened by ``margin`` x the observed span on each side (a few distinct integers become a
    value set instead).
    """
    import pandas as pd

    if df.empty:
        raise ValueError("cannot profile an empty table")
    expectations = [
        _expect("table_columns_to_match_set", column_set=[str(c) for c in df.columns], exact_match=True),
        _expect("table_row_count_to_be_between", min_value=1),
    ]
    for name, values in df.items():
        column = str(name)
        expectations.append(_expect("column_values_to_not_be_null", column=column))
        dtype = [str(values.dtype)]
        expectations.append(_expect("column_values_to_be_in_type_list", column=column, type_list=dtype))
        if pd.api.types.is_integer_dtype(values) and values.nunique() <= 20:
            value_set = sorted(int(v) for v in values.unique())
            expectations.append(_expect("column_values_to_be_in_set", column=column, value_set=value_set))
        elif pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            low, high = float(values.min()), float(values.max())
            pad = margin * (high - low) or 1.0
            bounds = {"min_value": low - pad, "max_value": high + pad}
            expectations.append(_expect("column_values_to_be_between", column=column, **bounds))
    return {"name": name, "expectations": expectations, "meta": {"profiled_rows": int(len(df))}}
