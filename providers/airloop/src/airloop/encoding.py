"""A model's input encoding: table rows as clients send them (numbers, strings, missing values) -> the
float32 rows its OpenVINO IR takes. The one pre-step outside the IR, applied by every server of it.

A scikit-learn classifier trained on a table with categorical (string) features or missing values is a
``Pipeline`` of ``prepare`` (a ``ColumnTransformer``, ``preprocessor``) and the classifier:

- numeric columns: ``SimpleImputer(strategy="median")``: a missing value becomes the training median;
- categorical columns: missing values (``None`` or NaN) as NaN, then ``OrdinalEncoder``: each category
  its index in the sorted training vocabulary, a missing value ``MISSING``, a category training never
  saw ``UNKNOWN`` (so is a missing value of a column that had none in training).

The conversion turns the classifier alone into the IR, and ``export`` reads the fitted ``prepare`` into
the IR's manifest (``"encoding"``): ``{"inputs": [{"column", "kind": "numeric", "fill"} | {"column",
"kind": "categorical", "categories", "missing", "unknown"}, ...]}``, one entry per IR input, in its
order. ``encode`` applies it to raw rows with numpy only (the serving runtimes have no scikit-learn).
The parity gate compares the whole scikit-learn pipeline on the raw holdout rows with the IR on what
``encode`` makes of the same rows, so a vocabulary or fill value that serving got wrong fails it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

# The codes of a missing value and of an unknown category in a categorical input (a tree splits them
# off the vocabulary's indices, 0..n-1, like any other value).
MISSING, UNKNOWN = -2, -1
PREPARE = "prepare"


def categorical_columns(frame: pd.DataFrame, declared: Sequence[str] = ()) -> list[str]:
    """The columns of ``frame`` encoded as categories: those ``declared``, and every column that is not
    numeric (strings; booleans are numbers)."""
    from pandas.api import types

    unknown = sorted(set(declared) - set(frame.columns))
    if unknown:
        raise ValueError(
            f"categorical {unknown} are not features of the table: its features are {list(frame)}"
        )
    return [c for c in frame.columns if c in declared or not types.is_numeric_dtype(frame[c])]


def needs_encoding(frame: pd.DataFrame, categorical: Sequence[str]) -> bool:
    """Whether a model of these features needs ``prepare``: a categorical column or a missing value."""
    return bool(categorical) or bool(frame.isna().to_numpy().any())


def missing_as_nan(frame: Any) -> Any:
    """``None`` as NaN (parquet reads a missing string as ``None``, which ``OrdinalEncoder`` would
    take for a category): the categorical columns' first step."""
    import pandas as pd

    frame = pd.DataFrame(frame).astype(object)
    return frame.where(frame.notna(), np.nan)


def preprocessor(frame: pd.DataFrame, categorical: Sequence[str]) -> Any:
    """The unfitted ``prepare`` step for the features of ``frame``."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, OrdinalEncoder

    numeric = [c for c in frame.columns if c not in categorical]
    encoder = OrdinalEncoder(
        handle_unknown="use_encoded_value", unknown_value=UNKNOWN, encoded_missing_value=MISSING
    )
    categories = Pipeline(
        [
            ("missing", FunctionTransformer(missing_as_nan, feature_names_out="one-to-one")),
            ("encode", encoder),
        ]
    )
    return ColumnTransformer(
        [
            ("numeric", SimpleImputer(strategy="median", keep_empty_features=True), numeric),
            ("categorical", categories, list(categorical)),
        ]
    )


def with_encoding(fit: Any, categorical: Sequence[str]) -> Any:
    """``fit`` (``(features, target) -> fitted classifier``) behind ``prepare``: a function that returns
    the fitted ``Pipeline``."""

    def fit_pipeline(features: pd.DataFrame, target: pd.Series) -> Any:
        from sklearn.pipeline import Pipeline

        prepare = preprocessor(features, categorical)
        model = fit(prepare.fit_transform(features), target)
        return Pipeline([(PREPARE, prepare), ("model", model)])

    return fit_pipeline


def export(prepare: Any) -> dict[str, Any]:
    """The fitted ``prepare`` step as the manifest's ``encoding``; ValueError for a step of another
    make, naming what it holds and what is supported."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer

    supported = (
        "a ColumnTransformer of a SimpleImputer (numeric columns) and of missing_as_nan + OrdinalEncoder "
        f"(handle_unknown='use_encoded_value', unknown_value={UNKNOWN:g}, encoded_missing_value={MISSING:g}),"
        " as airloop.encoding.preprocessor makes"
    )
    if not isinstance(prepare, ColumnTransformer):
        raise ValueError(f"the pipeline's first step is a {type(prepare).__name__}: supported is {supported}")
    inputs: list[dict[str, Any]] = []
    for name, step, columns in prepare.transformers_:
        if name == "remainder" and step == "drop":
            continue
        if isinstance(step, SimpleImputer):
            inputs += [
                {"column": str(c), "kind": "numeric", "fill": float(v)}
                for c, v in zip(columns, step.statistics_, strict=True)
            ]
        elif _is_categories(step):
            inputs += [
                {
                    "column": str(c),
                    "kind": "categorical",
                    "categories": [_plain(v) for v in values if not _missing(v)],
                    # A column without missing values in training: OrdinalEncoder takes one for unknown.
                    "missing": MISSING if any(_missing(v) for v in values) else UNKNOWN,
                    "unknown": UNKNOWN,
                }
                for c, values in zip(columns, step[-1].categories_, strict=True)
            ]
        else:
            raise ValueError(
                f"the pipeline's {name!r} transformer is a {step!r:.80}: supported is {supported}"
            )
    return {"inputs": inputs}


def _is_categories(step: Any) -> bool:
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, OrdinalEncoder

    if not isinstance(step, Pipeline) or len(step.steps) != 2:
        return False
    first, last = step[0], step[-1]
    return (
        isinstance(first, FunctionTransformer)
        and first.func is missing_as_nan
        and isinstance(last, OrdinalEncoder)
        and last.handle_unknown == "use_encoded_value"
        and last.unknown_value == UNKNOWN
        and last.encoded_missing_value == MISSING
    )


def encode(encoding: dict[str, Any], feature_names: Sequence[str], rows: Any) -> np.ndarray:
    """Raw ``rows`` (``[rows, features]`` in ``feature_names`` order: numbers, strings, ``None``/NaN)
    as the float32 rows the IR takes. ValueError names a numeric feature's value that is no number."""
    rows = np.asarray(rows, dtype=object)
    if rows.ndim != 2 or rows.shape[1] != len(feature_names):
        raise ValueError(f"expected rows of {len(feature_names)} features, got shape {list(rows.shape)}")
    where = {name: j for j, name in enumerate(feature_names)}
    out = np.empty((len(rows), len(encoding["inputs"])), dtype=np.float32)
    for i, spec in enumerate(encoding["inputs"]):
        values = rows[:, where[spec["column"]]]
        if spec["kind"] == "numeric":
            out[:, i] = [spec["fill"] if _missing(v) else _number(v, spec["column"]) for v in values]
        else:
            lookup = {value: float(index) for index, value in enumerate(spec["categories"])}
            numbers = bool(spec["categories"]) and not isinstance(spec["categories"][0], str)
            out[:, i] = [
                spec["missing"] if _missing(v) else lookup.get(_key(v, numbers), spec["unknown"])
                for v in values
            ]
    return out


def _key(value: Any, numbers: bool) -> Any:
    """A value as the vocabulary holds it: a number for numeric categories, else the string (a V2
    request's BYTES tensor holds bytes)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not numbers:
        return value if isinstance(value, str) else str(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # no number: an unknown category


def _missing(value: Any) -> bool:
    """None, and NaN of any float type (``value != value``); pandas' NA, whose comparisons are NA."""
    if value is None:
        return True
    try:
        return bool(value != value)
    except TypeError:
        return True


def _number(value: Any, column: str) -> float:
    if isinstance(value, (str, bytes)) and not value.strip():
        raise ValueError(f"feature {column!r} must be a number or null, got {value!r:.50}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"feature {column!r} must be a number or null, got {value!r:.50}") from None


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
