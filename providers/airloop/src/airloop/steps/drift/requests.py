"""The drift steps' requests and results: detect, collect a request window, decide on a retrain.

Standard library only, so the operators import them at the top without slowing DAG parsing; each
default is written here once, and an operator argument of the same name reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from airloop.requests import StepRequest

Verdict = Literal["drift", "no_drift", "insufficient_data", "invalid_window"]
Severity = Literal["none", "low", "medium", "high"]


@dataclass(frozen=True, kw_only=True)
class DetectRequest(StepRequest):
    """``detect``: the window at ``current_uri`` against the reference at ``reference_uri``.

    See docs/drift.md: ``features`` defaults to every reference column, ``categorical`` to the
    non-numeric ones, ``severity`` to ``detect.SEVERITY``; no report is written without ``report_dir``.
    """

    reference_uri: str
    current_uri: str
    features: list[str] | None = None
    categorical: list[str] | None = None
    backend: str = "scipy"
    method: str = "ks"
    p_val: float = 0.05
    correction: str = "bonferroni"
    min_rows: int = 200
    report_dir: str | None = None
    severity: dict[str, float] | None = None


class FeatureScore(TypedDict):
    """One feature's test: a p-value and a flag when tested, the two sides' sizes and means."""

    kind: Literal["numeric", "categorical"]
    test: str
    tested: bool
    statistic: float | None
    p_value: float | None
    drift: bool
    ref_mean: float | None
    cur_mean: float | None
    n_ref: int
    n_cur: int
    nan_fraction_ref: float
    nan_fraction_cur: float


class DriftResult(TypedDict):
    """``detect``'s verdict on a window and why: the drifted features, each feature's test, the report."""

    verdict: Verdict
    severity: Severity
    backend: str
    method: str
    n_reference: int
    n_current: int
    # The rows behind the verdict: rows with a value, repeats beyond the reference's own rate counted
    # once, and no more than the effective values of the sparsest feature the verdict rests on.
    n_effective: int
    drifted_features: list[str]
    share_drifted: float
    features: dict[str, FeatureScore]
    report_json: str | None
    report_html: str | None
    message: str


class Detection(TypedDict):
    """What a drift detect operator returns and ``decide`` judges: the verdict on the champion's window."""

    model_name: str
    champion: str
    verdict: Verdict
    severity: Severity
    drifted_features: list[str]
    share_drifted: float | None
    n_current: int
    n_effective: int
    n_reference: int
    message: str | None
    # The report's path in the artefact store, and where the window came from.
    report: str
    window: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class CollectRequest(StepRequest):
    """``window.collect``: the gateway's request logs under ``log_dir`` in [start, end) (epoch seconds)."""

    log_dir: str
    start: float
    end: float
    out_path: str


class Window(TypedDict):
    """The collected window: its rows, the parquet file, the feature names, log files and bad lines."""

    rows: int
    path: str
    features: list[str]
    files: int
    skipped_lines: int


@dataclass(frozen=True, kw_only=True)
class DecideRequest(StepRequest):
    """``policy.decide``: what ``detection`` leads to, given the last request and the time ``now``.

    ``actions`` (``{severity: action}``) goes over ``policy.DEFAULT_ACTIONS``; numbers may come as
    strings (rendered templates).
    """

    detection: Detection
    now: float
    actions: dict[str, str] | None = None
    cooldown_minutes: float = 60
    min_window_rows: int = 200
    last_requested_at: float | None = None
    # The severity the last retrain request was for: a more severe drift within the cooldown escalates.
    last_requested_severity: Severity | None = None
    retrain_running: bool = False
    # "act": request the retrain the policy decides on; "suggest": record and notify it, never request.
    mode: str = "act"
    # The circuit breaker: at most max_retrains retrain requests per retrain_period_hours (None: no
    # limit); recent_retrains: epoch seconds of the earlier requests (older ones are not counted).
    max_retrains: int | None = None
    retrain_period_hours: float = 24
    recent_retrains: list[float] | None = None


class Decision(TypedDict):
    """``decide``'s answer: the action, why (``code``, ``reason``) and what the severity asked for;
    ``escalated_from``: the severity of the last request when a more severe drift overrode its cooldown."""

    action: str  # "none", "log", or a retrain action: "retrain", "retrain_with_approval"
    code: str
    reason: str
    verdict: Verdict
    severity: Severity
    wanted: str | None
    decided_at: str
    cooldown_until: str | None  # a retrain held back by the cooldown or the circuit breaker: until when
    escalated_from: Severity | None


@dataclass(frozen=True, kw_only=True)
class PerformanceRequest(StepRequest):
    """``performance.monitor``: the served rows of a window against each model version's reference.

    ``window_path``: a parquet file, one row per served row: ``model_version``, one ``p:<class>`` column
    per class (the served probabilities) and ``y_true`` (the matured label, or null). ``references``:
    ``{version: parquet path}`` of the same columns, the version's served model on its holdout, every
    label known. ``monitored``: the version whose drop is judged (the champion); the others are
    reported. The drop is judged against the monitored version's reference accuracy; see
    docs/labels.md.
    """

    window_path: str
    references: dict[str, str]
    classes: list[str]
    monitored: str
    # The accuracy the monitored version may lose against its reference before it counts as a drop.
    max_drop: float = 0.05
    # Fewest served rows to judge, and fewest matured labels for the realized accuracy to count.
    min_rows: int = 100
    min_labels: int = 30
    # Prediction drift: total variation distance between the predicted-class shares of the window and
    # the reference beyond which (and significant at alpha) the output distribution counts as drifted.
    max_distribution_distance: float = 0.1
    alpha: float = 0.05


class VersionPerformance(TypedDict):
    """One model version over the window: realized accuracy on matured labels, NannyML's CBPE estimate
    (with its sampling error and 3-sigma bounds) on every row, and the predicted-class shares."""

    rows: int
    labelled: int
    reference_accuracy: float
    realized_accuracy: float | None
    estimated_accuracy: float | None
    sampling_error: float | None
    estimated_lower: float | None
    estimated_upper: float | None
    predicted: dict[str, float]
    reference_predicted: dict[str, float]
    prediction_distance: float
    prediction_p_value: float


class PerformanceResult(TypedDict):
    """``monitor``'s verdict on the monitored version, why, and every version's figures."""

    verdict: Verdict
    severity: Severity
    reason: str
    monitored: str
    versions: dict[str, VersionPerformance]
