"""Feast in the reference DAGs and in serving, on the embedded default (the reference repo, local provider).

``airloop_features`` applies the reference repo and materialises it; ``airloop_loop`` with
``source=feast`` builds its training set from it and passes it through the data gate; a real
``feast serve`` answers the gateway's lookups for requests that carry only entity keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from airloop import settings
from airloop.embedded.demo import FEATURES, generate
from airloop.hooks.feast import FeastHook
from airloop.ports import free_port
from airloop.serving.features import FeatureLookup
from airloop.serving.gateway import Gateway, parse_routes
from airloop.steps.data.features import REFERENCE_ENTITY, REFERENCE_FEATURES, reference_tables
from airloop.tables import read_table, write_table

REPO = Path(__file__).resolve().parents[2]
ROWS = 300


@pytest.fixture(scope="module")
def reference():
    """The reference data set as the reference repo's feature rows, and its labels as entity rows."""
    observations, entity_rows = reference_tables(ROWS)
    settings.feast_dir().mkdir(parents=True, exist_ok=True)
    write_table(observations, str(settings.feast_dir() / REFERENCE_FEATURES))
    write_table(entity_rows, str(settings.feast_dir() / "entity_rows.parquet"))  # the loop's default
    return observations


@pytest.fixture(scope="module")
def dagbag():
    subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True, capture_output=True
    )
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag


def _states(run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in run.get_task_instances()}


@pytest.fixture(scope="module")
def features_run(dagbag, reference):
    return dagbag.get_dag("airloop_features").test()


def test_features_dag_applies_the_reference_repo_and_materialises_it(features_run, reference):
    assert _states(features_run) == {"apply": "success", "materialize": "success"}
    store = FeastHook().store
    assert [v.name for v in store.list_feature_views()] == ["observations"]
    rows = [{REFERENCE_ENTITY: i} for i in (0, 7, ROWS - 1)]
    online = store.get_online_features(features=store.get_feature_service("training"), entity_rows=rows)
    assert online.to_dict()["f3"] == reference.loc[[0, 7, ROWS - 1], "f3"].tolist()


def _loop_until_validate():
    """The loop's first tasks, parsed afresh: ``dag.test()`` leaves a run's conf in the DAG's params."""
    from airflow.dag_processing.dagbag import DagBag

    loop = DagBag(dag_folder=str(REPO / "dags" / "airloop_loop.py")).get_dag("airloop_loop")
    return loop.partial_subset(task_ids=["validate"], include_upstream=True)


def test_loop_trains_on_a_training_set_from_feast(features_run):
    run = _loop_until_validate().test(run_conf={"source": "feast"})
    assert _states(run) == {
        "source": "success",
        "training_set": "success",
        "training_data": "success",
        "validate": "success",
    }
    built = next(ti for ti in run.get_task_instances() if ti.task_id == "training_set").xcom_pull(
        task_ids="training_set"
    )
    assert (built["rows_in"], built["rows_out"]) == (ROWS, ROWS)
    validated = next(ti for ti in run.get_task_instances() if ti.task_id == "validate").xcom_pull(
        task_ids="validate"
    )
    # The gate validated the table training_data wrote from Feast's: the same content.
    table = next(ti for ti in run.get_task_instances() if ti.task_id == "training_data").xcom_pull(
        task_ids="training_data"
    )
    assert table["source"] == built["uri"] and validated["data_uri"] == table["uri"]
    assert validated["fingerprint"] == built["fingerprint"]
    # the gate checked the content against what Feast said it wrote: one more evaluated check than the suite
    suite = json.loads((REPO / "dags" / "expectations" / "training_data.json").read_text())
    assert validated["evaluated"] == len(suite["expectations"]) + 1
    # the join gives back the very rows of the reference data set, in order
    assert read_table(built["uri"])[[*FEATURES, "label"]].equals(generate(ROWS)[[*FEATURES, "label"]])


def test_loop_with_the_default_file_source_skips_feast(dagbag, tmp_path):
    data = write_table(generate(200, seed=5), str(tmp_path / "train.parquet"))
    run = _loop_until_validate().test(run_conf={"data_uri": data})
    assert _states(run) == {
        "source": "success",
        "training_set": "skipped",
        "training_data": "success",
        "validate": "success",
    }
    validate = next(ti for ti in run.get_task_instances() if ti.task_id == "validate")
    table = validate.xcom_pull(task_ids="training_data")
    assert table["source"] == data and validate.xcom_pull(task_ids="validate")["data_uri"] == table["uri"]


@pytest.fixture(scope="module")
def feature_server(features_run, tmp_path_factory) -> Iterator[str]:
    """``feast serve`` on the embedded store, bound to 127.0.0.1; stopped with its process group."""
    store = FeastHook().store_config
    config = tmp_path_factory.mktemp("feast_serve") / "feature_store.yaml"
    config.write_text(yaml.safe_dump(store["config"]))
    port = free_port()
    log = open(config.parent / "serve.log", "wb")
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "feast"),
            "--chdir",
            store["repo_path"],
            "--feature-store-yaml",
            str(config),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (config.parent / "serve.log").read_text()
            assert time.monotonic() < deadline, "feast serve did not answer within 120 s"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@contextlib.contextmanager
def _serving(app) -> Iterator[str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


async def _echo(request: Request) -> JSONResponse:
    """A model server that answers every row with [0.5, 0.5] and says what it received."""
    data = (await request.json())["data"]
    return JSONResponse(
        {
            "data": {"names": ["0", "1"], "ndarray": [[0.5, 0.5]] * len(data["ndarray"])},
            "meta": {"tags": {"names": data.get("names"), "rows": data["ndarray"]}},
        }
    )


def test_gateway_looks_up_features_for_requests_with_only_entity_keys(feature_server, reference, tmp_path):
    order = ["f7", *FEATURES[:7]]  # any order: the model's, as configured
    lookup = FeatureLookup.from_config(
        {
            "url": feature_server,
            "entities": [REFERENCE_ENTITY],
            "features": [f"observations:{name}" for name in order],
        }
    )
    with _serving(Starlette(routes=[Route("/api/v1.0/predictions", _echo, methods=["POST"])])) as model:
        table = parse_routes({"v1": {"url": model, "model_version": "1", "weight": 100}})
        artefacts = (tmp_path / "artefacts").as_uri()
        gateway = Gateway("feast-test", table, artefact_root=artefacts, features=lookup)
        with _serving(gateway.app()) as endpoint, httpx.Client(base_url=endpoint, timeout=20) as client:
            keys = client.post(
                "/api/v1.0/predictions", json={"data": {"names": [REFERENCE_ENTITY], "ndarray": [[5], [42]]}}
            )
            assert keys.status_code == 200, keys.text
            # The predictor echoes what it received; the gateway adds its own tags (predictor, version).
            received = {k: keys.json()["meta"]["tags"][k] for k in ("names", "rows")}
            assert received == {"names": order, "rows": reference.loc[[5, 42], order].values.tolist()}
            unknown = client.post(
                "/api/v1.0/predictions",
                json={"data": {"names": [REFERENCE_ENTITY], "ndarray": [[5], [10**9]]}},
            )
            assert unknown.status_code == 404 and "1 of 2 rows" in unknown.json()["status"]["info"]
            row = [[0.1] * len(order)]
            direct = client.post("/api/v1.0/predictions", json={"data": {"names": order, "ndarray": row}})
            tags = direct.json()["meta"]["tags"]
            assert {k: tags[k] for k in ("names", "rows")} == {"names": order, "rows": row}  # as they are


ECHO_MODEL = '''
class Echo:
    """A Seldon model class that answers each row with the row it was given."""

    def __init__(self, model_dir):
        self.model_dir = model_dir

    def predict(self, X, features_names=None, meta=None):
        return X
'''


def test_local_target_gives_its_gateway_the_feature_lookup(feature_server, reference, tmp_path, monkeypatch):
    from airloop import runtimes
    from airloop.serving.local import LocalServingTarget

    try:
        runtimes.python("serving")
    except runtimes.RuntimeMissingError as exc:
        pytest.skip(f"needs the serving runtime: {exc}")
    (tmp_path / "echo_model.py").write_text(ECHO_MODEL)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the model servers inherit it
    predictor = {"name": "v1", "model_version": "1", "model_dir": str(tmp_path), "weight": 100}
    lookup = {
        "url": feature_server,
        "entities": [REFERENCE_ENTITY],
        "features": [f"observations:{name}" for name in FEATURES],
    }
    home, keys = str(tmp_path / "serving"), {"data": {"names": [REFERENCE_ENTITY], "ndarray": [[3], [9]]}}
    plain = LocalServingTarget(home=home, model_class="echo_model.Echo").deploy("feast-echo", [predictor])
    try:
        answer = httpx.post(f"{plain['endpoint']}/api/v1.0/predictions", json=keys, timeout=20)
        assert answer.json()["data"]["ndarray"] == [[3], [9]]  # no lookup configured: keys reach the model
        enriched = LocalServingTarget(home=home, model_class="echo_model.Echo", features=lookup).deploy(
            "feast-echo", [predictor]
        )
        assert enriched["gateway"]["pid"] != plain["gateway"]["pid"]  # restarted for the new configuration
        assert enriched["predictors"]["v1"]["pid"] == plain["predictors"]["v1"]["pid"]
        answer = httpx.post(f"{enriched['endpoint']}/api/v1.0/predictions", json=keys, timeout=20)
        assert answer.json()["data"]["ndarray"] == reference.loc[[3, 9], FEATURES].values.tolist()
    finally:
        LocalServingTarget(home=home).delete("feast-echo")
