"""A search's rounds (Optuna ask/tell, rebuilt from the rounds before): what a round suggests, that a
retried round suggests the same, when the search stops, and a space the estimator does not take."""

from __future__ import annotations

import pytest

from airloop.steps.training.search import suggest

FOREST = "sklearn.ensemble.RandomForestClassifier"
SPACE = {
    "max_depth": {"int": [2, 12]},
    "min_samples_leaf": {"int": [1, 16], "log": True},
    "max_features": {"choices": ["sqrt", "log2"]},
}


def _round(history: list, **extra) -> list[dict]:
    return suggest(
        {
            "estimator": FOREST,
            "space": SPACE,
            "estimator_params": {"n_estimators": 50},
            "history": history,
            **extra,
        }
    )


def _trained(values: list[float]) -> list[dict]:
    return [{"run_id": f"r{i}", "metrics": {"accuracy": value}} for i, value in enumerate(values)]


def test_a_round_suggests_its_trials_within_the_space_over_the_fixed_params():
    first = _round([], trials=5)
    assert len(first) == 5
    for params in first:
        assert params["n_estimators"] == 50 and 2 <= params["max_depth"] <= 12
        assert 1 <= params["min_samples_leaf"] <= 16 and params["max_features"] in ("sqrt", "log2")
    assert _round([], trials=5) == first  # seeded: a retried round asks the same
    second = _round([first, _trained([0.8, 0.9, 0.7, 0.85, 0.6])], trials=3)
    assert len(second) == 3 and second != first[:3]


def test_the_search_stops_after_patience_rounds_without_a_better_best():
    first = _round([], trials=2)
    better = _round([first, _trained([0.8, 0.82])], trials=2)
    history = [first, _trained([0.8, 0.82]), better, _trained([0.81, 0.79])]  # no better than 0.82
    assert _round(history, trials=2) == []
    assert len(_round(history, trials=2, patience=2)) == 2  # one round without improvement is allowed
    improved = [first, _trained([0.8, 0.82]), better, _trained([0.9, 0.79])]
    assert len(_round(improved, trials=2)) == 2
    assert _round([*history, [], []], trials=2, patience=5) == []  # a round that asked nothing: stopped


def test_a_space_the_estimator_does_not_take_fails_naming_it():
    with pytest.raises(ValueError, match=r"search space names \['max_dept'\], not parameters of"):
        suggest({"estimator": FOREST, "space": {"max_dept": {"int": [2, 8]}}})
    with pytest.raises(ValueError, match=r"search space alpha: float \[0.1, 0.01\] needs low < high"):
        suggest(
            {"estimator": "sklearn.neural_network.MLPClassifier", "space": {"alpha": {"float": [0.1, 0.01]}}}
        )
    with pytest.raises(ValueError, match="a round asked for 2 trials and trained 1"):
        _round([[{"max_depth": 3}, {"max_depth": 4}], _trained([0.8])])


def test_a_spec_search_becomes_rounds_of_mapped_trials_then_the_best():
    from airloop.loops.dags import loop_dags

    spec = {
        "name": "churn",
        "data": {"uri": "s3://lake/churn/"},
        "label": "churned",
        "model": {"estimator": FOREST, "search": {"space": SPACE, "rounds": 2, "trials": 3}},
        "suite": "churn.suite.json",
    }
    loop, _ = loop_dags(spec)
    assert {"suggest_0", "trial_0", "suggest_1", "trial_1", "trials", "train"} <= set(loop.task_ids)
    assert loop.get_task("suggest_1").trigger_rule == "none_failed"
    assert {"suggest_0", "trial_0"} <= loop.get_task("suggest_1").upstream_task_ids
    assert "trials" in loop.get_task("train").upstream_task_ids
