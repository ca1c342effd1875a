"""Performance of served models while their labels come late: realized, estimated, and their outputs.

``monitor(request) -> PerformanceResult`` (``PerformanceRequest``, runs in the ``monitoring`` runtime).
Per model version in the window:

- the realized accuracy, on the rows whose label has matured;
- NannyML's confidence-based performance estimation (CBPE): fitted on the version's reference (its
  served probabilities on its holdout, every label known), it calibrates the served probabilities and
  estimates the accuracy of every row of the window, labelled or not, with its sampling error;
- prediction drift: the predicted-class shares of the window against the reference's (total variation
  distance, chi-squared test of homogeneity).

The monitored version (the champion) is judged against its reference accuracy, the first that applies:
a realized accuracy significantly more than ``max_drop`` below it (``high``); a CBPE estimate whose
upper bound is more than ``max_drop`` below it (``medium``: labels pending, the estimate is clear);
drifted predictions (``low``). The verdict has a Detection's ``verdict`` and ``severity``, so the
retraining policy acts on it as on data drift.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

from airloop.labels import LABEL, VERSION, probability_columns
from airloop.steps.drift.requests import PerformanceRequest, PerformanceResult, VersionPerformance

if TYPE_CHECKING:
    import pandas as pd

PREDICTED = "y_pred"
# CBPE's bounds: NannyML's own, three sampling errors either side of the estimate.
SIGMAS = 3


def monitor(request: PerformanceRequest | Mapping[str, Any]) -> PerformanceResult:
    import pandas as pd

    request = PerformanceRequest.parse(request)
    classes = [str(c) for c in request.classes]
    if len(classes) < 2:
        raise ValueError(f"'classes' must name at least two classes, got {request.classes!r}")
    window = pd.read_parquet(request.window_path)
    _check_columns(window, classes, "the window", with_version=True)
    versions: dict[str, VersionPerformance] = {}
    for version, rows in window.groupby(window[VERSION].astype(str)):
        if version not in request.references:
            raise ValueError(
                f"no reference for model version {version!r} (references: {sorted(request.references)})"
            )
        reference = pd.read_parquet(request.references[version])
        _check_columns(reference, classes, f"version {version}'s reference", with_version=False)
        if reference[LABEL].isna().any():
            raise ValueError(f"version {version}'s reference has rows without a label")
        versions[version] = version_performance(reference, rows.reset_index(drop=True), classes)
    verdict, severity, reason = judge(versions.get(request.monitored), request)
    return {
        "verdict": verdict,
        "severity": severity,
        "reason": reason,
        "monitored": request.monitored,
        "versions": versions,
    }


def version_performance(
    reference: pd.DataFrame, rows: pd.DataFrame, classes: list[str]
) -> VersionPerformance:
    from scipy.stats import chi2_contingency

    reference, rows = _predicted(reference, classes), _predicted(rows, classes)
    labelled = rows[rows[LABEL].notna()]
    estimate = cbpe(reference, rows, classes)
    ours = rows[PREDICTED].value_counts().reindex(classes, fill_value=0)
    theirs = reference[PREDICTED].value_counts().reindex(classes, fill_value=0)
    seen = (ours + theirs) > 0
    distance = 0.5 * float((ours / len(rows) - theirs / len(reference)).abs().sum())
    p_value = 1.0
    if seen.sum() > 1:
        p_value = float(chi2_contingency([ours[seen].to_list(), theirs[seen].to_list()])[1])
    return {
        "rows": len(rows),
        "labelled": len(labelled),
        "reference_accuracy": float((reference[PREDICTED] == reference[LABEL].astype(str)).mean()),
        "realized_accuracy": (
            float((labelled[PREDICTED] == labelled[LABEL].astype(str)).mean()) if len(labelled) else None
        ),
        **estimate,  # type: ignore[typeddict-item]
        "predicted": {c: float(n / len(rows)) for c, n in ours.items()},
        "reference_predicted": {c: float(n / len(reference)) for c, n in theirs.items()},
        "prediction_distance": distance,
        "prediction_p_value": p_value,
    }


def cbpe(reference: pd.DataFrame, rows: pd.DataFrame, classes: list[str]) -> dict[str, float | None]:
    """NannyML's CBPE of the accuracy of ``rows``, fitted on ``reference`` (both with ``y_pred``)."""
    import nannyml

    binary = len(classes) == 2
    columns = probability_columns(classes)

    def frame(table: pd.DataFrame) -> pd.DataFrame:
        out = table[[*columns, PREDICTED]].copy()
        out[LABEL] = table[LABEL].astype("string") if LABEL in table else None
        if binary:  # NannyML's binary CBPE takes 0/1 labels and the positive class's probability
            for column in (PREDICTED, LABEL):
                out[column] = (out[column] == classes[1]).astype("Int64").where(out[column].notna())
        return out

    estimator = nannyml.CBPE(
        y_pred_proba=columns[1] if binary else dict(zip(classes, columns, strict=True)),
        y_pred=PREDICTED,
        y_true=LABEL,
        metrics=["accuracy"],
        problem_type="classification_binary" if binary else "classification_multiclass",
        chunk_number=1,
    )
    with warnings.catch_warnings():
        # One chunk per side is what a window is; NannyML warns about it.
        warnings.simplefilter("ignore")
        estimator.fit(frame(reference))
        result = estimator.estimate(frame(rows).drop(columns=[LABEL])).filter(period="analysis").to_df()
    value = _number(result[("accuracy", "value")].iloc[0])
    error = _number(result[("accuracy", "sampling_error")].iloc[0])
    bounds: tuple[float | None, float | None] = (None, None)
    if value is not None and error is not None:
        bounds = (max(0.0, value - SIGMAS * error), min(1.0, value + SIGMAS * error))
    return {
        "estimated_accuracy": value,
        "sampling_error": error,
        "estimated_lower": bounds[0],
        "estimated_upper": bounds[1],
    }


def judge(version: VersionPerformance | None, request: PerformanceRequest) -> tuple[Any, Any, str]:
    """The monitored version's verdict, severity and reason (see the module's docstring)."""
    if version is None:
        return "insufficient_data", "none", f"version {request.monitored} served no rows in the window"
    if version["rows"] < request.min_rows:
        return (
            "insufficient_data",
            "none",
            f"version {request.monitored} served {version['rows']} rows; judging needs {request.min_rows}",
        )
    baseline, allowance = version["reference_accuracy"], request.max_drop
    floor = baseline - allowance
    realized, labelled = version["realized_accuracy"], version["labelled"]
    if realized is not None and labelled >= request.min_labels:
        # One-sided test of H1: the realized accuracy is below the floor.
        se = math.sqrt(max(floor * (1 - floor), 1e-12) / labelled)
        p = 1 - NormalDist().cdf((floor - realized) / se)
        if p < request.alpha:
            return (
                "drift",
                "high",
                f"realized accuracy {realized:.3f} on {labelled} matured labels is significantly more than "
                f"{allowance:g} below the reference {baseline:.3f} (p={p:.3g})",
            )
    upper = version["estimated_upper"]
    if upper is not None and upper < floor:
        return (
            "drift",
            "medium",
            f"estimated accuracy (CBPE) {version['estimated_accuracy']:.3f}, at most {upper:.3f}, is more "
            f"than {allowance:g} below the reference {baseline:.3f}; {labelled} of {version['rows']} rows "
            "labelled",
        )
    distance, p = version["prediction_distance"], version["prediction_p_value"]
    if distance > request.max_distribution_distance and p < request.alpha:
        return (
            "drift",
            "low",
            f"predicted classes drifted from the reference's by {distance:.3f} (total variation; limit "
            f"{request.max_distribution_distance:g}, chi-squared p={p:.3g})",
        )
    measured = f"realized {realized:.3f} on {labelled} labels, " if realized is not None else ""
    return (
        "no_drift",
        "none",
        f"accuracy holds: {measured}estimated {_fmt(version['estimated_accuracy'])} against the "
        f"reference {baseline:.3f}; predicted classes within {distance:.3f}",
    )


def _predicted(table: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    probabilities = table[probability_columns(classes)].to_numpy(dtype=float)
    return table.assign(**{PREDICTED: [classes[i] for i in probabilities.argmax(axis=1)]})


def _check_columns(table: pd.DataFrame, classes: list[str], what: str, *, with_version: bool) -> None:
    needed = [*probability_columns(classes), LABEL, *([VERSION] if with_version else [])]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(f"{what} lacks the columns {missing} (it has {list(table.columns)})")


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
