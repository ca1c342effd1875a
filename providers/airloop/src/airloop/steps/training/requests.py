"""The training steps' requests and results: build_training_set, train, select_best, evaluate, register.

Each field carries the name of the operator argument that sets it (``airloop.operators.mlflow``) and
its one default. Standard library only: operator modules import this at the top.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Required, TypedDict

from airloop.requests import StepRequest
from airloop.tracking.requests import MlflowRequest, TrainedRun

DEFAULT_ESTIMATOR = "sklearn.neural_network.MLPClassifier"
# A training set's window of data drops: "all", the "latest" one or the latest n ("latest:3"), each of
# those plus a share of every earlier drop's rows ("latest+history:0.2"). The DAGs' Params and the loop
# spec's schema check the same pattern.
WINDOW_PATTERN = r"^(all|latest(:[1-9][0-9]*)?(\+history:(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?))?)$"


@dataclass(frozen=True, kw_only=True)
class BuildTrainingSetRequest(StepRequest):
    """``build_training_set``: the rows of ``data_uri`` that ``window`` selects, as one table at
    ``out_path`` (``airloop.operators.tables``)."""

    # A parquet or CSV file, or a folder of them (data drops, in name order).
    data_uri: str
    out_path: str
    # Which drops of a folder (``WINDOW_PATTERN``); a file is itself.
    window: str = "all"
    # The columns the table keeps: the model's inputs (default: every column but ``exclude``), then
    # ``label_column`` last; each one named must be in the data. ``None``: every column, unchecked.
    label_column: str | None = None
    features: list[str] | None = None
    # Columns of the data that are not inputs (keys, timestamps): dropped.
    exclude: list[str] = field(default_factory=list)
    storage_options: dict[str, Any] | None = field(default=None, repr=False)


@dataclass(frozen=True, kw_only=True)
class TrainRequest(MlflowRequest):
    """``train``: fit ``estimator`` on a split of ``data_uri``, log one MLflow run (see the step)."""

    data_uri: str
    estimator: str = DEFAULT_ESTIMATOR
    estimator_params: dict[str, Any] = field(default_factory=dict)
    label_column: str = "label"
    # Features encoded as categories besides the non-numeric ones (``airloop.encoding``).
    categorical_features: list[str] = field(default_factory=list)
    experiment: str = "airloop"
    test_size: float = 0.25
    seed: int = 0
    # The data gate's summary, kept on the run and in the audit record.
    validation: dict[str, Any] | None = None
    # How ``data_uri`` was built (a ``TrainingSet``): its source and window go on the run.
    training_set: dict[str, Any] | None = None
    parent_run_id: str | None = None
    # Tags of the run; the Airflow ones (``airflow.dag_id``, ...) find a task instance's run again.
    tags: dict[str, str] = field(default_factory=dict)
    # Training rows kept as the drift monitor's reference sample.
    reference_rows: int = 2000
    storage_options: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class SuggestRequest(StepRequest):
    """``suggest``: the next round of a search's trials (``estimator_params`` under the suggested ones),
    from the rounds so far (Optuna's ask/tell).

    ``space``: ``{param: {"int": [low, high]} | {"float": [low, high]} (each with optional "log") |
    {"choices": [...]}}``; ``history``: the earlier rounds as ``[params of round 0, trained runs of
    round 0, params of round 1, ...]`` (what the suggest and trial tasks returned).
    """

    estimator: str
    space: dict[str, dict[str, Any]]
    estimator_params: dict[str, Any] = field(default_factory=dict)
    trials: int = 4
    # Rounds without a better best value before the search stops (pruning between rounds).
    patience: int = 1
    metric: str = "accuracy"
    seed: int = 0
    history: list[Any] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class SelectBestRequest(MlflowRequest):
    """``select_best``: the best of ``run_ids`` by ``metric``; ties go to the earliest candidate."""

    run_ids: list[str]
    metric: str = "accuracy"
    mode: str = "max"
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class EvaluateRequest(MlflowRequest):
    """``evaluate``: the challenger run ``run_id`` against the ``champion`` of ``model_name``."""

    model_name: str
    run_id: str
    # Rows both models score; default: the challenger run's holdout split.
    data_uri: str | None = None
    label_column: str = "label"
    # One of ``airloop.metrics.METRICS``.
    metric: str = "accuracy"
    margin: float = 0.0
    alpha: float = 0.05
    seed: int = 0
    # The artefact that serves the challenger: its conversion's IR (``runs:/<run_id>/openvino``). Both
    # models are then scored as they serve (the champion by its own run's IR, when it has one);
    # ``None``: both by their logged models.
    ir_uri: str | None = None
    # A holdout error rate of 0, or under ``min_error_share`` of the champion's, is refused as
    # implausible (a leaked label does that) unless the task is one where such scores are expected.
    perfect_scores_expected: bool = False
    min_error_share: float = 0.05


@dataclass(frozen=True, kw_only=True)
class RegisterRequest(MlflowRequest):
    """``register``: the run's model as a new version of ``model_name`` (``champion`` first)."""

    model_name: str
    run_id: str
    # Default: the run's logged model, ``runs:/<run_id>/model``.
    model_uri: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


class DataFile(TypedDict, total=False):
    """One file of a training set's source: its path under the source folder, the rows taken from it
    and, for a sampled earlier drop, the share of its rows (``sampled``)."""

    name: Required[str]
    rows: Required[int]
    sampled: float


class TrainingSet(TypedDict):
    """What ``build_training_set`` wrote: the table (``uri``), where its rows came from (``source``,
    ``window``, ``files``) and ``airloop.tables.fingerprint``'s figures of it."""

    uri: str
    source: str
    window: str
    files: list[DataFile]
    rows: int
    columns: dict[str, str]
    sha256: str


class Candidate(TypedDict):
    run_id: str
    value: float


class SelectResult(TrainedRun):
    """The winner's ``TrainedRun`` and the search that chose it."""

    parent_run_id: str
    metric: str
    mode: str
    candidates: list[Candidate]


class Artefact(TypedDict, total=False):
    """What a model was scored as: ``kind`` ``"openvino"`` (the IR that serves it: ``variant`` and the
    SHA-256 of its ``files``) or ``"model"`` (the logged model)."""

    uri: Required[str]
    kind: Required[str]
    variant: str
    files: dict[str, str]


class Scored(TypedDict, total=False):
    """A model's holdout accuracy and ``value`` of the evaluation's metric."""

    accuracy: Required[float]
    value: Required[float]
    artefact: Required[Artefact]
    version: str


class EarlierScores(TypedDict):
    """Both models' metric on the champion run's holdout (``data``), beside the verdict; ``skipped``
    says why they could not be compared there."""

    data: str
    n: int
    challenger: float | None
    champion: float | None
    skipped: str | None


class EvaluationResult(TypedDict):
    """The offline gate's verdict; ``rule`` names why (see ``airloop.steps.training.evaluate``)."""

    verdict: str
    rule: str
    reason: str
    # What ``difference``, ``ci``, ``p_value`` and ``earlier`` are of (``airloop.metrics.METRICS``).
    metric: str
    challenger: Scored
    champion: Scored | None
    earlier: EarlierScores | None
    difference: float | None
    ci: list[float] | None
    p_value: float | None
    n: int


class RegisterResult(TypedDict):
    version: str
    alias: str | None
    reused: bool
