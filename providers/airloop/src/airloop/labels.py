"""Truth labels that come after their predictions, joined to the request log on the request id.

The gateway's logs (``airloop.serving.logs``): the request log holds every answered prediction with
its arm (``predictor``), model version and time; the labels log every label, from the feedback
endpoint (also for predictions the gateway no longer remembers) or the labels ingest
(``airloop.steps.rollout.labels``). The first label of a request counts, later ones are duplicates,
so no label is counted twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from airloop.serving.logs import LABELS_FOLDER, REQUESTS_FOLDER, read_log

# The columns of a window of served rows (``ServedRows.to_parquet``), as the performance monitor reads it.
VERSION = "model_version"
LABEL = "y_true"
PROBABILITY = "p:"


def probability_columns(classes: list[str]) -> list[str]:
    return [f"{PROBABILITY}{c}" for c in classes]


def served(requests: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Answered predictions by request id (a failed request has no prediction to label)."""
    return {r["request_id"]: r for r in requests if r.get("status", 200) == 200 and r.get("prediction")}


def outcome(request: dict[str, Any], truth: list[Any], labelled_at: float) -> dict[str, Any]:
    """A label joined to its logged prediction: the arm, its version, the lag and whether it was right."""
    from airloop.serving.model import label_value, predicted_class

    classes = request.get("classes") or []
    predicted = [label_value(predicted_class(row, classes)) for row in request["prediction"]]
    return {
        "request_id": request["request_id"],
        "predictor": request["predictor"],
        "model_version": request["model_version"],
        "predicted_at": request["ts"],
        "lag_s": labelled_at - request["ts"],
        "rows": len(predicted),
        "correct": sum(p == label_value(t) for p, t in zip(predicted, truth, strict=True)),
    }


def quality(outcomes: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per predictor: its model version, labelled requests and rows, correct rows, accuracy, label lag."""
    arms: dict[str, dict[str, Any]] = {}
    lags: dict[str, list[float]] = {}
    for item in outcomes:
        arm = arms.setdefault(
            item["predictor"],
            {"model_version": item["model_version"], "labelled": 0, "rows": 0, "correct": 0},
        )
        arm["labelled"] += 1
        arm["rows"] += item["rows"]
        arm["correct"] += item["correct"]
        lags.setdefault(item["predictor"], []).append(item["lag_s"])
    for name, arm in arms.items():
        ordered = sorted(lags[name])
        arm["accuracy"] = arm["correct"] / arm["rows"] if arm["rows"] else None
        arm["label_lag_p50_s"] = _rank(ordered, 0.5)
        arm["label_lag_p90_s"] = _rank(ordered, 0.9)
    return arms


def matured(
    records: Iterable[dict[str, Any]], predictions: dict[str, dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], int]:
    """``quality`` over the first label of each request in ``records`` (labels log records); and how
    many labels found no prediction in ``predictions`` (or one of another number of rows)."""
    outcomes, unresolved = [], 0
    for request_id, record in first_labels(records).items():
        prediction = predictions.get(request_id)
        if prediction is None or len(record["truth"]) != len(prediction["prediction"]):
            unresolved += 1
            continue
        outcomes.append(outcome(prediction, record["truth"], record["ts"]))
    return quality(outcomes), unresolved


def first_labels(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The first label of each request id among labels log records: the one that counts."""
    first: dict[str, dict[str, Any]] = {}
    for record in sorted(records, key=lambda r: r["ts"]):
        if record.get("truth") is not None:
            first.setdefault(record["request_id"], record)
    return first


@dataclass(frozen=True)
class ServedRows:
    """The rows answered in a window, one per predicted row: its version, probabilities and the label
    that matured for it (None while pending)."""

    versions: set[str]
    requests: int
    classes: list[str] | None
    rows: list[tuple[str, list[float], str | None]]

    def to_parquet(self, path: str, classes: list[str]) -> None:
        """As ``airloop.steps.drift.performance`` reads a window."""
        import pandas as pd

        table = pd.DataFrame([p for _, p, _ in self.rows], columns=probability_columns(classes))
        table[VERSION] = [v for v, _, _ in self.rows]
        table[LABEL] = pd.array([t for _, _, t in self.rows], dtype="string")
        table.to_parquet(path, index=False)


def served_rows(root_uri: str, deployment: str, since: float) -> ServedRows:
    """The predictions ``deployment`` answered since ``since`` (epoch seconds), row by row, with the labels
    come so far; a label naming no class of the model counts as pending."""
    from airloop.serving.model import label_value

    predictions = served(read_log(root_uri, REQUESTS_FOLDER, deployment, since).records)
    labels = first_labels(read_log(root_uri, LABELS_FOLDER, deployment, since).records)
    classes: list[str] | None = None
    rows: list[tuple[str, list[float], str | None]] = []
    for request_id, request in predictions.items():
        names = [str(c) for c in request.get("classes") or []]
        if classes is None:
            classes = names
        elif names != classes:
            raise ValueError(f"{deployment}'s log holds answers over classes {classes} and {names}")
        by_value = {label_value(c): c for c in names}
        truth = labels.get(request_id, {}).get("truth")
        if truth is not None and len(truth) != len(request["prediction"]):
            truth = None
        for i, probabilities in enumerate(request["prediction"]):
            label = None if truth is None else by_value.get(label_value(truth[i]))
            rows.append((str(request["model_version"]), probabilities, label))
    return ServedRows({v for v, _, _ in rows}, len(predictions), classes, rows)


def window_quality(root_uri: str, deployment: str, since: float) -> dict[str, dict[str, Any]]:
    """Per predictor, the labels that have come so far for the predictions it answered since ``since``
    (epoch seconds): what the canary judges a window on when it reads the logs."""
    predictions = served(read_log(root_uri, REQUESTS_FOLDER, deployment, since).records)
    labels = read_log(root_uri, LABELS_FOLDER, deployment, since).records
    return matured([r for r in labels if r["request_id"] in predictions], predictions)[0]


def _rank(ordered: list[float], q: float) -> float:
    """The nearest-rank q-quantile of sorted values."""
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 3)
