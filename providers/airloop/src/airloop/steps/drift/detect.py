"""Detect drift between a reference data set and a current window of serving data.

``detect(request) -> result`` is a step: plain Python, JSON-able request in, JSON-able result out,
no Airflow import. The window is checked before any test, and every shape gets a verdict with a
reason: an empty window, or one with too few effective rows (repeats counted once), is
``insufficient_data`` (never ``no_drift``), one with missing or mistyped columns is
``invalid_window``. Backends: ``scipy`` (default, runs anywhere) and ``alibi`` (alibi-detect, in
the ``serving`` runtime, or the ``torch`` runtime for its ``mmd`` method), registered in
``base.DETECTORS`` and imported when a request names them; see docs/drift.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from airloop.steps.drift.base import CORRECTIONS, PER_FEATURE, Detector, available, flag, get, register
from airloop.steps.drift.requests import DetectRequest, DriftResult, FeatureScore, Severity

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["CORRECTIONS", "PER_FEATURE", "Detector", "available", "detect", "flag", "get", "register"]

SEVERITY = {"low": 0.0, "medium": 0.25, "high": 0.5}


def detect(request: DetectRequest | Mapping[str, Any]) -> DriftResult:
    """Compare ``current_uri`` with ``reference_uri`` (Parquet or CSV files, Parquet folders; local or URIs
    pyarrow reads); the request's fields are described in docs/drift.md and ``DetectRequest``.

    ``method`` "ks" or "cvm" runs one test per feature (Kolmogorov-Smirnov or Cramer-von Mises on
    numeric features, chi-squared on categorical ones); "mmd" one test of all features (alibi only).
    ``min_rows`` is also the fewest non-missing values a feature needs on each side to be tested.
    """
    options = _parse(request)
    detector_class = get(options.backend)
    thresholds = _severity_thresholds(options.severity)

    reference = _read(options.reference_uri, options.features)
    features = options.features or list(reference.columns)
    absent = [f for f in features if f not in reference.columns]
    if absent:
        raise ValueError(f"features not in the reference data {options.reference_uri!r}: {absent}")
    categorical = _categorical(reference, features, options.categorical)
    detector = detector_class(
        p_val=options.p_val,
        correction=options.correction,
        categorical=categorical,
        min_rows=options.min_rows,
        method=options.method,
    )
    detector.check_params()  # a bad request fails whatever the window holds
    current = _read(options.current_uri, features)

    tested, valued, effective = _effective(reference, current, features)
    result: DriftResult = {
        "verdict": "no_drift",
        "severity": "none",
        "backend": options.backend,
        "method": options.method,
        "n_reference": len(reference),
        "n_current": len(current),
        "n_effective": effective,
        "drifted_features": [],
        "share_drifted": 0.0,
        "features": {},
        "report_json": None,
        "report_html": None,
        "message": "",
    }
    # Every window shape gets a verdict and a reason: an empty one has no schema to check (a window
    # of no requests has no columns at all), so it is too small, not malformed.
    problem = _window_problem(reference, current, features) if len(current) else ""
    if problem:
        result["verdict"], result["message"] = "invalid_window", problem
    elif not len(current):
        result["verdict"] = "insufficient_data"
        result["message"] = f"the window is empty: no rows to test, at least {options.min_rows} needed"
    elif min(len(reference), effective) < options.min_rows:
        discounted = [
            text
            for text, applies in (
                (f"{len(current) - valued} without any value", valued < len(current)),
                (f"{valued - effective} repeats beyond the reference's own rate", effective < valued),
            )
            if applies
        ]
        counted = f" ({effective} effective: {', '.join(discounted)})" if discounted else ""
        result["verdict"] = "insufficient_data"
        result["message"] = (
            f"too few rows to judge drift: reference {len(reference)}, current {len(current)}"
            f"{counted}, at least {options.min_rows} needed on each side"
        )
    else:
        factor = effective / len(tested)
        _judge(result, detector.fit(reference).score(tested), thresholds, options, factor)
        if len(tested) < len(current):
            result["message"] += f"; {len(current) - len(tested)} repeated rows tested once"

    if options.report_dir:
        from airloop.steps.drift import report

        shown = [] if problem else [f for f in features if f in current.columns]
        plots = report.distributions(reference, current, shown, categorical)
        result = report.write(result, plots, options.report_dir)
    return result


def _parse(request: DetectRequest | Mapping[str, Any]) -> DetectRequest:
    options = DetectRequest.parse(request)
    empty = [name for name in ("reference_uri", "current_uri") if not getattr(options, name)]
    if empty:
        raise ValueError(f"drift request lacks {empty}")
    for key in ("features", "categorical"):
        value = getattr(options, key)
        if value is not None and not isinstance(value, list):
            raise ValueError(f"{key!r} must be a list of column names, got {value!r}")
    if options.features == []:
        raise ValueError("'features' is empty: leave it out to use every reference column")
    return options


def _severity_thresholds(given: dict[str, float] | None) -> dict[Severity, float]:
    thresholds = {**SEVERITY, **(given or {})}
    if set(thresholds) != set(SEVERITY):
        raise ValueError(f"severity takes the levels {list(SEVERITY)}, got {sorted(given or {})}")
    levels = [thresholds[level] for level in SEVERITY]
    if not all(0 <= t <= 1 for t in levels) or levels != sorted(levels):
        raise ValueError(f"severity thresholds must rise from low to high within [0, 1], got {thresholds}")
    return cast("dict[Severity, float]", thresholds)  # the levels were checked above


def _read(uri: str, columns: list[str] | None) -> pd.DataFrame:
    """Read the wanted columns that exist (all when ``columns`` is None); absent ones are judged later."""
    import pyarrow.dataset as ds

    from airloop.tables import is_csv

    dataset = ds.dataset(uri, format="csv" if is_csv(uri) else "parquet")
    present = None if columns is None else [c for c in columns if c in dataset.schema.names]
    return dataset.to_table(columns=present).to_pandas()


def _is_numeric(column: pd.Series) -> bool:
    from pandas.api import types

    return types.is_numeric_dtype(column) and not types.is_bool_dtype(column)


def _categorical(reference: pd.DataFrame, features: list[str], given: list[str] | None) -> list[str]:
    """The requested categorical features, plus every feature whose reference values are not numbers."""
    given = given or []
    unknown = [f for f in given if f not in features]
    if unknown:
        raise ValueError(f"categorical features not among the features: {unknown}")
    return [f for f in features if f in given or not _is_numeric(reference[f])]


def _window_problem(reference: pd.DataFrame, current: pd.DataFrame, features: list[str]) -> str:
    """Why the current window cannot be compared with the reference, or "" when it can."""
    absent = [f for f in features if f not in current.columns]
    if absent:
        return f"current window lacks the columns {absent}"
    # A column with no values at all has no type worth checking: it is reported as untested instead.
    mistyped = [
        f"{f} ({reference[f].dtype} in the reference, {current[f].dtype} now)"
        for f in features
        if not current[f].isna().all() and _is_numeric(current[f]) != _is_numeric(reference[f])
    ]
    return f"current window has columns of the wrong type: {', '.join(mistyped)}" if mistyped else ""


def _effective(
    reference: pd.DataFrame, current: pd.DataFrame, features: list[str]
) -> tuple[pd.DataFrame, int, int]:
    """The window to test, its rows with any value, and how many of those count: its effective size.

    The tests assume independent rows, so repeats count once beyond the rate at which the reference
    repeats its own rows in a seeded sample of the window's size: natural repeats (features with few
    values) are not held against a window. Where the reference repeats no row at all, every repeat is
    a request sent or logged again, and the window is tested without them.
    """
    present = [f for f in features if f in current.columns]
    rows = current[present].dropna(how="all") if present else current.iloc[:0]
    if rows.empty:
        return current, 0, 0
    sample = reference[present].dropna(how="all")
    sample = sample.sample(n=min(len(rows), len(sample)), random_state=0)
    natural = float((~sample.duplicated()).mean()) if len(sample) else 1.0
    repeated = rows.duplicated()
    effective = round(len(rows) * min(1.0, float((~repeated).mean()) / natural))
    if natural == 1.0 and repeated.any():
        current = current.loc[~current[present].duplicated()]
    return current, len(rows), effective


def _judge(
    result: DriftResult,
    scores: dict[str, FeatureScore],
    thresholds: dict[Severity, float],
    options: DetectRequest,
    factor: float,
) -> None:
    """Fill in ``result``'s verdict on the tested features.

    A tested feature counts for the verdict and its severity only with ``min_rows`` effective values
    (its non-missing values, scaled by the share of the window's rows that count).
    """
    result["features"] = scores
    tested = [f for f, s in scores.items() if s["tested"]]
    counted = [f for f in tested if scores[f]["n_cur"] * factor >= options.min_rows]
    untested = [f for f, s in scores.items() if not s["tested"]]
    note = (
        f"; untested (fewer than {options.min_rows} non-missing values on a side): {untested}"
        if untested
        else ""
    )
    thin = [f for f in tested if f not in counted]
    if thin:
        note += (
            f"; not counted (fewer than {options.min_rows} effective values, repeats counted once): {thin}"
        )
    if not counted:
        result["verdict"] = "insufficient_data"
        result["message"] = f"no feature has {options.min_rows} non-missing values on both sides{note}"
        return
    drifted = [f for f in counted if scores[f]["drift"]]
    share = len(drifted) / len(counted)
    severity: Severity = max(
        (level for level, t in thresholds.items() if drifted and share >= t),
        key=list(SEVERITY).index,
        default="none",
    )
    if options.method in PER_FEATURE:
        test = f"p < {options.p_val} with {options.correction} correction"
    else:  # one test of all the features: they drift together or not at all
        test = f"tested together with {options.method}, p = {scores[tested[0]]['p_value']:.3g}"
    message = (
        f"{len(drifted)} of {len(counted)} features drifted ({test}): {drifted}"
        if drifted
        else f"no drift in {len(counted)} features ({test})"
    )
    # The evidence is no larger than the effective values of the sparsest feature it rests on.
    evidence = min(round(scores[f]["n_cur"] * factor) for f in drifted or counted)
    result.update(
        {
            "verdict": "drift" if drifted else "no_drift",
            "severity": severity,
            "drifted_features": drifted,
            "share_drifted": share,
            "n_effective": min(result["n_effective"], evidence),
            "message": message + note,
        }
    )
