"""Hyperparameter search: selecting the best run, nesting under a parent run, and the mapped DAG."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from airloop import settings
from airloop.embedded.demo import generate
from airloop.steps.training.select import BEST_RUN_TAG, select_best
from airloop.steps.training.train import train
from airloop.tables import write_table
from airloop.tracking.artifacts import PARENT_RUN_TAG

REPO = Path(__file__).resolve().parents[2]
SEARCH_TAGS = {"airflow.dag_id": "hpo", "airflow.run_id": "manual__1", "airflow.task_id": "select"}
CANDIDATES = [
    {"estimator": "sklearn.dummy.DummyClassifier", "estimator_params": {"strategy": "prior"}},
    {"estimator": "sklearn.linear_model.LogisticRegression", "estimator_params": {"C": 1.0}},
    {"estimator": "sklearn.linear_model.LogisticRegression", "estimator_params": {"C": 1e-4}},
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("hpo")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    base = {
        "tracking_uri": uri,
        "artifact_root": (root / "artefacts").as_uri(),
        "experiment": "hpo",
        "data_uri": write_table(generate(600, seed=5), str(root / "train.parquet")),
        "reference_rows": 50,
    }
    train_tags = {**SEARCH_TAGS, "airflow.task_id": "train"}
    runs = [
        train({**base, **candidate, "tags": {**train_tags, "airflow.map_index": str(i)}})
        for i, candidate in enumerate(CANDIDATES)
    ]
    return {"tracking_uri": uri, "base": base, "runs": runs}


def _select(store: dict, **extra: object) -> dict:
    request = {
        "tracking_uri": store["tracking_uri"],
        "run_ids": [r["run_id"] for r in store["runs"]],
        "tags": SEARCH_TAGS,
        **extra,
    }
    return select_best(request)


def test_select_best_returns_the_winner_in_train_shape_and_nests_the_candidates(store):
    runs = store["runs"]
    accuracies = [r["metrics"]["accuracy"] for r in runs]
    assert accuracies[1] > max(accuracies[0], accuracies[2])  # the strong model wins on accuracy
    best = _select(store)
    assert best["run_id"] == runs[1]["run_id"] and best["reused"] is False
    assert {k: best[k] for k in runs[1] if k != "reused"} == {k: runs[1][k] for k in runs[1] if k != "reused"}
    assert [c["value"] for c in best["candidates"]] == accuracies
    client = mlflow.MlflowClient(store["tracking_uri"])
    parent = client.get_run(best["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags[BEST_RUN_TAG] == runs[1]["run_id"]
    assert parent.data.metrics["best.accuracy"] == accuracies[1]
    assert parent.data.params["search.candidates"] == "3"
    assert {client.get_run(r["run_id"]).data.tags[PARENT_RUN_TAG] for r in runs} == {best["parent_run_id"]}


def test_select_again_reuses_the_parent_and_min_mode_picks_the_lowest(store):
    first = _select(store)
    again = _select(store, metric="log_loss", mode="min")
    assert again["parent_run_id"] == first["parent_run_id"] and again["reused"] is True
    losses = [r["metrics"]["log_loss"] for r in store["runs"]]
    assert again["run_id"] == store["runs"][losses.index(min(losses))]["run_id"]
    experiment = mlflow.MlflowClient(store["tracking_uri"]).get_experiment_by_name("hpo")
    searches = mlflow.MlflowClient(store["tracking_uri"]).search_runs(
        [experiment.experiment_id], "tags.`airloop.search` = 'true'"
    )
    assert len(searches) == 1


def test_train_nests_under_a_given_parent(store):
    client = mlflow.MlflowClient(store["tracking_uri"])
    parent = client.create_run(client.get_experiment_by_name("hpo").experiment_id).info.run_id
    child = train({**store["base"], **CANDIDATES[0], "parent_run_id": parent})
    assert client.get_run(child["run_id"]).data.tags[PARENT_RUN_TAG] == parent
    # A candidate trained under a parent keeps it: selection reuses the common parent.
    selected = select_best({"tracking_uri": store["tracking_uri"], "run_ids": [child["run_id"]]})
    assert selected["parent_run_id"] == parent


def test_select_rejects_bad_requests(store):
    with pytest.raises(ValueError, match="mode must be one of"):
        _select(store, mode="best")
    with pytest.raises(ValueError, match="have no metric 'f1'"):
        _select(store, metric="f1")
    with pytest.raises(ValueError, match="needs 'run_ids'"):
        select_best({"tracking_uri": store["tracking_uri"], "run_ids": []})


@pytest.fixture(scope="module")
def hpo_dag():
    airflow = str(Path(sys.executable).parent / "airflow")
    subprocess.run([airflow, "db", "migrate"], check=True, capture_output=True)
    from airflow.dag_processing.dagbag import DagBag

    # A model of its own, so this run leaves the reference loop's registered model alone.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRLOOP_MODEL_NAME", "airloop-hpo-test")
        bag = DagBag(dag_folder=str(REPO / "dags" / "airloop_hpo.py"))
    assert bag.import_errors == {}
    return bag.get_dag("airloop_hpo")


def test_hpo_dag_fans_out_one_run_per_candidate_and_registers_the_best(hpo_dag, tmp_path):
    from airloop.tracking.registry import aliases

    data = write_table(generate(1200, seed=11), str(tmp_path / "train.parquet"))
    run = hpo_dag.test(run_conf={"data_uri": data})
    states = {(ti.task_id, ti.map_index): str(ti.state) for ti in run.get_task_instances()}
    assert str(run.state) == "success", states
    assert sorted(i for task, i in states if task == "train") == [0, 1, 2]
    select = next(ti for ti in run.get_task_instances() if ti.task_id == "select")
    best = select.xcom_pull(task_ids="select")
    assert len(best["candidates"]) == 3 and len({c["run_id"] for c in best["candidates"]}) == 3
    assert best["metrics"]["accuracy"] == max(c["value"] for c in best["candidates"])
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri())
    children = [client.get_run(c["run_id"]) for c in best["candidates"]]
    assert {r.data.tags["airflow.map_index"] for r in children} == {"0", "1", "2"}
    assert {r.data.tags[PARENT_RUN_TAG] for r in children} == {best["parent_run_id"]}
    assert aliases(settings.mlflow_tracking_uri(), "airloop-hpo-test") == {"champion": "1"}
    (version,) = client.search_model_versions("name = 'airloop-hpo-test'")
    assert version.run_id == best["run_id"]
