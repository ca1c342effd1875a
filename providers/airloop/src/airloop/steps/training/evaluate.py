"""The offline gate: is the challenger better than the current champion on the same held-out rows?

Both models score the same rows, so the comparison is paired: a bootstrap over rows gives the
confidence interval of the accuracy difference, and McNemar's test (mid-p) on the rows where
exactly one model is right gives the p-value. Each model is scored as the artefact that serves it
when the request names the challenger's (``ir_uri``, its conversion's IR; the champion's IR is its
run's), else as its logged model; the result names each artefact. The verdict follows one named rule,
the first that applies:

- ``implausibly_perfect``: the challenger's holdout error rate is 0, or under ``min_error_share`` of
  the champion's, and the request does not say such scores are expected (``perfect_scores_expected``)
  -> fail: a label leaked into a feature, or holdout rows among the training rows, score like that
- ``no_champion``: there is nothing to beat (the first model) -> pass
- ``not_better``: difference <= margin -> fail
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

from airloop.openvino_ir import IR_PATH, VARIANT_TAG, fetch_ir, ir_predictor
from airloop.steps.training.requests import Artefact, EarlierScores, EvaluateRequest, EvaluationResult, Scored
from airloop.tracking.artifacts import HOLDOUT_PATH, MODEL_NAME, read_data
from airloop.tracking.models import load_model
from airloop.tracking.registry import CHAMPION, EVAL_TAG_PREFIX, aliases
from airloop.tracking.session import mlflow_step

if TYPE_CHECKING:
    import numpy as np
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
    if request.metric != "accuracy":
        raise ValueError(f"metric {request.metric!r} is not supported; the paired tests need 'accuracy'")
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
    champion_version = aliases(tracking_uri, name).get(CHAMPION)
    versions = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    with tempfile.TemporaryDirectory() as tmp:
        model_uri = f"runs:/{run_id}/{MODEL_NAME}"
        challenger_right, artefact = _correct(
            tracking_uri, request.ir_uri or model_uri, features, target, tmp
        )
        challenger: Scored = {"accuracy": float(challenger_right.mean()), "artefact": artefact}
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
            champion_right, champion_artefact = _correct(tracking_uri, champion_uri, features, target, tmp)
            earlier = _earlier(
                tracking_uri, champion_mv.run_id, label, request.ir_uri or model_uri, champion_uri, tmp
            )

    if champion_mv is None:
        implausible = None if perfect_expected else _implausible(challenger_right, None, share)
        result: EvaluationResult = {
            "verdict": "fail" if implausible else "pass",
            "rule": "implausibly_perfect" if implausible else "no_champion",
            "reason": implausible or f"no champion of {name!r} yet: the first model passes by rule",
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

    difference = float(challenger_right.mean() - champion_right.mean())
    ci = paired_bootstrap_ci(challenger_right, champion_right, alpha, seed=request.seed)
    p_value = mcnemar_mid_p(challenger_right, champion_right)
    implausible = None if perfect_expected else _implausible(challenger_right, champion_right, share)
    if implausible:
        rule, reason = "implausibly_perfect", implausible
    elif difference <= margin:
        rule = "not_better"
        reason = f"accuracy difference {difference:+.4f} is not above the margin {margin:g}"
    elif p_value >= alpha:
        rule = "not_significant"
        reason = (
            f"accuracy difference {difference:+.4f} is not significant: p = {p_value:.3g} >= alpha {alpha:g}"
        )
    else:
        rule = "better"
        reason = (
            f"accuracy difference {difference:+.4f} (CI {ci[0]:+.4f} to {ci[1]:+.4f}) above the margin "
            f"{margin:g}, p = {p_value:.3g} < alpha {alpha:g}"
        )
    result = {
        "verdict": "pass" if rule == "better" else "fail",
        "rule": rule,
        "reason": reason,
        "challenger": challenger,
        "champion": {
            "version": str(champion_mv.version),
            "accuracy": float(champion_right.mean()),
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


def _correct(
    tracking_uri: str, uri: str, features: pd.DataFrame, target: np.ndarray, tmp: str
) -> tuple[np.ndarray, Artefact]:
    """Which rows the model at ``uri`` (an IR folder, ``.../openvino``, or a logged model) gets right,
    and what it was scored as. An IR is verified against its manifest and run as the model server runs it."""
    import numpy as np

    if uri.rstrip("/").endswith(f"/{IR_PATH}"):
        fetched = fetch_ir(
            {"tracking_uri": tracking_uri, "ir_uri": uri, "dst_dir": tempfile.mkdtemp(dir=tmp)}
        )
        manifest = fetched["manifest"]
        rows = features[manifest["feature_names"]].to_numpy(dtype=np.float32)
        proba = ir_predictor(f"{fetched['model_dir']}/model.xml")(rows)
        predicted = np.asarray(manifest["classes"])[proba.argmax(axis=1)]
        artefact: Artefact = {
            "uri": uri,
            "kind": "openvino",
            "variant": manifest["precision"],
            "files": fetched["files"],
        }
        return predicted == target, artefact
    return load_model(tracking_uri, uri).predict(features) == target, {"uri": uri, "kind": "model"}


def _earlier(
    tracking_uri: str, champion_run: str | None, label: str, challenger_uri: str, champion_uri: str, tmp: str
) -> EarlierScores | None:
    """Both models' accuracy on the champion run's holdout; ``None`` when that run has none."""
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
    try:
        challenger, _ = _correct(tracking_uri, challenger_uri, features, target, tmp)
    except KeyError as exc:  # the models take other columns: nothing to compare on
        return {"data": uri, "n": len(target), "challenger": None, "champion": None, "skipped": str(exc)}
    champion, _ = _correct(tracking_uri, champion_uri, features, target, tmp)
    return {
        "data": uri,
        "n": len(target),
        "challenger": float(challenger.mean()),
        "champion": float(champion.mean()),
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
    from mlflow.entities import Metric, RunTag

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
    earlier = result["earlier"]
    for role in ("challenger", "champion"):
        value = earlier[role] if earlier else None
        if value is not None:
            metrics.append(Metric(f"eval.earlier.{role}_accuracy", value, now, 0))
    artefact = result["challenger"]["artefact"]
    tags = {
        "verdict": result["verdict"],
        "rule": result["rule"],
        "accuracy": f"{result['challenger']['accuracy']:.6g}",
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
            champion_run, metrics=[Metric("eval.as_champion.accuracy", champion["accuracy"], now, 0)]
        )
        client.log_dict(champion_run, result, f"evaluations/{challenger_run}.json")
