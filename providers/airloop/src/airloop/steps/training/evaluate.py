"""The offline gate: is the challenger better than the current champion on the same held-out rows?

Both models score the same rows, so the comparison is paired: a bootstrap over rows gives the
confidence interval of the accuracy difference, and McNemar's test (mid-p) on the rows where
exactly one model is right gives the p-value. The verdict follows one named rule:

- ``no_champion``: there is nothing to beat (the first model) -> pass
- ``not_better``: difference <= margin -> fail
- ``not_significant``: difference > margin but p_value >= alpha -> fail (alpha=1 turns this off)
- ``better``: difference > margin and p_value < alpha -> pass
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airloop.steps.training.requests import EvaluateRequest, EvaluationResult, Scored
from airloop.tracking.artifacts import HOLDOUT_PATH, MODEL_NAME, read_data
from airloop.tracking.models import load_model
from airloop.tracking.registry import CHAMPION, aliases
from airloop.tracking.session import mlflow_step

if TYPE_CHECKING:
    import numpy as np

BOOTSTRAP_SAMPLES = 2000


@mlflow_step
def evaluate(request: EvaluateRequest | Mapping[str, Any]) -> EvaluationResult:
    """The challenger run ``run_id`` against the champion of ``model_name`` -> ``{"verdict", "rule",
    "challenger", "champion", "difference", "ci", "p_value", "n"}``; see docs/steps.md."""
    import mlflow

    request = EvaluateRequest.parse(request)
    tracking_uri, name, run_id = request.tracking_uri, request.model_name, request.run_id
    if not name or not run_id:
        raise ValueError("request needs 'model_name' and 'run_id'")
    if request.metric != "accuracy":
        raise ValueError(f"metric {request.metric!r} is not supported; the paired tests need 'accuracy'")
    # Template fields: a rendered template is a string.
    label, margin, alpha = request.label_column, float(request.margin), float(request.alpha)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    data = read_data(tracking_uri, request.data_uri or f"runs:/{run_id}/{HOLDOUT_PATH}")
    if label not in data.columns:
        raise ValueError(f"label column {label!r} not in evaluation data columns {list(data.columns)}")
    features, target = data.drop(columns=[label]), data[label].to_numpy()
    challenger_right = _correct(load_model(tracking_uri, f"runs:/{run_id}/{MODEL_NAME}"), features, target)
    challenger: Scored = {"accuracy": float(challenger_right.mean())}
    versions = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    if versions:
        challenger["version"] = str(min(int(v.version) for v in versions))

    champion_version = aliases(tracking_uri, name).get(CHAMPION)
    if champion_version is None or champion_version == challenger.get("version"):
        result: EvaluationResult = {
            "verdict": "pass",
            "rule": "no_champion",
            "challenger": challenger,
            "champion": None,
            "difference": None,
            "ci": None,
            "p_value": None,
            "n": int(len(target)),
        }
        _log(client, result, run_id, None)
        return result

    champion_mv = client.get_model_version(name, champion_version)
    if not champion_mv.source:
        raise ValueError(f"champion version {champion_version} of {name!r} has no model source")
    champion_right = _correct(load_model(tracking_uri, champion_mv.source), features, target)
    difference = float(challenger_right.mean() - champion_right.mean())
    ci = paired_bootstrap_ci(challenger_right, champion_right, alpha, seed=request.seed)
    p_value = mcnemar_mid_p(challenger_right, champion_right)
    if difference <= margin:
        rule = "not_better"
    elif p_value >= alpha:
        rule = "not_significant"
    else:
        rule = "better"
    result = {
        "verdict": "pass" if rule == "better" else "fail",
        "rule": rule,
        "challenger": challenger,
        "champion": {"version": champion_version, "accuracy": float(champion_right.mean())},
        "difference": difference,
        "ci": ci,
        "p_value": p_value,
        "n": int(len(target)),
    }
    _log(client, result, run_id, champion_mv.run_id)
    return result


def _correct(estimator: Any, features: Any, target: np.ndarray) -> np.ndarray:
    return estimator.predict(features) == target


def paired_bootstrap_ci(a: np.ndarray, b: np.ndarray, alpha: float, seed: int = 0) -> list[float]:
    """Percentile interval of mean(a) - mean(b) over rows resampled together (a, b: per-row 0/1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    delta = a.astype(float) - b.astype(float)
    samples = rng.integers(0, len(delta), size=(BOOTSTRAP_SAMPLES, len(delta)))
    means = delta[samples].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return [float(low), float(high)]


def mcnemar_mid_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided McNemar mid-p value: exact binomial test on the discordant rows, minus half the
    probability of the observed count (less conservative than the exact test, still valid)."""
    from scipy.stats import binom

    only_a = int((a & ~b).sum())
    only_b = int((~a & b).sum())
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    smaller = min(only_a, only_b)
    exact = min(1.0, 2 * binom.cdf(smaller, discordant, 0.5))
    return float(max(0.0, exact - binom.pmf(smaller, discordant, 0.5)))


def _log(client: Any, result: EvaluationResult, challenger_run: str, champion_run: str | None) -> None:
    """Record the verdict on the challenger run and, as a dated entry, on the champion's run."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric("eval.passed", float(result["verdict"] == "pass"), now, 0)]
    metrics.append(Metric("eval.accuracy", result["challenger"]["accuracy"], now, 0))
    champion, difference, p_value = result["champion"], result["difference"], result["p_value"]
    if champion is not None and difference is not None and p_value is not None:
        metrics += [
            Metric("eval.champion_accuracy", champion["accuracy"], now, 0),
            Metric("eval.difference", difference, now, 0),
            Metric("eval.p_value", p_value, now, 0),
        ]
    client.log_batch(challenger_run, metrics=metrics)
    client.log_dict(challenger_run, result, "evaluation.json")
    if champion is not None and champion_run is not None and champion_run != challenger_run:
        client.log_batch(
            champion_run, metrics=[Metric("eval.as_champion.accuracy", champion["accuracy"], now, 0)]
        )
        client.log_dict(champion_run, result, f"evaluations/{challenger_run}.json")
