"""Loops from specs (``dags/airloop_loops.py``): two real data sets that ship with scikit-learn, each a
loop drafted by ``airloop init``, side by side in one Airflow; each turn runs with ``dag.test()``.

wine (3 classes, 13 features) and breast_cancer (2 classes, 30 features): each first turn trains,
passes the data gate and the OpenVINO parity gate, registers and serves its own champion; a drift in
wine's window updates wine's drift Asset only; a spec naming a column the data lacks stops at the
first task, before anything is trained or registered. A generated customer table (categorical string
columns, an integer-coded category the spec declares, missing values, integer labels) runs its turn
through the parity gate, and its deployment answers raw rows with nulls and unseen categories.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from airloop import runtimes, settings
from tests.fakes.tables import DECLARED, LABEL, customers

REPO = Path(__file__).resolve().parents[2]


def _table(name: str):
    from sklearn import datasets

    frame = getattr(datasets, f"load_{name}")(as_frame=True).frame
    frame.columns = [str(c).replace(" ", "_").replace("/", "_") for c in frame.columns]
    return frame


@pytest.fixture(scope="module")
def loops(tmp_path_factory):
    try:
        runtimes.python("torch")  # the drafted estimator, a random forest, converts through hummingbird-ml
    except runtimes.RuntimeMissingError as e:
        pytest.skip(str(e))
    subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True, capture_output=True
    )
    from airloop.loops.init import draft

    root = tmp_path_factory.mktemp("loops")
    folder = root / "loops"
    halves = {}
    for name in ("wine", "breast_cancer"):
        frame = _table(name).sample(frac=1.0, random_state=0).reset_index(drop=True)
        half = len(frame) // 2
        halves[name] = (frame.iloc[:half], frame.iloc[half:])
        data = root / f"{name}.csv"
        halves[name][0].to_csv(data, index=False)
        draft(str(data), "target", folder, name=name.replace("_", "-"))
    customers().to_parquet(root / "customers.parquet")
    # Its integer-coded store is a category, which its type hides: declared, as --categorical does.
    draft(str(root / "customers.parquet"), LABEL, folder, declared=[DECLARED])
    for path in folder.glob("*.yaml"):  # short canary windows: dag.test runs no clients
        spec = yaml.safe_load(path.read_text())
        spec["rollout"]["analysis_seconds"] = 1
        if spec["name"] == "wine":  # wine's model comes from a search: 2 rounds of 2 Optuna trials
            space = {"max_depth": {"int": [2, 10]}, "min_samples_leaf": {"int": [1, 8], "log": True}}
            spec["model"]["search"] = {"space": space, "rounds": 2, "trials": 2}
        path.write_text(yaml.safe_dump(spec))
    return root, folder, halves


@pytest.fixture(scope="module")
def dagbag(loops, monkeypatch_module):
    _, folder, _ = loops
    monkeypatch_module.setenv("AIRLOOP_LOOPS_DIR", str(folder))
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags" / "airloop_loops.py"))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _states(run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in run.get_task_instances()}


@pytest.fixture(scope="module")
def first_turns(dagbag):
    runs = {name: dagbag.get_dag(f"{name}_loop").test() for name in ("wine", "breast-cancer")}
    yield runs
    from airloop.serving.base import get_target

    for name in runs:
        get_target("local").delete(name)


def test_each_spec_is_a_loop_and_a_monitor_on_its_own_asset(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == {
        "wine_loop",
        "wine_drift_monitor",
        "breast-cancer_loop",
        "breast-cancer_drift_monitor",
        "customers_loop",
        "customers_drift_monitor",
    }
    for name in ("wine", "breast-cancer"):
        (outlet,) = dagbag.get_dag(f"{name}_drift_monitor").get_task("decide").outlets
        assert outlet.uri == f"airloop://drift/{name}"
        assert dagbag.get_dag(f"{name}_loop").timetable.asset_condition == outlet


def test_both_first_turns_make_their_own_served_champion(first_turns):
    from mlflow import MlflowClient

    from airloop.serving.base import get_target
    from airloop.tracking.registry import aliases

    client = MlflowClient(settings.mlflow_tracking_uri())
    for name, run in first_turns.items():
        assert str(run.state) == "success", (name, _states(run))
        assert aliases(settings.mlflow_tracking_uri(), name) == {"champion": "1"}
        (version,) = client.search_model_versions(f"name='{name}'")
        experiment = client.get_experiment(client.get_run(version.run_id).info.experiment_id)
        assert experiment.name == name
        served = get_target("local").state(name)
        assert {n: p["weight"] for n, p in served["predictors"].items()} == {"v1": 100}
    # Each model was trained on its own data's columns, the label left out.
    wine_run = client.get_run(client.get_model_version("wine", "1").run_id)
    assert wine_run.data.params["model_class"] == "sklearn.ensemble._forest.RandomForestClassifier"
    assert float(wine_run.data.metrics["accuracy"]) > 0.85
    # wine's champion is the best of its search's four trials, two rounds of Optuna's suggestions.
    selected = first_turns["wine"].get_task_instance("train").xcom_pull(task_ids="train")
    assert len(selected["candidates"]) == 4 and selected["run_id"] == wine_run.info.run_id
    assert selected["metrics"]["accuracy"] == max(c["value"] for c in selected["candidates"])
    asked = [
        first_turns["wine"].get_task_instance(f"suggest_{r}").xcom_pull(task_ids=f"suggest_{r}")
        for r in (0, 1)
    ]
    assert all(len(round_) == 2 and 2 <= p["max_depth"] <= 10 for round_ in asked for p in round_)


def test_a_drift_in_one_loop_updates_its_asset_only(first_turns, loops, tmp_path):
    root, folder, halves = loops
    shifted = halves["breast_cancer"][1].copy()
    # A covariate shift on strong features (wine's 89 rows a half are under the monitor's 200).
    shifted["mean_radius"] = shifted["mean_radius"] * 1.5
    shifted["worst_texture"] = shifted["worst_texture"] + 8.0
    window = tmp_path / "window.parquet"
    shifted.drop(columns=["target"]).to_parquet(window)
    path = folder / "breast-cancer.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["drift"]["window"] = {"uri": str(window)}
    spec["drift"]["actions"] = {"low": "retrain", "medium": "retrain", "high": "retrain"}
    path.write_text(yaml.safe_dump(spec))
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags" / "airloop_loops.py"))
    run = bag.get_dag("breast-cancer_drift_monitor").test(run_conf={"cooldown_minutes": 0})
    assert str(run.state) == "success", _states(run)
    detection = run.get_task_instance("detect").xcom_pull(task_ids="detect")
    assert detection["verdict"] == "drift" and "mean_radius" in detection["drifted_features"]
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    mine = ("airloop://drift/wine", "airloop://drift/breast-cancer")
    with create_session() as session:  # the test session's Airflow: other tests' events are there too
        events = [e.asset.uri for e in session.query(AssetEvent).all() if e.asset.uri in mine]
    assert events == ["airloop://drift/breast-cancer"]


def test_a_spec_naming_a_column_the_data_lacks_stops_before_training(first_turns, loops, tmp_path, capsys):
    from mlflow import MlflowClient

    from airloop.loops.dags import loop_dags

    _, folder, _ = loops
    spec = yaml.safe_load((folder / "wine.yaml").read_text())
    spec["features"] = ["alcohol", "colour"]
    bad = {**spec, "suite": str(folder / spec["suite"]), "data": {"uri": str(folder / spec["data"]["uri"])}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    loop, _ = loop_dags(tmp_path / "bad.yaml")
    states = _states(loop.test())
    assert states["training_data"] == "failed"
    assert all(states[t] == "upstream_failed" for t in ("validate", "train", "register", "rollout"))
    assert "feature columns ['colour'] not in the training data" in capsys.readouterr().out
    client = MlflowClient(settings.mlflow_tracking_uri())
    assert [str(v.version) for v in client.search_model_versions("name='wine'")] == ["1"]


@pytest.fixture(scope="module")
def customers_turn(dagbag):
    run = dagbag.get_dag("customers_loop").test()
    yield run
    from airloop.serving.base import get_target

    get_target("local").delete("customers")


def test_categories_and_missing_values_pass_the_parity_gate_and_are_served_raw(customers_turn):
    import httpx

    from airloop.serving.base import get_target

    assert str(customers_turn.state) == "success", _states(customers_turn)
    converted = customers_turn.get_task_instance("convert").xcom_pull(task_ids="convert")
    trained = customers_turn.get_task_instance("train").xcom_pull(task_ids="train")
    assert converted["passed"] and converted["family"] == "RandomForestClassifier", converted["reason"]
    # The whole pipeline (scikit-learn's imputer and encoder, then the forest) against the IR on what
    # serving makes of the raw holdout rows.
    assert converted["conversion_check"]["label_agreement"] == 1.0
    assert converted["conversion_check"]["max_abs_diff"] <= 1e-5
    assert converted["native_accuracy"] == pytest.approx(trained["metrics"]["accuracy"])
    assert trained["metrics"]["accuracy"] > 0.6  # the majority class: 0.40
    print(
        f"customers: native accuracy {converted['native_accuracy']:.4f}, OpenVINO"
        f" {converted['parity']['variant']} {converted['parity']['accuracy']:.4f}"
    )
    state = get_target("local").state("customers")
    names = ["region", "plan", DECLARED, "tenure", "spend"]
    rows = [["north", None, 3, None, 48.0], ["atlantis", "pro", 9, 30.0, None], [None] * 5]
    answer = httpx.post(
        f"http://127.0.0.1:{state['gateway']['port']}/api/v1.0/predictions",
        json={"data": {"names": names, "ndarray": rows}},
        trust_env=False,
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    # Class probabilities of the served variant (int8 when the benchmark picks it: near, not exactly, 1).
    probabilities = answer.json()["data"]["ndarray"]
    assert len(probabilities) == 3 and all(abs(sum(p) - 1) < 0.02 for p in probabilities)
    refused = httpx.post(
        f"http://127.0.0.1:{state['gateway']['port']}/api/v1.0/predictions",
        json={"data": {"names": names, "ndarray": [["north", "pro", 3, "long", 48.0]]}},
        trust_env=False,
        timeout=30,
    )
    assert refused.status_code == 400 and "feature 'tenure' must be a number or null" in refused.text
