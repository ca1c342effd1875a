"""Profiling: a starter expectation suite from a trusted reference table."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypedDict

from airloop.steps.data.requests import ProfileRequest
from airloop.tables import read_table

if TYPE_CHECKING:
    import pandas as pd


class Profiled(TypedDict):
    """The suite ``profile`` wrote: where, its name, how many expectations, from how many rows."""

    suite_path: str
    name: str
    expectations: int
    rows: int


def _expect(kind: str, **kwargs: Any) -> dict[str, Any]:
    return {"type": f"expect_{kind}", "kwargs": kwargs}


def _plain(value: Any) -> Any:
    """A numpy/pandas scalar as the Python value a JSON or YAML suite file can hold."""
    return value.item() if hasattr(value, "item") else value


def profile_suite(
    df: pd.DataFrame,
    name: str,
    *,
    key: str | None = None,
    label: str | None = None,
    margin: float = ProfileRequest.margin,
    max_categories: int = 20,
    row_factor: float = 10.0,
) -> dict[str, Any]:
    """A starter suite from a trusted reference table, for a person to review before it gates anything.

    - the columns in their order; a row count within [rows / ``row_factor``, rows x ``row_factor``];
    - per column its dtype, and not null (a column with nulls may have ``1 + margin`` times its null
      fraction);
    - numbers: a range widened by ``margin`` x the observed span on each side; columns with at most
      ``max_categories`` distinct values (strings, categories, booleans, integers): that value set;
    - ``key``: unique; ``label``: no other column equals it on 99% of the rows or more (leakage).
    """
    import pandas as pd

    if df.empty:
        raise ValueError("cannot profile an empty table")
    for column, role in ((key, "key"), (label, "label")):
        if column is not None and column not in df.columns:
            raise ValueError(f"{role} column {column!r} is not among the columns {list(df.columns)}")
    rows = len(df)
    expectations = [
        _expect("table_columns_to_match_ordered_list", column_list=[str(c) for c in df.columns]),
        _expect(
            "table_row_count_to_be_between",
            min_value=max(1, math.floor(rows / row_factor)),
            max_value=math.ceil(rows * row_factor),
        ),
    ]
    for column_name, values in df.items():
        column = str(column_name)
        nulls = float(values.isna().mean())
        if nulls == 0:
            expectations.append(_expect("column_values_to_not_be_null", column=column))
        elif nulls < 1:
            allowed = min(1.0, nulls * (1 + margin))
            expectations.append(
                _expect(
                    "column_values_to_not_be_null",
                    column=column,
                    mostly=math.floor((1 - allowed) * 10_000) / 10_000,
                )
            )
        present = values.dropna()
        # GX checks an object column value by value, against the values' Python types.
        if values.dtype == object:
            types = sorted({type(value).__name__ for value in present}) or ["str"]
        else:
            types = [str(values.dtype)]
        expectations.append(_expect("column_values_to_be_in_type_list", column=column, type_list=types))
        categorical = not (
            pd.api.types.is_float_dtype(values) or pd.api.types.is_datetime64_any_dtype(values)
        )
        if column == key:
            expectations.append(_expect("column_values_to_be_unique", column=column))
        elif categorical and 0 < present.nunique() <= max_categories:
            value_set = sorted((_plain(v) for v in present.unique()), key=lambda v: (str(type(v)), v))
            expectations.append(_expect("column_values_to_be_in_set", column=column, value_set=value_set))
        elif (
            pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values) and len(present)
        ):
            low, high = float(present.min()), float(present.max())
            pad = margin * (high - low) or 1.0
            expectations.append(
                _expect(
                    "column_values_to_be_between", column=column, min_value=low - pad, max_value=high + pad
                )
            )
    if label is not None:
        expectations.extend(_leakage_guards(df, label))
    return {
        "name": name,
        "expectations": expectations,
        "meta": {"profiled_rows": rows, "notes": "Profiled from a reference table: review before use."},
    }


# A feature that equals the label on 99% of the rows or more is the label.
_LEAK_MOSTLY = 0.01


def _leakage_guards(df: pd.DataFrame, label: str) -> list[dict[str, Any]]:
    guards = []
    for column_name in df.columns:
        column = str(column_name)
        if column == label:
            continue
        differ = float((df[column_name] != df[label]).mean())
        if differ < _LEAK_MOSTLY:
            raise ValueError(
                f"column {column!r} equals the label {label!r} on {1 - differ:.1%} of the"
                " reference rows: the reference leaks the label"
            )
        guards.append(
            _expect("column_pair_values_to_differ", column_A=column, column_B=label, mostly=_LEAK_MOSTLY)
        )
    return guards


def profile(request: ProfileRequest | Mapping[str, Any]) -> Profiled:
    """Write the suite ``profile_suite`` drafts from ``data_uri`` to ``out`` (YAML for ``.yml``/``.yaml``,
    else JSON)."""
    import yaml

    request = ProfileRequest.parse(request)
    if not request.data_uri or not request.out:
        raise ValueError("request needs 'data_uri' and 'out'")
    out = request.out
    name = request.name or os.path.splitext(os.path.basename(out))[0]
    frame = read_table(request.data_uri, request.storage_options)
    suite = profile_suite(frame, name, key=request.key, label=request.label, margin=float(request.margin))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp"
    with open(tmp, "w") as handle:
        if out.endswith((".yml", ".yaml")):
            yaml.safe_dump(suite, handle, sort_keys=False)
        else:
            json.dump(suite, handle, indent=2)
            handle.write("\n")
    os.replace(tmp, out)
    return {
        "suite_path": out,
        "name": name,
        "expectations": len(suite["expectations"]),
        "rows": suite["meta"]["profiled_rows"],
    }
