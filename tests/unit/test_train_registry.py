"""Training, evaluation and the registry against a real MLflow on SQLite.

The tests in this module run in order: each one moves the registry a step further through a loop
turn (first model -> worse challenger rejected -> better challenger promoted).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import mlflow
import pytest

from airloop.embedded.demo import FEATURES, generate
from airloop.steps.training.evaluate import evaluate, mcnemar_mid_p
from airloop.steps.training.register import register
from airloop.steps.training.train import train
from airloop.tables import write_table
from airloop.tracking import registry
from airloop.tracking.artifacts import read_data
from airloop.tracking.models import load_model
from tests.fakes.context import task_context

MODEL = "airloop-test"
MLP = {"hidden_layer_sizes": [16], "max_iter": 300, "early_stopping": True}
AIRFLOW_TAGS = {
    "airflow.dag_id": "airloop_train",
    "airflow.run_id": "manual__2026-01-01T00:00:00+00:00",
    "airflow.task_id": "train",
    "airflow.map_index": "-1",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    data = {
        "before": write_table(generate(1600, shift=0.0, seed=0), str(root / "before.parquet")),
        "after": write_table(generate(1600, shift=1.0, seed=1), str(root / "after.parquet")),
    }
    return {
        "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "artifact_root": (root / "artefacts").as_uri(),
        "data": data,
        "runs": {},
    }


def _train(store: dict, data: str, tags: dict, **extra: object) -> dict:
    request = {
        "tracking_uri": store["tracking_uri"],
        "artifact_root": store["artifact_root"],
        "experiment": "airloop-test",
        "data_uri": store["data"][data],
        "estimator_params": MLP,
        "tags": tags,
        "reference_rows": 300,
        **extra,
    }
    return train(request)


def _evaluate(store: dict, run_id: str) -> dict:
    return evaluate({"tracking_uri": store["tracking_uri"], "model_name": MODEL, "run_id": run_id})


def _register(store: dict, trained: dict, **extra: object) -> dict:
    return register(
        {
            "tracking_uri": store["tracking_uri"],
            "model_name": MODEL,
            "run_id": trained["run_id"],
            "model_uri": trained["model_uri"],
            **extra,
        }
    )


def _version(store: dict, version: str):
    return mlflow.MlflowClient(store["tracking_uri"]).get_model_version(MODEL, version)


def test_train_logs_run_with_tags_metrics_and_artefacts(store):
    result = _train(store, "before", {**AIRFLOW_TAGS, "airflow.try_number": "1"})
    store["runs"]["first"] = result
    assert result["reused"] is False and result["model_uri"] == f"runs:/{result['run_id']}/model"
    assert result["metrics"]["accuracy"] > 0.85 and 0 < result["metrics"]["log_loss"] < 0.5
    run = mlflow.MlflowClient(store["tracking_uri"]).get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith(store["artifact_root"])
    assert run.data.tags["airflow.dag_id"] == "airloop_train"
    assert run.data.tags["airloop.code_version"]
    assert run.data.tags["airloop.data.sha256"] == result["fingerprint"]["sha256"]
    assert run.data.params["hidden_layer_sizes"] == "[16]"
    holdout = read_data(store["tracking_uri"], result["holdout_uri"])
    reference = read_data(store["tracking_uri"], result["reference_uri"])
    assert len(holdout) == 400 and "label" in holdout.columns
    assert list(reference.columns) == FEATURES and len(reference) == 300
    model = load_model(store["tracking_uri"], result["model_uri"])
    assert model.score(holdout[FEATURES], holdout["label"]) == pytest.approx(result["metrics"]["accuracy"])


def test_train_reuses_the_finished_run_of_the_same_task_instance(store):
    first = store["runs"]["first"]
    again = _train(store, "before", {**AIRFLOW_TAGS, "airflow.try_number": "2"})
    assert again["reused"] is True and again["run_id"] == first["run_id"]
    assert again["fingerprint"] == first["fingerprint"] and again["metrics"] == first["metrics"]


def test_a_try_killed_mid_run_leaves_its_run_to_the_next_try(store):
    from mlflow.entities import LoggedModelStatus

    client = mlflow.MlflowClient(store["tracking_uri"])
    experiment_id = client.get_experiment_by_name("airloop-test").experiment_id
    tags = {**AIRFLOW_TAGS, "airflow.run_id": "manual__killed", "airflow.try_number": "1"}
    # What a worker killed while saving the model leaves: a RUNNING run, a logged model never finished.
    dead = client.create_run(experiment_id, tags=tags).info.run_id
    client.log_param(dead, "seed", "0")
    pending = client.create_logged_model(experiment_id, name="model", source_run_id=dead).model_id
    trained = _train(store, "before", {**tags, "airflow.try_number": "2"})
    assert trained["run_id"] == dead and trained["reused"] is False
    run = client.get_run(dead)
    assert run.info.status == "FINISHED" and run.data.tags["airflow.try_number"] == "2"
    assert client.get_logged_model(pending).status == LoggedModelStatus.FAILED
    holdout = read_data(store["tracking_uri"], trained["holdout_uri"])
    model = load_model(store["tracking_uri"], trained["model_uri"])
    assert model.score(holdout[FEATURES], holdout["label"]) == pytest.approx(trained["metrics"]["accuracy"])
    assert len(client.search_runs([experiment_id], "tags.`airflow.run_id` = 'manual__killed'")) == 1

    # A dead run whose logged params differ from this try's cannot take its results: a new run.
    other = {**AIRFLOW_TAGS, "airflow.run_id": "manual__changed"}
    changed = client.create_run(experiment_id, tags=other).info.run_id
    client.log_param(changed, "seed", "7")
    client.set_terminated(changed, status="FAILED")
    assert _train(store, "before", other)["run_id"] != changed


def test_train_rejects_bad_estimators(store):
    with pytest.raises(ValueError, match="cannot be imported"):
        _train(store, "before", {}, estimator="sklearn.nope.Missing")
    with pytest.raises(ValueError, match="classifier with predict_proba"):
        _train(store, "before", {}, estimator="sklearn.linear_model.LinearRegression", estimator_params={})


def test_first_model_becomes_champion_and_passes_by_rule(store):
    first = store["runs"]["first"]
    champion = {"version": "1", "alias": "champion"}
    assert _register(store, first, tags=AIRFLOW_TAGS) == {**champion, "reused": False}
    assert _register(store, first, tags=AIRFLOW_TAGS) == {**champion, "reused": True}
    version = _version(store, "1")
    assert version.tags["airloop.run_id"] == first["run_id"] and version.tags["airflow.task_id"] == "train"
    verdict = _evaluate(store, first["run_id"])
    assert verdict["verdict"] == "pass" and verdict["rule"] == "no_champion" and verdict["champion"] is None


def test_worse_challenger_fails_and_is_rejected(store):
    dummy = {"estimator": "sklearn.dummy.DummyClassifier", "estimator_params": {"strategy": "uniform"}}
    worse = _train(store, "after", {}, **dummy)
    registered = _register(store, worse)
    assert registered["alias"] == "challenger"
    verdict = _evaluate(store, worse["run_id"])
    assert verdict["verdict"] == "fail" and verdict["rule"] == "not_better"
    assert verdict["difference"] < 0 and verdict["ci"][0] <= verdict["difference"] <= verdict["ci"][1]
    run = mlflow.MlflowClient(store["tracking_uri"]).get_run(worse["run_id"])
    assert run.data.metrics["eval.passed"] == 0.0
    base = {"tracking_uri": store["tracking_uri"], "model_name": MODEL}
    rejected = registry.reject({**base, "version": registered["version"], "reason": verdict})
    assert rejected["challenger_removed"] is True
    assert registry.aliases(store["tracking_uri"], MODEL) == {"champion": "1"}
    version = _version(store, registered["version"])
    assert version.tags["airloop.rejected"] == "true"
    assert "not_better" in version.tags["airloop.rejected.reason"]
    with pytest.raises(ValueError, match="is the champion"):
        registry.reject({**base, "version": "1"})


def test_better_challenger_passes_and_is_promoted(store):
    better = _train(store, "after", {})
    store["runs"]["better"] = better
    assert _register(store, better) == {"version": "3", "alias": "challenger", "reused": False}
    verdict = _evaluate(store, better["run_id"])
    assert verdict["verdict"] == "pass" and verdict["rule"] == "better", verdict
    assert verdict["challenger"] == {
        "accuracy": verdict["challenger"]["accuracy"],
        "value": verdict["challenger"]["accuracy"],
        "version": "3",
        "artefact": {"uri": f"runs:/{better['run_id']}/model", "kind": "model"},
    }
    assert verdict["reason"].startswith("accuracy difference +0.")
    assert verdict["difference"] > 0.1 and verdict["p_value"] < 0.001 and verdict["ci"][0] > 0
    assert verdict["n"] == 400
    champion_run = store["runs"]["first"]["run_id"]
    # Beside the verdict: both on the champion's own holdout (the regime before the shift), where the
    # champion scores what its run logged for it.
    earlier = verdict["earlier"]
    assert earlier["data"] == f"runs:/{champion_run}/data/holdout.parquet" and earlier["n"] == 400
    logged = mlflow.MlflowClient(store["tracking_uri"]).get_run(champion_run).data.metrics["accuracy"]
    assert earlier["champion"] == pytest.approx(logged) and 0 < earlier["challenger"] < 1
    assert earlier["skipped"] is None
    listed = mlflow.MlflowClient(store["tracking_uri"]).list_artifacts(champion_run, "evaluations")
    files = {f.path for f in listed}
    assert f"evaluations/{better['run_id']}.json" in files
    request = {"tracking_uri": store["tracking_uri"], "model_name": MODEL, "version": "3"}
    assert registry.promote(request) == {"champion": "3", "previous": "1"}
    assert registry.promote(request) == {"champion": "3", "previous": "1"}
    assert registry.aliases(store["tracking_uri"], MODEL) == {"champion": "3", "previous": "1"}


def _breast_cancer(leak: bool) -> object:
    """scikit-learn's breast cancer table, standardised; ``leak``: its first feature overwritten with
    the label (issue 13: a training file whose feature column held the label won every offline gate)."""
    from sklearn.datasets import load_breast_cancer

    features, label = load_breast_cancer(return_X_y=True, as_frame=True)
    features = (features - features.mean()) / features.std()
    if leak:
        features["mean radius"] = label.astype(float)
    return features.assign(label=label)


def test_an_implausibly_perfect_challenger_fails_the_offline_gate(store, tmp_path):
    base = {"tracking_uri": store["tracking_uri"], "model_name": "airloop-leak"}

    def trained(leak: bool) -> dict:
        data = write_table(_breast_cancer(leak), str(tmp_path / f"cancer-{leak}.parquet"))
        request = {"tracking_uri": store["tracking_uri"], "experiment": "leak", "data_uri": data}
        tree = {"estimator": "sklearn.tree.DecisionTreeClassifier", "estimator_params": {"max_depth": 4}}
        return train({**request, **tree})

    leaked = trained(leak=True)
    assert leaked["metrics"]["accuracy"] == 1.0
    # The first model has no champion to beat, but no error at all on 143 rows is no pass either.
    first = evaluate({**base, "run_id": leaked["run_id"]})
    assert first["verdict"] == "fail" and first["rule"] == "implausibly_perfect"
    assert first["reason"].startswith("holdout error rate 0 (143 of 143 rows right) is implausibly perfect")
    assert "perfect_scores_expected" in first["reason"]
    honest = trained(leak=False)
    assert evaluate({**base, "run_id": honest["run_id"]})["rule"] == "no_champion"
    register({**base, "run_id": honest["run_id"]})

    # Before, the leaked challenger won against the champion (p = 1.4e-14 on real data).
    verdict = evaluate({**base, "run_id": leaked["run_id"]})
    assert verdict["verdict"] == "fail" and verdict["rule"] == "implausibly_perfect", verdict
    assert verdict["difference"] > 0 and verdict["champion"]["accuracy"] < 1.0
    run = mlflow.MlflowClient(store["tracking_uri"]).get_run(leaked["run_id"])
    assert (
        run.data.tags["airloop.eval.rule"] == "implausibly_perfect" and run.data.metrics["eval.passed"] == 0
    )
    # A task where such scores are expected says so; the paired tests then decide.
    expected = evaluate({**base, "run_id": leaked["run_id"], "perfect_scores_expected": True, "alpha": 1.0})
    assert expected["rule"] == "better" and expected["verdict"] == "pass"


def test_an_error_rate_under_a_small_share_of_the_champions_is_implausible():
    import numpy as np

    from airloop.steps.training.evaluate import _implausible

    champion = np.arange(1000) >= 100  # 100 errors in 1000 rows
    nearly = np.arange(1000) >= 4  # 4 errors: 0.004, under 0.05 of the champion's 0.1
    reason = _implausible(nearly, champion, share=0.05)
    assert reason is not None and "holdout error rate 0.0040 (4 of 1000 rows wrong) is under 0.05" in reason
    better = np.arange(1000) >= 20  # 20 errors: a fifth of the champion's, a real improvement
    assert _implausible(better, champion, share=0.05) is None
    assert _implausible(nearly, None, share=0.05) is None  # without a champion only 0 errors is implausible


def test_audit_record_round_trip_in_loop_order(store):
    base = {"tracking_uri": store["tracking_uri"], "model_name": MODEL, "version": "3"}
    registry.append_audit({**base, "stage": "evaluation", "record": {"rule": "better"}})
    # Stages before registration address the training run directly.
    by_run = {"tracking_uri": store["tracking_uri"], "run_id": store["runs"]["better"]["run_id"]}
    trigger = registry.append_audit({**by_run, "stage": "trigger", "record": {"reason": "drift"}})
    assert trigger["run_id"] == by_run["run_id"]
    registry.append_audit({**base, "stage": "evaluation", "record": {"rule": "better", "retry": 2}})
    audit = registry.read_audit(store["tracking_uri"], MODEL, 3)
    assert audit["run_id"] == store["runs"]["better"]["run_id"]
    assert [s["stage"] for s in audit["stages"]] == ["trigger", "evaluation"]
    assert audit["stages"][1]["record"] == {"rule": "better", "retry": 2}
    with pytest.raises(ValueError, match="stage must be one of"):
        registry.append_audit({**base, "stage": "lunch", "record": {}})
    assert registry.read_audit(store["tracking_uri"], MODEL, 1)["stages"] == []
    # Several stages of one task in one write; those already there stay, in loop order.
    records = {"validation": {"success": True}, "data": {"rows": 1600}}
    both = registry.append_audit({**by_run, "records": records})
    assert [s["stage"] for s in both["stages"]] == ["trigger", "data", "validation", "evaluation"]
    assert both["stages"][1]["record"] == {"rows": 1600}
    with pytest.raises(ValueError, match="either 'records' or 'stage' and 'record'"):
        registry.append_audit({**by_run, "records": records, "stage": "data"})
    with pytest.raises(ValueError, match="stage must be one of"):
        registry.append_audit({**by_run, "records": {"lunch": {}}})


def test_mcnemar_mid_p_matches_hand_computed_values():
    import numpy as np

    a = np.array([True] * 10 + [False] * 2 + [True] * 5)
    b = np.array([False] * 10 + [True] * 2 + [True] * 5)
    # 10 vs 2 discordant: exact two-sided p = 2 * P(X <= 2 | n=12) = 0.0386;
    # mid-p subtracts P(X = 2) = 0.0161.
    assert mcnemar_mid_p(a, b) == pytest.approx(0.0386 - 0.0161, abs=1e-3)
    assert mcnemar_mid_p(a, a) == 1.0


# What the training function saw of the process's environment while the step ran.
SEEN_ENVIRON: list[dict[str, str]] = []


def fit_scaled_logistic(features, target, *, seed, C=1.0):
    """A user's training function: preprocessing and a classifier in one scikit-learn pipeline."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    SEEN_ENVIRON.append(dict(os.environ))
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, random_state=seed)).fit(features, target)


def test_train_from_a_user_function_logs_the_pipeline_it_returns(store):
    trained = _train(
        store, "before", {}, estimator=f"{__name__}:fit_scaled_logistic", estimator_params={"C": 0.5}
    )
    model = load_model(store["tracking_uri"], trained["model_uri"])
    assert [name for name, _ in model.steps] == ["standardscaler", "logisticregression"]
    assert model.steps[1][1].C == 0.5 and trained["metrics"]["accuracy"] > 0.8
    params = mlflow.MlflowClient(store["tracking_uri"]).get_run(trained["run_id"]).data.params
    assert params["estimator"] == f"{__name__}:fit_scaled_logistic" and params["C"] == "0.5"
    assert params["model_class"] == "sklearn.pipeline.Pipeline"
    with pytest.raises(ValueError, match="is not a function"):
        _train(store, "before", {}, estimator=f"{__name__}:SEEN_ENVIRON")
    with pytest.raises(ValueError, match="fit_regressor' returned must be a scikit-learn classifier"):
        _train(store, "before", {}, estimator=f"{__name__}:fit_regressor", estimator_params={})


def fit_regressor(features, target, *, seed):
    from sklearn.linear_model import LinearRegression

    return LinearRegression().fit(features, target)


def _context(try_number: int) -> dict:
    return task_context(
        "train", dag_id="airloop_ops", run_id="manual__ops", try_number=try_number, dag_file=__file__
    )


def test_train_operator_tags_code_and_task_keeps_secrets_out_of_the_environment(store, monkeypatch):
    from airloop.operators.mlflow import MlflowTrainModelOperator

    token = "tok-ops-71c2"
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_OPS",
        json.dumps(
            {
                "conn_type": "mlflow",
                "host": store["tracking_uri"],
                "password": token,
                "extra": {"artifact_root": store["artifact_root"], "max_retries": 1},
            }
        ),
    )
    before = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "MLFLOW_TRACKING_"))}
    operator = MlflowTrainModelOperator(
        task_id="train",
        mlflow_conn_id="mlflow_ops",
        data_uri=store["data"]["before"],
        experiment="ops",
        estimator=f"{__name__}:fit_scaled_logistic",
        estimator_params={"C": 2.0},
    )
    SEEN_ENVIRON.clear()
    context = _context(try_number=1)
    first = operator.execute(context)
    assert first["reused"] is False and context["ti"].xcom["airloop_mlflow_run"]["run_id"] == first["run_id"]
    (during,) = SEEN_ENVIRON
    # The token is in the variable that defines the connection here, and nowhere else.
    assert [key for key, value in during.items() if token in value] == ["AIRFLOW_CONN_MLFLOW_OPS"]
    assert during["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1" and during["MLFLOW_DISABLE_TELEMETRY"] == "true"
    after = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "MLFLOW_TRACKING_"))}
    assert after == before and "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ

    tags = mlflow.MlflowClient(store["tracking_uri"]).get_run(first["run_id"]).data.tags
    with open(__file__, "rb") as handle:
        assert tags["airloop.dag_code.sha256"] == hashlib.sha256(handle.read()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", tags["airloop.dag_code.git_sha"])
    assert tags["airflow.try_number"] == "1" and tags["airloop.code_version"]

    # The same task instance run again (a retry, or a cleared task): the same run, nothing trained.
    again = operator.execute(_context(try_number=2))
    assert again["run_id"] == first["run_id"] and again["reused"] is True and len(SEEN_ENVIRON) == 1


def test_the_train_operator_writes_its_stages_of_the_audit_record_at_once(store, monkeypatch, tmp_path):
    from airloop.operators.mlflow import MlflowTrainModelOperator
    from airloop.tracking.registry import AUDIT_PATH

    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_AUDIT",
        json.dumps(
            {
                "conn_type": "mlflow",
                "host": store["tracking_uri"],
                "extra": {"artifact_root": store["artifact_root"]},
            }
        ),
    )
    writes: list[str] = []
    log_dict = mlflow.MlflowClient.log_dict

    def counted(self, run_id, dictionary, artifact_file):
        if artifact_file == AUDIT_PATH:
            writes.append(run_id)
        return log_dict(self, run_id, dictionary, artifact_file)

    monkeypatch.setattr(mlflow.MlflowClient, "log_dict", counted)
    trained = MlflowTrainModelOperator(
        task_id="train",
        mlflow_conn_id="mlflow_audit",
        data_uri=store["data"]["before"],
        experiment="audit",
        estimator="sklearn.linear_model.LogisticRegression",
        validation={"success": True, "suite": "training_data"},
    ).execute(_context(try_number=1))
    assert writes == [trained["run_id"]]  # one read-modify-write for trigger, data, validation and training
    client = mlflow.MlflowClient(store["tracking_uri"])
    stages = json.loads(
        Path(client.download_artifacts(trained["run_id"], AUDIT_PATH, str(tmp_path))).read_text()
    )
    stages = stages["stages"]
    assert [s["stage"] for s in stages] == ["trigger", "data", "validation", "training"]
    assert (
        stages[2]["record"]["suite"] == "training_data" and stages[3]["record"]["run_id"] == trained["run_id"]
    )
    assert stages[1]["record"]["sha256"] == trained["fingerprint"]["sha256"]


def _drops(folder: Path) -> list:
    """scikit-learn's breast cancer table delivered in three drops, oldest first, with the files a
    writer leaves beside them."""
    table = _breast_cancer(leak=False)
    parts = [table.iloc[:200], table.iloc[200:400], table.iloc[400:]]
    for day, part in enumerate(parts, 1):
        write_table(part, str(folder / f"2026-05-0{day}.parquet"))
    (folder / "_SUCCESS").write_text("")
    (folder / ".2026-05-04.parquet.tmp").write_bytes(b"half a file")
    return parts


def test_a_training_set_takes_the_declared_window_of_the_source(tmp_path):
    from airloop.steps.training.data import build_training_set
    from airloop.tables import fingerprint, read_table

    source = tmp_path / "incoming"
    source.mkdir()
    parts = _drops(source)

    def built(window: str, data_uri: str = str(source)) -> dict:
        out = str(tmp_path / f"{window.replace(':', '-')}.parquet")
        return build_training_set({"data_uri": data_uri, "window": window, "out_path": out})

    latest = built("latest")
    assert latest["files"] == [{"name": "2026-05-03.parquet", "rows": len(parts[2])}]
    table = read_table(latest["uri"])
    assert latest["rows"] == len(table) == len(parts[2]) and latest["window"] == "latest"
    assert latest["sha256"] == fingerprint(table)["sha256"] and latest["source"] == str(source)
    assert [f["name"] for f in built("latest:2")["files"]] == ["2026-05-02.parquet", "2026-05-03.parquet"]
    every = built("all")
    assert every["rows"] == sum(map(len, parts)) == 569 and len(every["files"]) == 3
    single = built("latest:5", str(source / "2026-05-01.parquet"))  # a file is itself
    assert single["files"] == [{"name": "2026-05-01.parquet", "rows": 200}]

    # The latest drop whole, and a seeded share of each earlier one (the same rows on a retry).
    mixed = built("latest+history:0.5")
    assert mixed["files"] == [
        {"name": "2026-05-01.parquet", "rows": 100, "sampled": 0.5},
        {"name": "2026-05-02.parquet", "rows": 100, "sampled": 0.5},
        {"name": "2026-05-03.parquet", "rows": len(parts[2])},
    ]
    assert mixed["sha256"] == built("latest+history:0.5")["sha256"] and mixed["rows"] == 200 + len(parts[2])
    assert [f["name"] for f in built("latest:2+history:0.1")["files"]] == [
        "2026-05-01.parquet",
        "2026-05-02.parquet",
        "2026-05-03.parquet",
    ]

    with pytest.raises(ValueError, match="window 'newest' is not 'all', 'latest' or 'latest:<n>'"):
        built("newest")
    with pytest.raises(ValueError, match="window 'latest\\+history:0' is not"):
        built("latest+history:0")
    write_table(parts[0].drop(columns=["mean area"]), str(source / "2026-05-04.parquet"))
    with pytest.raises(ValueError, match="2026-05-04.parquet has columns .* the drops of one training set"):
        built("latest:2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no parquet or CSV file"):
        built("all", str(tmp_path / "empty"))


def test_a_training_set_keeps_the_declared_inputs_then_the_label(tmp_path):
    from airloop.steps.training.data import build_training_set
    from airloop.tables import read_table

    table = _breast_cancer(leak=False).assign(customer_id=range(569))
    source = write_table(table, str(tmp_path / "table.parquet"))

    def built(**columns: object) -> list[str]:
        out = str(tmp_path / "out.parquet")
        build_training_set({"data_uri": source, "out_path": out, **columns})
        return list(read_table(out).columns)

    every = built(label_column="label", exclude=["customer_id"])
    assert every[-1] == "label" and "customer_id" not in every and len(every) == 31
    assert built(label_column="label", features=["mean area", "mean radius"]) == [
        "mean area",
        "mean radius",
        "label",
    ]
    assert built() == list(table.columns)  # nothing declared: the table as it is
    with pytest.raises(ValueError, match=r"label column \['churned'\] not in the training data"):
        built(label_column="churned")
    with pytest.raises(ValueError, match=r"feature columns \['mean colour'\] not in the training data"):
        built(label_column="label", features=["mean area", "mean colour"])
    with pytest.raises(ValueError, match=r"key/timestamp columns \['id'\] not in the training data"):
        built(label_column="label", exclude=["id"])


def test_a_drift_triggered_retrain_trains_on_the_declared_window_and_the_audit_names_it(
    store, monkeypatch, tmp_path
):
    from datetime import UTC, datetime
    from types import SimpleNamespace

    from airloop.assets import drift_asset
    from airloop.operators.mlflow import MlflowTrainModelOperator
    from airloop.operators.tables import TablesBuildTrainingSetOperator

    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_DATA",
        json.dumps(
            {
                "conn_type": "mlflow",
                "host": store["tracking_uri"],
                "extra": {"artifact_root": store["artifact_root"]},
            }
        ),
    )
    monkeypatch.setenv("AIRLOOP_ARTEFACTS", (tmp_path / "artefacts").as_uri())
    source = tmp_path / "incoming"
    source.mkdir()
    parts = _drops(source)
    # What a drift Asset event hands the retrain: what drifted, not what to train on.
    event = SimpleNamespace(
        extra={"model_name": "airloop-data", "severity": "high", "drifted_features": ["mean radius"]},
        timestamp=datetime(2026, 5, 3, 12, tzinfo=UTC),
    )

    def context(task_id: str) -> dict:
        ctx = task_context(task_id, dag_id="airloop_loop", run_id="asset_triggered__2026-05-03")
        ctx["dag_run"].run_type = "asset_triggered"
        ctx["triggering_asset_events"] = {drift_asset("airloop-data"): [event]}
        return ctx

    built = TablesBuildTrainingSetOperator(task_id="training_data", data_uri=str(source), window="latest")
    training_set = built.execute(context("training_data"))
    # A later drop landing in the source changes nothing for this turn: the table was written once.
    write_table(parts[0], str(source / "2026-05-04.parquet"))
    assert training_set["uri"].startswith(str(tmp_path / "artefacts" / "training-sets" / "airloop_loop"))
    trained = MlflowTrainModelOperator(
        task_id="train",
        mlflow_conn_id="mlflow_data",
        data_uri=training_set["uri"],
        experiment="data",
        estimator="sklearn.tree.DecisionTreeClassifier",
        training_set=training_set,
    ).execute(context("train"))
    assert trained["fingerprint"]["sha256"] == training_set["sha256"]
    assert trained["fingerprint"]["rows"] == len(parts[2])

    client = mlflow.MlflowClient(store["tracking_uri"])
    audit = client.download_artifacts(trained["run_id"], registry.AUDIT_PATH, str(tmp_path / "audit"))
    stages = {entry["stage"]: entry["record"] for entry in json.loads(Path(audit).read_text())["stages"]}
    assert list(stages) == ["trigger", "data", "validation", "training"]
    assert stages["data"] == {
        "uri": training_set["uri"],
        "sha256": training_set["sha256"],
        "rows": len(parts[2]),
        "source": str(source),
        "window": "latest",
        "asset_events": [
            {
                "asset": "airloop://drift/airloop-data",
                "extra": event.extra,
                "timestamp": "2026-05-03T12:00:00+00:00",
            }
        ],
        "file_count": 1,
        "files": [{"name": "2026-05-03.parquet", "rows": len(parts[2])}],
    }
    run = mlflow.MlflowClient(store["tracking_uri"]).get_run(trained["run_id"])
    assert (
        run.data.tags["airloop.data.source"] == str(source)
        and run.data.tags["airloop.data.window"] == "latest"
    )

    # Training refuses a table that is not the training set that was built.
    with pytest.raises(ValueError, match="is not the training set that was built"):
        train(
            {
                "tracking_uri": store["tracking_uri"],
                "experiment": "data",
                "data_uri": str(source / "2026-05-04.parquet"),
                "training_set": training_set,
            }
        )
