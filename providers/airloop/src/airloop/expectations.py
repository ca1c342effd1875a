"""Expectations Airloop adds to Great Expectations' own; importing this module registers them.

- ``expect_column_pair_values_to_differ``: two columns differ on at least ``mostly`` of the rows;
- ``expect_column_to_not_predict_label``: a feature alone does not (almost) perfectly predict the
  label: the label leakage guard of the reference suite and of every profiled one.

Imported by the validation step only (it imports Great Expectations at module level).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypedDict

from great_expectations.core.metric_domain_types import MetricDomainTypes
from great_expectations.execution_engine import PandasExecutionEngine
from great_expectations.expectations.expectation import ColumnAggregateExpectation, ColumnPairMapExpectation
from great_expectations.expectations.metrics.column_aggregate_metric_provider import (
    ColumnAggregateMetricProvider,
)
from great_expectations.expectations.metrics.map_metric_provider import (
    ColumnPairMapMetricProvider,
    column_pair_condition_partial,
)
from great_expectations.expectations.metrics.metric_provider import metric_value

if TYPE_CHECKING:
    import pandas as pd

# A feature that fixes this share of the errors of always guessing the commonest label is the label.
MAX_SKILL = 0.95
# Numbers with more distinct values than this are cut into this many equal-count bins.
_BINS = 32
_LIBRARY_METADATA: dict[str, Any] = {"maturity": "experimental", "tags": ["airloop"], "contributors": []}


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

    Row-wise, so batched validation combines it exactly.
    """

    ignore_row_if: Literal["both_values_are_missing", "either_value_is_missing", "neither"] = (
        "both_values_are_missing"
    )
    map_metric = "column_pair_values.differ"
    success_keys = ("column_A", "column_B", "ignore_row_if", "mostly")
    args_keys = ("column_A", "column_B")
    library_metadata: ClassVar[dict] = _LIBRARY_METADATA


class Skill(TypedDict):
    """How well one feature alone predicts the label, on the rows where both have a value.

    ``accuracy``: leave-one-out accuracy of guessing each row's label as the commonest label among
    the other rows with the same feature value (or bin); ``baseline``: the share of the commonest
    label, what guessing it always scores; ``skill``: the share of the baseline's errors the feature
    fixes, ``(accuracy - baseline) / (1 - baseline)``: 0 for a useless feature, 1 for the label itself.
    """

    accuracy: float | None
    baseline: float | None
    skill: float
    rows: int


def label_skill(feature: pd.Series, label: pd.Series) -> Skill:
    """``Skill`` of ``feature`` for ``label``: one group-by, cheap on any number of rows.

    A feature's values are its groups when it has few (strings, categories, integers, a copy of a
    class label); a number with more than ``_BINS`` values is cut into ``_BINS`` equal-count bins by
    rank, so a monotone function of the label is caught as surely as a copy. A numeric label with
    many values (regression) is binned the same way. Leaving each row out of its own group keeps a
    feature of unique values (an id) from "predicting" every row: its groups tell nothing.
    """
    import numpy as np
    import pandas as pd

    both = pd.DataFrame({"x": feature.to_numpy(), "y": label.to_numpy()}).dropna()
    rows = len(both)
    if rows < 2 or both["y"].nunique() < 2:
        return {"accuracy": None, "baseline": None, "skill": 0.0, "rows": rows}
    (groups, width), (classes, kinds) = (_codes(both[side]) for side in ("x", "y"))
    counts = np.bincount(groups * kinds + classes, minlength=width * kinds).reshape(width, kinds)
    counts = counts[counts.sum(axis=1) > 0]
    credit = np.zeros(counts.shape)
    for k in range(kinds):
        own = counts[:, k] - 1  # the row itself left out
        other = np.delete(counts, k, axis=1).max(axis=1)
        credit[:, k] = np.where(own > other, 1.0, np.where(own == other, 0.5, 0.0))
    accuracy = float((counts * credit).sum() / rows)
    baseline = float(counts.sum(axis=0).max() / rows)
    return {
        "accuracy": accuracy,
        "baseline": baseline,
        "skill": (accuracy - baseline) / (1 - baseline),
        "rows": rows,
    }


def _codes(values: pd.Series) -> tuple[Any, int]:
    """Group codes and their number: the values themselves, or equal-count rank bins of a number with
    many values."""
    import numpy as np
    import pandas as pd

    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    if numeric and values.nunique() > _BINS:
        bins = np.empty(len(values), dtype=np.int64)
        bins[np.argsort(values.to_numpy(), kind="stable")] = np.arange(len(values)) * _BINS // len(values)
        return bins, _BINS
    codes, uniques = pd.factorize(values)
    return codes, len(uniques)


class ColumnLabelSkill(ColumnAggregateMetricProvider):
    metric_name = "column.label_skill"
    value_keys = ("label",)

    @metric_value(engine=PandasExecutionEngine)
    def _pandas(
        cls,
        execution_engine: PandasExecutionEngine,
        metric_domain_kwargs: dict,
        metric_value_kwargs: dict,
        **kwargs: Any,
    ) -> Skill:
        frame, _, accessor = execution_engine.get_compute_domain(
            metric_domain_kwargs, MetricDomainTypes.COLUMN
        )
        label = metric_value_kwargs["label"]
        if label not in frame.columns:
            raise ValueError(f"label column {label!r} is not in the table")
        return label_skill(frame[accessor["column"]], frame[label])


class ExpectColumnToNotPredictLabel(ColumnAggregateExpectation):
    """Expect ``column`` alone to predict ``label`` with a skill (``label_skill``) below ``max_skill``.

    The label leakage guard, per feature: a feature that equals the label, or almost perfectly
    predicts it (a copy, a recoding, a monotone function, the label with a little noise), fails and is
    named. It needs the whole column and the label: batched validation reads those two columns alone.
    """

    label: str
    max_skill: float = MAX_SKILL
    metric_dependencies = ("column.label_skill",)
    success_keys = ("label", "max_skill")
    args_keys = ("column", "label", "max_skill")
    library_metadata: ClassVar[dict] = _LIBRARY_METADATA

    def _validate(
        self, metrics: dict, runtime_configuration: dict | None = None, execution_engine: Any = None
    ) -> dict[str, Any]:
        found: Skill = metrics["column.label_skill"]
        bound = self._get_success_kwarg("max_skill", MAX_SKILL)
        return {"success": found["skill"] < bound, "result": {"observed_value": dict(found)}}
