"""Macro metrics for imbalanced classes: their definitions (``airloop.metrics``), the offline gate's
paired bootstrap for them, and a loop turn on an imbalanced table judged by balanced accuracy."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from airloop import runtimes
from airloop.metrics import score
from airloop.steps.training.evaluate import bootstrap_p_value, evaluate, paired_bootstrap
from airloop.steps.training.register import register
from airloop.steps.training.train import train
from airloop.tables import write_table
from tests.fakes.context import task_context


def _imbalanced(rows: int = 1200, seed: int = 0):
    """Three classes, 84 / 10 / 6 %: the rare ones are told apart by features 0 and 1."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    label = rng.choice([0, 1, 2], size=rows, p=[0.84, 0.10, 0.06])
    features = rng.normal(size=(rows, 5))
    features[:, 0] += 2.5 * (label == 1)
    features[:, 1] += 2.5 * (label == 2)
    frame = pd.DataFrame(features, columns=[f"x{i}" for i in range(5)])
    return frame.assign(label=label)


def test_the_metrics_are_scikit_learns_and_take_resample_weights():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    rng = np.random.default_rng(1)
    target = rng.choice(["a", "b", "c"], size=300, p=[0.8, 0.15, 0.05])
    predicted = np.where(rng.random(300) < 0.7, target, rng.choice(["a", "b", "c"], size=300))
    classes = ["a", "b", "c"]
    assert score("accuracy", target, predicted, classes)[0] == pytest.approx(
        accuracy_score(target, predicted)
    )
    assert score("balanced_accuracy", target, predicted, classes)[0] == pytest.approx(
        balanced_accuracy_score(target, predicted)
    )
    assert score("f1_macro", target, predicted, classes)[0] == pytest.approx(
        f1_score(target, predicted, average="macro", labels=classes, zero_division=0)
    )
    # A row weighted twice counts as that row repeated: what a bootstrap resample is.
    rows = rng.integers(0, 300, size=300)
    weights = np.bincount(rows, minlength=300)[None, :].astype(float)
    for metric, reference in (
        ("balanced_accuracy", balanced_accuracy_score(target[rows], predicted[rows])),
        (
            "f1_macro",
            f1_score(target[rows], predicted[rows], average="macro", labels=classes, zero_division=0),
        ),
    ):
        assert score(metric, target, predicted, classes, weights)[0] == pytest.approx(reference)
    with pytest.raises(ValueError, match="metric 'f1' is not supported; supported: 'accuracy', 'balanced"):
        score("f1", target, predicted, classes)


def test_the_paired_bootstrap_tells_a_better_macro_score_from_chance():
    rng = np.random.default_rng(2)
    target = rng.choice([0, 1], size=400, p=[0.9, 0.1])
    majority = np.zeros(400, dtype=int)  # accuracy 0.9, balanced accuracy 0.5
    finds_the_rare = np.where(rng.random(400) < 0.85, target, 1 - target)
    deltas = paired_bootstrap("balanced_accuracy", target, finds_the_rare, majority, [0, 1])
    assert len(deltas) == 2000 and (deltas > 0).mean() > 0.99
    assert bootstrap_p_value(deltas) < 0.01
    # Two models that differ only by chance: no significant difference either way.
    noise = np.where(rng.random(400) < 0.5, target, 1 - target)
    other = np.where(rng.random(400) < 0.5, target, 1 - target)
    assert bootstrap_p_value(paired_bootstrap("f1_macro", target, noise, other, [0, 1])) > 0.05


def test_an_imbalanced_loop_turn_is_judged_by_balanced_accuracy(tmp_path):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = write_table(_imbalanced(), str(tmp_path / "imbalanced.parquet"))
    base = {"tracking_uri": tracking, "artifact_root": (tmp_path / "artefacts").as_uri()}
    fit = {**base, "experiment": "imbalanced", "data_uri": data}
    majority = train({**fit, "estimator": "sklearn.dummy.DummyClassifier", "estimator_params": {}})
    for name in ("accuracy", "balanced_accuracy", "f1_macro"):
        assert name in majority["metrics"]
    assert majority["metrics"]["balanced_accuracy"] == pytest.approx(1 / 3)
    gate = {"tracking_uri": tracking, "model_name": "imbalanced", "metric": "balanced_accuracy"}
    register({"tracking_uri": tracking, "model_name": "imbalanced", "run_id": majority["run_id"]})
    forest = train(
        {
            **fit,
            "estimator": "sklearn.ensemble.RandomForestClassifier",
            "estimator_params": {"n_estimators": 50, "max_depth": 6, "class_weight": "balanced"},
        }
    )
    # Accuracy hardly tells the two apart: the majority class alone scores 0.84.
    by_accuracy = evaluate({**gate, "run_id": forest["run_id"], "metric": "accuracy"})
    assert by_accuracy["rule"] in ("not_better", "not_significant"), by_accuracy
    # Converted (its parity gate passed), the forest is judged as its IR serves it.
    converted = runtimes.run_step(
        "airloop.steps.conversion.convert:convert",
        {"tracking_uri": tracking, "run_id": forest["run_id"], "variants": ["fp32"], "benchmark_calls": 20},
        runtime="torch",
        context=task_context("convert", dag_id="imbalanced", run_id="manual__imbalanced", dag_file=__file__),
        task_id="convert",
    )
    assert converted["passed"], converted["reason"]
    verdict = evaluate({**gate, "run_id": forest["run_id"], "ir_uri": converted["ir_uri"]})
    assert verdict["challenger"]["artefact"]["kind"] == "openvino"
    print(
        f"imbalanced: native accuracy {converted['native_accuracy']:.4f}, OpenVINO"
        f" {converted['parity']['accuracy']:.4f}; native balanced accuracy"
        f" {forest['metrics']['balanced_accuracy']:.4f}, OpenVINO {verdict['challenger']['value']:.4f}"
    )
    assert verdict["metric"] == "balanced_accuracy" and verdict["rule"] == "better", verdict
    assert verdict["challenger"]["value"] == pytest.approx(forest["metrics"]["balanced_accuracy"])
    assert verdict["champion"]["value"] == pytest.approx(1 / 3)
    assert verdict["p_value"] < 0.05 and verdict["ci"][0] > 0
    assert verdict["reason"].startswith("balanced_accuracy difference +0.")
    run = mlflow.MlflowClient(tracking).get_run(forest["run_id"])
    assert run.data.metrics["eval.balanced_accuracy"] == pytest.approx(verdict["challenger"]["value"])
    assert run.data.metrics["eval.champion_balanced_accuracy"] == pytest.approx(1 / 3)
    assert run.data.tags["airloop.eval.metric"] == "balanced_accuracy"
