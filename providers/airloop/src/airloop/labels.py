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
from typing import Any

from airloop.serving.logs import LABELS_FOLDER, REQUESTS_FOLDER, read_log


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
    first: dict[str, dict[str, Any]] = {}
    for record in sorted(records, key=lambda r: r["ts"]):
        if record.get("truth") is not None:
            first.setdefault(record["request_id"], record)
    outcomes, unresolved = [], 0
    for request_id, record in first.items():
        prediction = predictions.get(request_id)
        if prediction is None or len(record["truth"]) != len(prediction["prediction"]):
            unresolved += 1
            continue
        outcomes.append(outcome(prediction, record["truth"], record["ts"]))
    return quality(outcomes), unresolved


def window_quality(root_uri: str, deployment: str, since: float) -> dict[str, dict[str, Any]]:
    """Per predictor, the labels that have come so far for the predictions it answered since ``since``
    (epoch seconds): what the canary judges a window on when it reads the logs."""
    predictions = served(read_log(root_uri, REQUESTS_FOLDER, deployment, since).records)
    labels = read_log(root_uri, LABELS_FOLDER, deployment, since).records
    return matured([r for r in labels if r["request_id"] in predictions], predictions)[0]


def _rank(ordered: list[float], q: float) -> float:
    """The nearest-rank q-quantile of sorted values."""
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 3)
