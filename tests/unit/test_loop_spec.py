"""Loop specs: validation that names the field, the DAGs a spec becomes, and ``airloop init`` on real
data sets that ship with scikit-learn."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from airloop.loops.spec import SpecError, load_folder, parse
from airloop.loops.spec import load as load_spec

REPO = Path(__file__).resolve().parents[2]


def _spec(**changes) -> dict:
    spec = {
        "name": "churn",
        "data": {"uri": "s3://lake/churn/"},
        "label": "churned",
        "keys": ["customer_id"],
        "model": {"estimator": "sklearn.ensemble.RandomForestClassifier", "params": {"n_estimators": 10}},
        "suite": "churn.suite.json",
    }
    return {**spec, **changes}


def _problems(raw) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse(raw, base="/specs")
    return caught.value.problems


def test_a_minimal_spec_gets_every_default_and_resolves_its_paths():
    spec = parse(_spec(), base="/specs")
    assert spec.data == {"uri": "s3://lake/churn/", "window": "latest"}  # a URI stays as it is
    assert spec.suite == "/specs/churn.suite.json"
    assert spec.rollout == {
        "steps": [10, 25, 50, 100],
        "mode": "canary",
        "analysis_seconds": 30,
        "approval": False,
        "on_inconclusive": "rollback",
        "max_extensions": 2,
        "labels_from": "metrics",
    }
    assert spec.labels is None
    assert spec.evaluation == {"metric": "accuracy", "margin": 0.0, "alpha": 0.05}
    assert spec.drift["backend"] == "scipy" and spec.drift["schedule"] == "@hourly"
    assert (spec.loop_dag_id, spec.monitor_dag_id, spec.excluded) == (
        "churn_loop",
        "churn_drift_monitor",
        ["customer_id"],
    )


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"label": None}, "label: required, missing"),
        ({"label": 3}, "label: 3 is not of type 'string'"),
        ({"model": {"params": {}}}, "model.estimator: required, missing"),
        ({"task": "regression"}, "task: 'regression' is not supported; supported: 'classification'"),
        ({"name": "Churn Model"}, "name: 'Churn Model' does not match"),
        (
            {"rollout": {"stepz": [10]}},
            "rollout: Additional properties are not allowed ('stepz' was unexpected)",
        ),
        ({"rollout": {"steps": [50, 10]}}, "rollout.steps: [50, 10] must rise step by step"),
        ({"rollout": {"steps": [10, 150]}}, "rollout.steps[1]: 150 is greater than the maximum of 100"),
        (
            {"data": {"sql": "SELECT 1"}},
            "data: give one source: uri (a file or folder), sql with conn_id, or feast",
        ),
        ({"data": {"uri": "x", "window": "last:3"}}, "data.window: 'last:3' does not match"),
        ({"features": ["churned", "age"]}, "features: the label 'churned' cannot be a feature"),
        ({"features": ["customer_id"]}, "features: 'customer_id' is also a key or the timestamp"),
        ({"drift": {"method": "mmd"}}, "drift.method: 'mmd' needs drift.backend 'alibi'"),
        ({"drift": {"actions": {"high": "page"}}}, "drift.actions.high: 'page' is not supported"),
        (
            {"evaluation": {"metric": "f1"}},
            "evaluation.metric: 'f1' is not supported; supported: 'accuracy', 'balanced_accuracy', "
            "'f1_macro'",
        ),
    ],
)
def test_a_bad_spec_fails_naming_the_field(changes, problem):
    problems = _problems({k: v for k, v in _spec(**changes).items() if v is not None})
    assert any(p.startswith(problem) for p in problems), problems


def test_an_unknown_field_lists_the_known_ones():
    (problem,) = _problems(_spec(lable="churned"))
    assert problem.startswith("spec: Additional properties are not allowed ('lable' was unexpected)")
    assert "known fields: " in problem and "label" in problem.split("known fields: ")[1]


def test_a_folder_reports_every_bad_spec_and_a_name_taken_twice(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(_spec()))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(_spec()))
    (tmp_path / "c.yml").write_text(yaml.safe_dump(_spec(name="other", task="regression")))
    (tmp_path / "d.yaml").write_text("name: [unclosed")
    (tmp_path / "notes.txt").write_text("not a spec")
    with pytest.raises(SpecError) as caught:
        load_folder(tmp_path)
    problems = caught.value.problems
    assert problems[0].startswith("c.yml: task: 'regression' is not supported")
    assert problems[1].startswith("d.yaml: not valid YAML")
    assert problems[2] == "b.yaml: name: 'churn' is taken by a.yaml"
    assert len(problems) == 3


def test_a_spec_becomes_a_loop_and_a_monitor_named_after_it(tmp_path):
    from airloop.loops.dags import loop_dags

    loop, monitor = loop_dags(_spec(rollout={"steps": [20, 100], "mode": "shadow", "approval": True}))
    assert (loop.dag_id, monitor.dag_id) == ("churn_loop", "churn_drift_monitor")
    (outlet,) = monitor.get_task("decide").outlets
    assert outlet.uri == "airloop://drift/churn" and loop.timetable.asset_condition == outlet
    assert monitor.get_task("decide").retrain_dag_id == "churn_loop"
    training_data = loop.get_task("training_data")
    assert (training_data.label_column, training_data.features, training_data.exclude) == (
        "churned",
        None,
        ["customer_id"],
    )
    rollout = loop.get_task("rollout")
    assert (rollout.model_name, rollout.deployment, list(rollout.steps), rollout.mode) == (
        "churn",
        "churn",
        [20, 100],
        "shadow",
    )
    assert loop.params["approval"] is True
    assert loop.get_task("train").experiment == "churn"
    assert {"needs_approval", "approve", "finish"} <= set(loop.task_ids)
    assert monitor.get_task("detect").deployment == "churn"


def test_candidates_train_as_mapped_trials_and_the_best_is_selected():
    from airloop.loops.dags import loop_dags

    model = {
        "estimator": "sklearn.ensemble.RandomForestClassifier",
        "params": {"n_estimators": 20},
        "candidates": [{"max_depth": 4}, {"max_depth": 12}],
    }
    loop, _ = loop_dags(_spec(model=model))
    trial, select = loop.get_task("trial"), loop.get_task("train")
    assert trial.expand_input.value["estimator_params"] == [
        {"n_estimators": 20, "max_depth": 4},
        {"n_estimators": 20, "max_depth": 12},
    ]
    assert type(select).__name__ == "MlflowSelectBestRunOperator" and select.metric == "accuracy"
    assert "trial" in select.upstream_task_ids


def _csv(name: str, folder: Path) -> Path:
    from sklearn import datasets

    frame = getattr(datasets, f"load_{name}")(as_frame=True).frame
    path = folder / f"{name}.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(("name", "classes"), [("wine", 3), ("breast_cancer", 2), ("digits", 10)])
def test_init_drafts_a_spec_and_suite_that_validate(tmp_path, name, classes):
    from airloop.loops.init import draft
    from airloop.loops.spec import load

    drafted = draft(str(_csv(name, tmp_path)), "target", tmp_path / "loops")
    spec = load(drafted.spec_path)
    assert spec.name == name.replace("_", "_") and spec.task == "classification"
    assert Path(spec.data["uri"]) == (tmp_path / f"{name}.csv").resolve()
    assert Path(spec.suite) == drafted.suite_path.resolve() and drafted.suite_path.is_file()
    assert f"{classes} classes" in "\n".join(drafted.lines)


def test_init_refuses_what_the_loop_cannot_do_and_writes_nothing(tmp_path):
    from airloop.loops.init import draft

    diabetes = _csv("diabetes", tmp_path)
    with pytest.raises(ValueError, match="regression is not supported yet; supported task: classification"):
        draft(str(diabetes), "target", tmp_path / "loops")
    with pytest.raises(ValueError, match=r"--label 'outcome' is not a column"):
        draft(str(diabetes), "outcome", tmp_path / "loops")
    assert not (tmp_path / "loops").exists()
    wine = _csv("wine", tmp_path)
    draft(str(wine), "target", tmp_path / "loops")
    with pytest.raises(FileExistsError, match="pass --force"):
        draft(str(wine), "target", tmp_path / "loops")


def test_the_spec_in_the_docs_validates():
    text = (REPO / "docs" / "loops.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    spec = parse(yaml.safe_load(block), base="/specs")
    assert spec.name == "churn" and spec.candidates == [{"max_depth": 6}, {"max_depth": 16}]


def test_init_takes_string_labels_and_takes_text_features_as_categories(tmp_path):
    from sklearn.datasets import load_wine

    from airloop.loops.init import draft

    frame = load_wine(as_frame=True).frame
    frame["target"] = frame["target"].map({0: "barolo", 1: "grignolino", 2: "barbera"})
    frame.to_csv(tmp_path / "wine.csv", index=False)
    drafted = draft(str(tmp_path / "wine.csv"), "target", tmp_path / "loops")
    assert "3 classes: 'grignolino' 39.9%, 'barolo' 33.1%, 'barbera' 27.0%" in "\n".join(drafted.lines)
    frame.assign(region="piedmont").to_csv(tmp_path / "regions.csv", index=False)
    regions = draft(str(tmp_path / "regions.csv"), "target", tmp_path / "loops")
    assert "categorical: region (the non-numeric columns" in "\n".join(regions.lines)
    assert regions.spec["categorical"] == ["region"]


def test_late_labels_and_the_policy_are_the_specs_to_declare():
    from airloop.loops.dags import loop_dags

    raw = _spec(
        rollout={"on_inconclusive": "extend", "max_extensions": 3, "labels_from": "log"},
        drift={"mode": "suggest", "max_retrains": 2, "retrain_period_hours": 12},
        labels={"uri": "outcomes/", "time_column": "known_at", "schedule": "@daily"},
    )
    loop, monitor, labels = loop_dags(parse(raw, base="/specs"))
    rollout = loop.get_task("rollout")
    assert (rollout.on_inconclusive, rollout.max_extensions, rollout.labels_from) == ("extend", 3, "log")
    decide = monitor.get_task("decide")
    assert (decide.mode, decide.max_retrains, decide.retrain_period_hours) == ("suggest", 2, 12)
    ingest = labels.get_task("ingest")
    assert labels.dag_id == "churn_labels" and ingest.deployment == "churn"
    assert (ingest.labels_uri, ingest.label_column, ingest.time_column) == (
        "/specs/outcomes",
        "churned",
        "known_at",
    )
    assert ingest.id_column == "request_id"
    problems = _problems(_spec(labels={"time_column": "known_at"}))
    assert problems == ["labels: give one source: uri (a file or folder), or sql with conn_id"]


def test_init_notes_a_rare_class_and_not_an_even_split(tmp_path):
    import pandas as pd
    from sklearn.datasets import load_breast_cancer

    from airloop.loops.init import draft

    frame = load_breast_cancer(as_frame=True).frame
    rare = pd.concat([frame[frame["target"] == 1].iloc[:300], frame[frame["target"] == 0].iloc[:40]])
    rare.to_csv(tmp_path / "rare.csv", index=False)
    lines = "\n".join(draft(str(tmp_path / "rare.csv"), "target", tmp_path / "loops").lines)
    assert "note: class 0 is 11.8% of the rows: accuracy says little about it" in lines
    assert (
        "metric: balanced_accuracy (the search chooses by it; the offline gate tests it by a paired" in lines
    )
    assert load_spec(tmp_path / "loops" / "rare.yaml").evaluation["metric"] == "balanced_accuracy"
    digits = "\n".join(draft(str(_csv("digits", tmp_path)), "target", tmp_path / "loops").lines)
    assert "accuracy says little" not in digits and "10 classes: 3 10.2%" in digits
