"""The offline gate: is the challenger better than the current champion on the same held-out rows?

Both models score the same rows, so the comparison is paired, on the request's ``metric``
(``airloop.metrics``): a bootstrap over rows (both models' predictions resampled together) gives the
confidence interval of the difference. The p-value of ``accuracy`` is McNemar's test (mid-p) on the
rows where exactly one model is right; a macro metric (``balanced_accuracy``, ``f1_macro``) is not a
mean over rows, so its p-value is the paired bootstrap's own: twice the share of resamples on the
smaller side of a zero difference (two-sided, as McNemar's is). Each model is scored as the artefact
that serves it when the request names the challenger's (``ir_uri``, its conversion's IR; the
champion's IR is its run's), else as its logged model; the result names each artefact. The verdict
follows one named rule, the first that applies:

- ``implausibly_perfect``: the challenger's holdout error rate is 0, or under ``min_error_share`` of
  the champion's, and the request does not say such scores are expected (``perfect_scores_expected``)
  -> fail: a label leaked into a feature, or holdout rows among the training rows, score like that
- ``no_champion``: there is nothing to beat (the first model) -> pass
- ``not_better``: difference <= margin -> fail (the difference of ``metric``)
- ``not_significant``: difference > margin but p_value >= alpha -> fail (alpha=1 turns this off)
- ``better``: difference > margin and p_value < alpha -> pass

With a champion, both are also scored on the champion run's own holdout (``earlier``: rows of the
data the champion was trained for, often the regime before a shift), reported beside the verdict and
never deciding it: a person sees what a challenger trained on the new regime trades on the old one.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from airloop.metrics import check_metric, score
from airloop.openvino_ir import IR_PATH, VARIANT_TAG, fetch_ir, ir_predictor, table_rows
from airloop.steps.training.requests import Artefact, EarlierScores, EvaluateRequest, EvaluationResult, Scored
from airloop.tracking.artifacts import HOLDOUT_PATH, MODEL_NAME, read_data
from airloop.tracking.models import load_model
from airloop.tracking.registry import CHAMPION, EVAL_TAG_PREFIX, aliases
from airloop.tracking.session import mlflow_step

if TYPE_CHECKING:
    import pandas as pd

BOOTSTRAP_SAMPLES = 2000


@mlflow_step
def evaluate(request: EvaluateRequest | Mapping[str, Any]) -> EvaluationResult:
    """The challenger run ``run_id`` against the champion of ``model_name`` -> ``{"verdict", "rule",
    "reason", "challenger", "champion", "difference", "ci", "p_value", "n"}``; see docs/steps.md."""
    import mlflow

    request = EvaluateRequest.parse(request)
    tracking_uri, name, run_id = request.tracking_uri, request.model_name, request.run_id
    if not name or not run_id:
        raise ValueError("request needs 'model_name' and 'run_id'")
    metric = check_metric(request.metric)
    # Template fields: a rendered template is a string.
    label, margin, alpha = request.label_column, float(request.margin), float(request.alpha)
    share = float(request.min_error_share)
    perfect_expected = str(request.perfect_scores_expected).lower() == "true"
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    data = read_data(tracking_uri, request.data_uri or f"runs:/{run_id}/{HOLDOUT_PATH}")
    if label not in data.columns:
        raise ValueError(f"label column {label!r} not in evaluation data columns {list(data.columns)}")
    features, target = data.drop(columns=[label]), data[label].to_numpy()
    n = int(len(target))
    classes = sorted(set(target.tolist()), key=str)
    champion_version = aliases(tracking_uri, name).get(CHAMPION)
    versions = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    with tempfile.TemporaryDirectory() as tmp:
        model_uri = f"runs:/{run_id}/{MODEL_NAME}"
        challenger_labels, artefact = _predict(tracking_uri, request.ir_uri or model_uri, features, tmp)
        challenger_right = challenger_labels == target
        challenger: Scored = {
            "accuracy": float(challenger_right.mean()),
            "value": _value(metric, target, challenger_labels, classes),
            "artefact": artefact,
        }
        if versions:
            challenger["version"] = str(min(int(v.version) for v in versions))
        champion_mv = None
        if champion_version is not None and champion_version != challenger.get("version"):
            champion_mv = client.get_model_version(name, champion_version)
            if not champion_mv.source:
                raise ValueError(f"champion version {champion_version} of {name!r} has no model source")
            served = (
                request.ir_uri
                and champion_mv.run_id
                and client.get_run(champion_mv.run_id).data.tags.get(VARIANT_TAG)
            )
            champion_uri = f"runs:/{champion_mv.run_id}/{IR_PATH}" if served else champion_mv.source
            champion_labels, champion_artefact = _predict(tracking_uri, champion_uri, features, tmp)
            champion_right = champion_labels == target
            earlier = _earlier(
                tracking_uri,
                champion_mv.run_id,
                label,
                metric,
                request.ir_uri or model_uri,
                champion_uri,
                tmp,
            )

    if champion_mv is None:
        implausible = None if perfect_expected else _implausible(challenger_right, None, share)
        result: EvaluationResult = {
            "verdict": "fail" if implausible else "pass",
            "rule": "implausibly_perfect" if implausible else "no_champion",
            "reason": implausible or f"no champion of {name!r} yet: the first model passes by rule",
            "metric": metric,
            "challenger": challenger,
            "champion": None,
            "earlier": None,
            "difference": None,
            "ci": None,
            "p_value": None,
            "n": n,
        }
        _log(client, result, run_id, None)
        return result

    champion_value = _value(metric, target, champion_labels, classes)
    difference = challenger["value"] - champion_value
    deltas = paired_bootstrap(metric, target, challenger_labels, champion_labels, classes, request.seed)
    low, high = np.quantile(deltas, [alpha / 2, 1 - alpha / 2])
    ci = [float(low), float(high)]
    p_value = (
        mcnemar_mid_p(challenger_right, champion_right) if metric == "accuracy" else bootstrap_p_value(deltas)
    )
    implausible = None if perfect_expected else _implausible(challenger_right, champion_right, share)
    if implausible:
        rule, reason = "implausibly_perfect", implausible
    elif difference <= margin:
        rule = "not_better"
        reason = f"{metric} difference {difference:+.4f} is not above the margin {margin:g}"
    elif p_value >= alpha:
        rule = "not_significant"
        reason = (
            f"{metric} difference {difference:+.4f} is not significant: p = {p_value:.3g} >= alpha {alpha:g}"
        )
    else:
        rule = "better"
        reason = (
            f"{metric} difference {difference:+.4f} (CI {ci[0]:+.4f} to {ci[1]:+.4f}) above the margin "
            f"{margin:g}, p = {p_value:.3g} < alpha {alpha:g}"
        )
    result = {
        "verdict": "pass" if rule == "better" else "fail",
        "rule": rule,
        "reason": reason,
        "metric": metric,
        "challenger": challenger,
        "champion": {
            "version": str(champion_mv.version),
            "accuracy": float(champion_right.mean()),
            "value": champion_value,
            "artefact": champion_artefact,
        },
        "earlier": earlier,
        "difference": difference,
        "ci": ci,
        "p_value": p_value,
        "n": n,
    }
    _log(client, result, run_id, champion_mv.run_id)
    return result


def _predict(tracking_uri: str, uri: str, features: pd.DataFrame, tmp: str) -> tuple[np.ndarray, Artefact]:
    """The labels the model at ``uri`` (an IR folder, ``.../openvino``, or a logged model) predicts for
    the rows, and what it was scored as. An IR is verified against its manifest and run as the model
    server runs it."""
    if uri.rstrip("/").endswith(f"/{IR_PATH}"):
        fetched = fetch_ir(
            {"tracking_uri": tracking_uri, "ir_uri": uri, "dst_dir": tempfile.mkdtemp(dir=tmp)}
        )
        manifest = fetched["manifest"]
        proba = ir_predictor(f"{fetched['model_dir']}/model.xml")(table_rows(manifest, features))
        predicted = np.asarray(manifest["classes"])[proba.argmax(axis=1)]
        artefact: Artefact = {
            "uri": uri,
            "kind": "openvino",
            "variant": manifest["precision"],
            "files": fetched["files"],
        }
        return predicted, artefact
    return np.asarray(load_model(tracking_uri, uri).predict(features)), {"uri": uri, "kind": "model"}


def _value(metric: str, target: np.ndarray, predicted: np.ndarray, classes: list[Any]) -> float:
    return float(score(metric, target, predicted, classes)[0])


def _earlier(
    tracking_uri: str,
    champion_run: str | None,
    label: str,
    metric: str,
    challenger_uri: str,
    champion_uri: str,
    tmp: str,
) -> EarlierScores | None:
    """Both models' ``metric`` on the champion run's holdout; ``None`` when that run has none."""
    from mlflow.exceptions import MlflowException

    if not champion_run:
        return None
    uri = f"runs:/{champion_run}/{HOLDOUT_PATH}"
    try:
        data = read_data(tracking_uri, uri)
    except (MlflowException, OSError):
        return None
    if label not in data.columns:
        return None
    features, target = data.drop(columns=[label]), data[label].to_numpy()
    classes = sorted(set(target.tolist()), key=str)
    try:
        challenger, _ = _predict(tracking_uri, challenger_uri, features, tmp)
    except KeyError as exc:  # the models take other columns: nothing to compare on
        return {"data": uri, "n": len(target), "challenger": None, "champion": None, "skipped": str(exc)}
    champion, _ = _predict(tracking_uri, champion_uri, features, tmp)
    return {
        "data": uri,
        "n": len(target),
        "challenger": _value(metric, target, challenger, classes),
        "champion": _value(metric, target, champion, classes),
        "skipped": None,
    }


def _implausible(challenger: np.ndarray, champion: np.ndarray | None, share: float) -> str | None:
    """Why the challenger's holdout score is too good to be true, or ``None`` when it is not."""
    n, errors = len(challenger), int((~challenger).sum())
    advice = (
        "a label leaked into a feature, or holdout rows among the training rows, score like that; set "
        "perfect_scores_expected if this task allows such scores"
    )
    if errors == 0:
        return f"holdout error rate 0 ({n} of {n} rows right) is implausibly perfect: {advice}"
    if champion is None:
        return None
    rate, champion_rate = errors / n, float((~champion).mean())
    if rate < share * champion_rate:
        return (
            f"holdout error rate {rate:.4f} ({errors} of {n} rows wrong) is under {share:g} of the "
            f"champion's {champion_rate:.4f}, implausibly good: {advice}"
        )
    return None


def paired_bootstrap(
    metric: str, target: np.ndarray, a: np.ndarray, b: np.ndarray, classes: list[Any], seed: int = 0
) -> np.ndarray:
    """``metric`` of labels ``a`` minus that of labels ``b``, on ``BOOTSTRAP_SAMPLES`` resamples of the
    rows (the same rows for both: the pairing), in chunks that bound the memory a large holdout takes."""
    rng = np.random.default_rng(seed)
    n, chunk = len(target), max(1, min(BOOTSTRAP_SAMPLES, 2_000_000 // max(len(target), 1)))
    deltas = []
    for start in range(0, BOOTSTRAP_SAMPLES, chunk):
        samples = rng.integers(0, n, size=(min(chunk, BOOTSTRAP_SAMPLES - start), n))
        weights = np.zeros(samples.shape)
        np.add.at(weights, (np.arange(len(samples))[:, None], samples), 1.0)
        deltas.append(score(metric, target, a, classes, weights) - score(metric, target, b, classes, weights))
    return np.concatenate(deltas)


def bootstrap_p_value(deltas: np.ndarray) -> float:
    """Two-sided p-value of a zero difference from bootstrap ``deltas``: twice the share (with the
    add-one correction, never 0) of resamples at or beyond zero on the side the difference is not on."""
    beyond = min(int((deltas <= 0).sum()), int((deltas >= 0).sum()))
    return float(min(1.0, 2 * (beyond + 1) / (len(deltas) + 1)))


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
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    metric = result["metric"]
    metrics = [Metric("eval.passed", float(result["verdict"] == "pass"), now, 0)]
    metrics.append(Metric("eval.accuracy", result["challenger"]["accuracy"], now, 0))
    metrics.append(Metric(f"eval.{metric}", result["challenger"]["value"], now, 0))
    champion, difference, p_value = result["champion"], result["difference"], result["p_value"]
    if champion is not None and difference is not None and p_value is not None:
        metrics += [
            Metric("eval.champion_accuracy", champion["accuracy"], now, 0),
            Metric(f"eval.champion_{metric}", champion["value"], now, 0),
            Metric("eval.difference", difference, now, 0),
            Metric("eval.p_value", p_value, now, 0),
        ]
    earlier = result["earlier"]
    for role in ("challenger", "champion"):
        value = earlier[role] if earlier else None
        if value is not None:
            metrics.append(Metric(f"eval.earlier.{role}_{metric}", value, now, 0))
    artefact = result["challenger"]["artefact"]
    tags = {
        "verdict": result["verdict"],
        "rule": result["rule"],
        "metric": metric,
        "accuracy": f"{result['challenger']['accuracy']:.6g}",
        metric: f"{result['challenger']['value']:.6g}",
        "artefact": " ".join(filter(None, (artefact["kind"], artefact.get("variant"), artefact["uri"]))),
    }
    client.log_batch(
        challenger_run,
        metrics=metrics,
        tags=[RunTag(f"{EVAL_TAG_PREFIX}{key}", value) for key, value in tags.items()],
    )
    client.log_dict(challenger_run, result, "evaluation.json")
    if champion is not None and champion_run is not None and champion_run != challenger_run:
        client.log_batch(
            champion_run, metrics=[Metric(f"eval.as_champion.{metric}", champion["value"], now, 0)]
        )
        client.log_dict(champion_run, result, f"evaluations/{challenger_run}.json")
