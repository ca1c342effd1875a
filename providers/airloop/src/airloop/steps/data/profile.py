"""Profiling: a starter expectation suite from a trusted reference table, and what it decided per column."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from airloop.steps.data.requests import ProfileRequest

if TYPE_CHECKING:
    import pandas as pd

Kind = Literal["key", "categorical", "numeric", "other"]
# An integer column is a category when it has at most MAX_CATEGORIES values, each seen on at least
# MIN_COUNT rows: a value set drawn from a sample in which some value is rare is likely incomplete
# (Good-Turing: the chance that a new row shows an unseen value is about the share of values seen
# once), and integer measurements (counts, pixel intensities) have such a tail.
MAX_CATEGORIES = 20
MIN_COUNT = 10
# A column with nulls may have this much more than its null fraction.
NULL_SLACK = 0.5
# A feature that predicts the label this well (airloop.expectations.label_skill) is the label.
MAX_SKILL = 0.95


class Decision(TypedDict):
    """What profiling decided for one column: its ``kind``, ``why``, and the value ``rule`` drafted."""

    column: str
    kind: Kind
    why: str
    rule: str


class Profiled(TypedDict):
    """The suite ``profile`` wrote: where, its name, how many expectations, from how many rows, and
    the decision per column."""

    suite_path: str
    name: str
    expectations: int
    rows: int
    columns: list[Decision]


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
    mostly: float = ProfileRequest.mostly,
    categorical: Collection[str] = (),
    numeric: Collection[str] = (),
    row_factor: float = 10.0,
) -> dict[str, Any]:
    """A starter suite from a trusted reference table, for a person to review before it gates anything.

    - the columns in their order; a row count within [rows / ``row_factor``, rows x ``row_factor``];
    - per column its dtype, and not null (a column with nulls may have ``1 + NULL_SLACK`` times its
      null fraction);
    - per column a kind: strings, booleans and categories are categorical; integers too when they
      have at most ``MAX_CATEGORIES`` values, each on at least ``MIN_COUNT`` rows, else they are
      numeric like floats; datetimes get no value rule; ``categorical`` / ``numeric`` name columns
      whose kind is given instead;
    - categorical: the value set (up to ``MAX_CATEGORIES`` values, or any number when given);
      numeric: the observed range widened on each side by ``margin`` times its span, or, for a column
      constant in the sample, by ``margin`` times its value (1 for 0), so the range never collapses;
      both hold for at least ``mostly`` of the rows;
    - ``key``: unique; ``label``: no other column predicts it with a skill of ``MAX_SKILL`` or more
      (``expect_column_to_not_predict_label``, label leakage); a reference in which one does is refused.

    ``meta["columns"]`` records every column's decision (``Decision``: kind, why, rule).
    """
    if df.empty:
        raise ValueError("cannot profile an empty table")
    for column, role in ((key, "key"), (label, "label")):
        if column is not None and column not in df.columns:
            raise ValueError(f"{role} column {column!r} is not among the columns {list(df.columns)}")
    names = [str(c) for c in df.columns]
    for given, option in ((categorical, "categorical"), (numeric, "numeric")):
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"{option} columns {unknown} are not among the columns {names}")
    both = sorted(set(categorical) & set(numeric))
    if both:
        raise ValueError(f"columns {both} are given as both categorical and numeric")
    if not 0 < mostly <= 1:
        raise ValueError(f"mostly must be in (0, 1], got {mostly!r}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    rows = len(df)
    expectations = [
        _expect("table_columns_to_match_ordered_list", column_list=names),
        _expect(
            "table_row_count_to_be_between",
            min_value=max(1, math.floor(rows / row_factor)),
            max_value=math.ceil(rows * row_factor),
        ),
    ]
    share = {} if mostly == 1 else {"mostly": mostly}
    decisions: list[Decision] = []
    for column_name, values in df.items():
        column = str(column_name)
        present = values.dropna()
        notes = []
        nulls = float(values.isna().mean())
        if nulls == 0:
            expectations.append(_expect("column_values_to_not_be_null", column=column))
        elif nulls < 1:
            allowed = min(1.0, nulls * (1 + NULL_SLACK))
            expectations.append(
                _expect(
                    "column_values_to_not_be_null",
                    column=column,
                    mostly=math.floor((1 - allowed) * 10_000) / 10_000,
                )
            )
            notes.append(f"nulls at most {allowed:.1%}")
        # GX checks an object column value by value, against the values' Python types.
        if values.dtype == object:
            types = sorted({type(value).__name__ for value in present}) or ["str"]
        else:
            types = [str(values.dtype)]
        expectations.append(_expect("column_values_to_be_in_type_list", column=column, type_list=types))
        kind, why = _kind(column, values, present, key, categorical, numeric)
        rule = "type and nulls only"
        if kind == "key":
            expectations.append(_expect("column_values_to_be_unique", column=column))
            rule = "unique"
        elif (
            kind == "categorical"
            and 0 < present.nunique()
            and (column in categorical or present.nunique() <= MAX_CATEGORIES)
        ):
            value_set = sorted((_plain(v) for v in present.unique()), key=lambda v: (str(type(v)), v))
            expectations.append(
                _expect("column_values_to_be_in_set", column=column, value_set=value_set, **share)
            )
            rule = f"in {value_set}" if len(value_set) <= 6 else f"in a set of {len(value_set)} values"
        elif kind == "categorical":
            rule = f"no value set: {present.nunique()} values, more than {MAX_CATEGORIES}"
        elif kind == "numeric" and len(present):
            low, high = float(present.min()), float(present.max())
            span = high - low
            scale = span or abs(low) or 1.0
            pad = margin * scale
            expectations.append(
                _expect(
                    "column_values_to_be_between",
                    column=column,
                    min_value=low - pad,
                    max_value=high + pad,
                    **share,
                )
            )
            seen = f"observed {low:g} to {high:g}" if span else f"constant {low:g}"
            widened = f"{margin:g} x its span" if span else (f"{margin:g} x its value" if low else f"{pad:g}")
            rule = f"between {low - pad:g} and {high + pad:g} ({seen}, widened by {widened})"
        if share and kind in ("categorical", "numeric") and not rule.startswith(("no ", "type")):
            rule += f", mostly {mostly:g}"
        decisions.append({"column": column, "kind": kind, "why": why, "rule": "; ".join([rule, *notes])})
    if label is not None:
        guarded = _leakage_guards(df, label, key)
        expectations.extend(guarded)
        for decision in decisions:
            if decision["column"] in {guard["kwargs"]["column"] for guard in guarded}:
                decision["rule"] += f"; does not predict {label!r}"
    return {
        "name": name,
        "expectations": expectations,
        "meta": {
            "profiled_rows": rows,
            "notes": "Profiled from a reference table: review before use.",
            "columns": {
                d["column"]: {"kind": d["kind"], "why": d["why"], "rule": d["rule"]} for d in decisions
            },
        },
    }


def _kind(
    column: str,
    values: pd.Series,
    present: pd.Series,
    key: str | None,
    categorical: Collection[str],
    numeric: Collection[str],
) -> tuple[Kind, str]:
    """A column's kind and why: given, or read from its dtype and, for integers, its value counts."""
    from pandas.api import types

    number = types.is_numeric_dtype(values) and not types.is_bool_dtype(values)
    if column == key:
        return "key", "the key"
    if column in categorical:
        return "categorical", "given"
    if column in numeric:
        if not number:
            raise ValueError(
                f"column {column!r} holds {values.dtype} values, not numbers: it cannot be numeric"
            )
        return "numeric", "given"
    if types.is_datetime64_any_dtype(values) or types.is_timedelta64_dtype(values):
        return "other", f"{values.dtype}"
    if not number:
        return "categorical", f"{values.dtype} values"
    if not types.is_integer_dtype(values):
        return "numeric", f"{values.dtype} values"
    counts = present.value_counts()
    if 2 <= len(counts) <= MAX_CATEGORIES and counts.min() >= MIN_COUNT:
        return "categorical", f"{len(counts)} integer values, each on {MIN_COUNT}+ rows"
    if len(counts) > MAX_CATEGORIES:
        return "numeric", f"{len(counts)} integer values, more than {MAX_CATEGORIES}"
    if len(counts) < 2:
        return "numeric", "integers, one value"
    rarest = int(counts.min())
    return "numeric", f"{len(counts)} integer values, the rarest on {rarest} row{'s' * (rarest != 1)}"


def _leakage_guards(df: pd.DataFrame, label: str, key: str | None) -> list[dict[str, Any]]:
    """One ``expect_column_to_not_predict_label`` per feature; raises when the reference already leaks."""
    from airloop.expectations import label_skill

    guards = []
    for column_name in df.columns:
        column = str(column_name)
        if column in (label, key):
            continue
        found = label_skill(df[column_name], df[label])
        if found["skill"] >= MAX_SKILL:
            equal = float((df[column_name] == df[label]).mean())
            how = (
                f"equals the label {label!r} on {equal:.1%} of the reference rows"
                if equal >= 0.99
                else f"predicts the label {label!r} with skill {found['skill']:.3f} (accuracy"
                f" {found['accuracy']:.3f}) on the reference rows"
            )
            raise ValueError(f"column {column!r} {how}: the reference leaks the label")
        guards.append(_expect("column_to_not_predict_label", column=column, label=label, max_skill=MAX_SKILL))
    return guards


def profile(request: ProfileRequest | Mapping[str, Any]) -> Profiled:
    """Write the suite ``profile_suite`` drafts from ``data_uri`` to ``out`` (YAML for ``.yml``/``.yaml``,
    else JSON)."""
    import yaml

    from airloop.tables import read_table

    request = ProfileRequest.parse(request)
    if not request.data_uri or not request.out:
        raise ValueError("request needs 'data_uri' and 'out'")
    out = request.out
    name = request.name or os.path.splitext(os.path.basename(out))[0]
    frame = read_table(request.data_uri, request.storage_options)
    suite = profile_suite(
        frame,
        name,
        key=request.key,
        label=request.label,
        margin=float(request.margin),
        mostly=float(request.mostly),
        categorical=request.categorical or (),
        numeric=request.numeric or (),
    )
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
        "columns": [
            {"column": column, "kind": d["kind"], "why": d["why"], "rule": d["rule"]}
            for column, d in suite["meta"]["columns"].items()
        ],
    }
