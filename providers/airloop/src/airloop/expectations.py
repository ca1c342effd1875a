"""Expectations Airloop adds to Great Expectations' own; importing this module registers them.

Imported by the validation step only (it imports Great Expectations at module level).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from great_expectations.execution_engine import PandasExecutionEngine
from great_expectations.expectations.expectation import ColumnPairMapExpectation
from great_expectations.expectations.metrics.map_metric_provider import (
    ColumnPairMapMetricProvider,
    column_pair_condition_partial,
)


class ColumnPairValuesDiffer(ColumnPairMapMetricProvider):
    condition_metric_name = "column_pair_values.differ"
    condition_domain_keys = (
        "batch_id",
        "table",
        "column_A",
        "column_B",
        "row_condition",
        "condition_parser",
        "ignore_row_if",
    )
    condition_value_keys = ()

    @column_pair_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column_A, column_B, **kwargs):  # noqa: N803 (GX passes the columns by these names)
        return column_A != column_B


class ExpectColumnPairValuesToDiffer(ColumnPairMapExpectation):
    """Expect ``column_A`` to differ from ``column_B`` on at least ``mostly`` of the rows.

    The label-leakage guard: with ``column_B`` the label and a small ``mostly`` (0.01), a feature
    that equals the label on (nearly) every row fails and is named. Row-wise, so batched
    validation combines it exactly.
    """

    ignore_row_if: Literal["both_values_are_missing", "either_value_is_missing", "neither"] = (
        "both_values_are_missing"
    )
    map_metric = "column_pair_values.differ"
    success_keys = ("column_A", "column_B", "ignore_row_if", "mostly")
    args_keys = ("column_A", "column_B")
    library_metadata: ClassVar[dict] = {"maturity": "experimental", "tags": ["airloop"], "contributors": []}
