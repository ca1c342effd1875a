"""The label metrics a loop may judge models by: the training holdout's figures, a search's choice and
the offline gate's comparison all use these definitions.

- ``accuracy``: the share of rows right.
- ``balanced_accuracy``: the mean of the per-class recalls (scikit-learn's ``balanced_accuracy_score``).
- ``f1_macro``: the mean of the per-class F1 scores, over the classes given (scikit-learn's
  ``f1_score(average="macro", labels=classes, zero_division=0)``).

The macro metrics weigh each class alike, so a rare class counts as much as a common one. ``score``
takes row weights (counts, for a bootstrap resample of the rows) and scores many of them at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

METRICS = ("accuracy", "balanced_accuracy", "f1_macro")


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not supported; supported: {', '.join(map(repr, METRICS))}")
    return metric


def score(
    metric: str, target: Any, predicted: Any, classes: Sequence[Any], weights: np.ndarray | None = None
) -> np.ndarray:
    """``metric`` of ``predicted`` against ``target`` labels, once per row of ``weights``
    (``[samples, rows]``: how often each row counts; default one sample of every row once).

    ``classes`` are the classes a macro metric averages over (a class without rows in a sample is left
    out of balanced accuracy, as scikit-learn leaves it out, and scores 0 in F1)."""
    check_metric(metric)
    target, predicted = np.asarray(target), np.asarray(predicted)
    if weights is None:
        weights = np.ones((1, len(target)))
    right = target == predicted
    if metric == "accuracy":
        return (weights @ right) / weights.sum(axis=1)
    truth = np.stack([target == c for c in classes], axis=1).astype(float)  # [rows, classes]
    guessed = np.stack([predicted == c for c in classes], axis=1).astype(float)
    support, hits = weights @ truth, weights @ (truth * right[:, None])
    if metric == "balanced_accuracy":
        present = support > 0
        recall = np.divide(hits, support, out=np.zeros_like(hits), where=present)
        return recall.sum(axis=1) / present.sum(axis=1)
    both = support + weights @ guessed
    f1 = np.divide(2 * hits, both, out=np.zeros_like(hits), where=both > 0)
    return f1.mean(axis=1)
