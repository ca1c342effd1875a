"""The rollout's types: its request, the analysis request and verdict, the trigger's event, the report,
the task's result and the audit record; the labels ingest's request and result. The standard library
only, so operator and trigger modules import them at the top without slowing DAG parsing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NotRequired, TypedDict

from airloop.requests import StepRequest
from airloop.tracking.requests import MlflowRequest

# Metrics snapshots as ``ServingTarget.metrics()`` returns them: ``{predictor: {"requests", ...}}``.
Metrics = dict[str, dict[str, Any]]


def flag(name: str, value: Any) -> bool:
    """A boolean, also as the string a template renders (``"{{ params.approval }}"`` gives ``"True"``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{name} must be true or false, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class RolloutRequest(MlflowRequest):
    """One rollout of ``version`` next to the champion (``airloop.steps.rollout.rollout``); the rollout
    operators take the same arguments under the same names."""

    model_name: str
    version: str
    deployment: str = "airloop"
    steps: Sequence[int] = (10, 25, 50, 100)
    mode: str = "canary"
    shadow_percent: int = 100
    approval: bool = False
    analysis_seconds: float = 30.0
    max_wait_seconds: float = 300.0
    criteria: dict[str, Any] = field(default_factory=dict)
    poll_interval: float = 1.0
    # A rejected version is never rolled out again unless a person says so here.
    allow_rejected: bool = False
    # What a window still short of data (labels, mostly) when its wait ends leads to: "rollback",
    # "extend" (wait again, up to max_extensions times, then roll back) or "hold" (for approval).
    on_inconclusive: str = "rollback"
    max_extensions: int = 2
    # Where the canary's labels come from: "metrics" (the target's feedback counters, any target) or
    # "log" (the labels log joined to the request log under the artefact root: labels of any age, from
    # late feedback and LabelsIngestOperator; targets whose gateway writes the logs, e.g. local).
    labels_from: str = "metrics"

    def __post_init__(self) -> None:
        super().__post_init__()
        # Rendered templates are strings ("True", "30.0"): the request holds the values they stand for.
        set_ = object.__setattr__
        set_(self, "version", str(self.version))
        set_(self, "steps", tuple(self.steps))
        for name in ("shadow_percent", "max_extensions"):
            if isinstance(getattr(self, name), str):
                set_(self, name, int(getattr(self, name)))
        for name in ("approval", "allow_rejected"):
            set_(self, name, flag(name, getattr(self, name)))
        for name in ("analysis_seconds", "max_wait_seconds", "poll_interval"):
            set_(self, name, float(getattr(self, name)))
        set_(self, "criteria", dict(self.criteria or {}))

    def mlflow(self) -> dict[str, Any]:
        """The MLflow part, as ``airloop.tracking`` functions take it (credentials included: never log it)."""
        values = {f.name: getattr(self, f.name) for f in fields(MlflowRequest)}
        return {key: value for key, value in values.items() if value is not None}


@dataclass(frozen=True)
class AnalysisRequest(StepRequest):
    """One analysis window (``airloop.steps.rollout.canary.analyse``); the window is ``after - before``."""

    before: Metrics
    after: Metrics
    champion: str
    challenger: str
    mode: str = "canary"
    criteria: dict[str, Any] = field(default_factory=dict)
    # Labels from the labels log (``airloop.labels.window_quality``: per predictor, the labels come so
    # far for the requests it answered in the window); None: the feedback counters of the snapshots.
    labels: dict[str, dict[str, Any]] | None = None


class PredictorStats(TypedDict):
    """One predictor over one window."""

    requests: int
    errors: int
    error_rate: float | None
    p99_ms: float | None
    latency_ms_buckets: dict[str, float]
    feedback: int  # rows with a truth label
    accuracy: float | None
    labelled: int  # requests whose label came, where the target times labels (else 0)
    label_lag_p50_s: float | None  # seconds from prediction to label
    label_lag_p90_s: float | None
    predicted: dict[str, int]
    pairs: int | None
    agreement: float | None


class Verdict(TypedDict):
    """What ``analyse`` decides about one window: ``pass``, ``fail`` or ``wait`` (too little data)."""

    verdict: str
    mode: str
    reasons: list[str]
    champion: PredictorStats
    challenger: PredictorStats
    tests: dict[str, dict[str, Any]]


class WindowEvent(TypedDict):
    """The rollout trigger's one event. ``verdict`` is the analysis of the window (``None`` with
    ``status="error"``): the operator records it as it is, it never analyses the window again."""

    status: str  # "ready" (a pass or fail verdict), "timeout" (still "wait"), "error"
    message: str
    after: Metrics | None
    verdict: Verdict | None


class Stage(TypedDict):
    """A stage of the plan: the challenger as shadow (``mirror`` percent mirrored) or at ``weight`` %."""

    kind: str  # "shadow" | "canary"
    weight: int
    mirror: NotRequired[int]


class RolloutStep(TypedDict):
    """An entry of the report's timeline: an analysis window, the approval hold, or the promotion."""

    kind: str  # "shadow" | "canary" | "approval" | "promotion"
    weight: int
    started: str
    mirror: NotRequired[int]
    stage: NotRequired[int]  # the window's index in the plan
    extension: NotRequired[int]  # the n-th extension of the stage's window (on_inconclusive="extend")
    ended: NotRequired[str]
    before: NotRequired[Metrics]  # while the window is open
    since: NotRequired[float]  # epoch seconds of the window's first snapshot
    verdict: NotRequired[
        str
    ]  # pass fail inconclusive extended error interrupted | awaiting approved rejected | promoted
    reasons: NotRequired[list[str]]
    champion_stats: NotRequired[PredictorStats]
    challenger_stats: NotRequired[PredictorStats]
    tests: NotRequired[dict[str, dict[str, Any]]]
    by: NotRequired[str | None]


class RolloutReport(TypedDict):
    """``<artefacts>/rollouts/<deployment>/<model>-v<version>[-attempt-<n>].json``, one per attempt.

    ``phase`` is on record before each write: ``deploying``, ``analysing``, ``awaiting_approval``,
    ``promoting``, ``rolling_back``, ``aborting``, ``done``. ``decision`` once done: ``deployed``,
    ``promoted``, ``rolled_back`` (the version is rejected) or ``aborted`` (stopped before a verdict:
    the champion serves everything, the version is not rejected, ``reason`` says why).
    """

    attempt: int
    deployment: str
    model_name: str
    champion: str | None
    challenger: str
    mode: str
    approval: bool
    started: str
    ended: str | None
    phase: str
    decision: str | None
    reason: str | None
    rejection_lifted: bool
    plan: list[Stage]
    steps: list[RolloutStep]
    criteria: dict[str, float]


class ResultStep(TypedDict):
    kind: str
    weight: int | None
    verdict: str | None


class RolloutResult(TypedDict):
    """The task's result. ``message`` explains a decision that fails the task: ``rolled_back``,
    ``aborted``, or ``refused`` (a rejected version, not rolled out again)."""

    decision: str
    report: str
    champion: NotRequired[str]
    challenger: NotRequired[str]
    previous: NotRequired[str]
    steps: NotRequired[list[ResultStep]]
    message: NotRequired[str]


class AuditStep(TypedDict):
    kind: str
    weight: NotRequired[int]
    mirror: NotRequired[int]
    verdict: NotRequired[str]
    reasons: NotRequired[list[str]]
    by: NotRequired[str | None]
    diff: NotRequired[dict[str, Any]]  # a shadow window: agreement, pairs, distance, both p99s


class EarlierAttempt(TypedDict):
    attempt: int
    report: str
    decision: str | None
    reason: str | None


class RolloutAuditRecord(TypedDict):
    """Stage ``rollout`` of the loop's audit record: the latest attempt, and the earlier ones."""

    decision: str | None
    mode: str
    champion: str | None
    challenger: str
    started: str
    ended: str | None
    attempt: int
    reason: str | None
    steps: list[AuditStep]
    report: str
    earlier: list[EarlierAttempt]


@dataclass(frozen=True, kw_only=True)
class IngestLabelsRequest(StepRequest):
    """``ingest``: the ground truth at ``labels_path`` (a parquet or CSV file, or a folder of them),
    joined on the request id to the request log of ``deployment`` under ``artefact_root``."""

    labels_path: str
    deployment: str
    artefact_root: str
    source: str = ""  # what the ground truth is called in the result (the URI or the query)
    id_column: str = "request_id"
    label_column: str = "label"
    # When each label became known (timestamps, or epoch seconds); the time of the ingest when None.
    time_column: str | None = None
    # A label that comes later than this after its prediction is too late: counted, not used.
    max_label_delay_hours: float = 7 * 24
    # How far back the request log is read: ids of older requests count as unknown.
    lookback_hours: float = 14 * 24
    now: float | None = None  # epoch seconds; the time of the ingest when None


class Arm(TypedDict):
    """One predictor's matured labels in the labels log (first label per request)."""

    model_version: str
    labelled: int  # requests
    rows: int
    correct: int
    accuracy: float | None
    label_lag_p50_s: float
    label_lag_p90_s: float


class IngestResult(TypedDict):
    """What one ingest did: every ground-truth row is in exactly one of ``matched``, ``duplicates``,
    ``unknown``, ``too_late`` and ``invalid``; ``quality``: per predictor, over the whole labels log."""

    source: str
    rows: int
    matched: int
    duplicates: int  # the request already had a label (earlier, or in this batch)
    unknown: int  # no logged prediction with this id within lookback_hours
    too_late: int  # came more than max_label_delay_hours after the prediction
    invalid: int  # no id or no label, a label time before the prediction, a request of several rows
    examples: dict[str, list[str]]  # up to 5 request ids (or row numbers) per count other than matched
    written: str | None  # the labels log file holding the matched labels
    unreadable_log_lines: int
    unresolved: int  # labels in the labels log whose prediction is not in the request log read
    quality: dict[str, Arm]
