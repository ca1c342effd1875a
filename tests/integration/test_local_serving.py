"""The local serving target with real processes: Seldon's wrapper serving OpenVINO IRs behind the gateway."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from airloop import runtimes, settings
from airloop.openvino_ir import ModelIntegrityError
from airloop.serving.base import get_target
from airloop.serving.local import LocalServingTarget
from airloop.serving.model import FEEDBACK_METRIC, PREDICTIONS_METRIC, OpenVinoModel
from tests.fakes.models import FEATURES, build_ir, truth

DEPLOYMENT = "churn"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("irs")
    # v2 learnt a cruder rule: a worse model, so accuracy differs between the predictors.
    return {"v1": build_ir(root / "v1", seed=1), "v2": build_ir(root / "v2", seed=2, sloppy=True)}


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> LocalServingTarget:
    try:
        runtimes.python("serving")
    except runtimes.RuntimeMissingError as exc:
        pytest.skip(f"needs the serving runtime: {exc}")
    return LocalServingTarget(home=str(tmp_path_factory.mktemp("serving")))


@pytest.fixture(scope="module")
def deployed(target, models) -> dict:
    state = target.deploy(
        DEPLOYMENT,
        [
            {"name": "v1", "model_version": "1", "model_dir": str(models["v1"]), "weight": 80},
            {"name": "v2", "model_version": "2", "model_dir": str(models["v2"]), "weight": 20},
        ],
    )
    yield state
    target.delete(DEPLOYMENT)


@pytest.fixture()
def client(deployed):
    with httpx.Client(base_url=deployed["endpoint"], trust_env=False, timeout=10) as c:
        yield c


def predict(client: httpx.Client, rows: np.ndarray) -> httpx.Response:
    return client.post("/api/v1.0/predictions", json={"data": {"names": FEATURES, "ndarray": rows.tolist()}})


def delta(after: dict, before: dict, name: str, key: str) -> int:
    return after[name][key] - before.get(name, {}).get(key, 0)


# -- the model class in-process -----------------------------------------------------------------------
def test_model_class_predicts_probabilities(models):
    model = OpenVinoModel(model_dir=str(models["v1"]))
    model.load()
    rows = np.random.default_rng(0).normal(size=(200, 4))
    probabilities = model.predict(rows, FEATURES)
    assert probabilities.shape == (200, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities.argmax(axis=1) == truth(rows)).mean() > 0.9
    assert model.class_names() == ["0", "1"]
    metrics = model.metrics()
    assert [m["key"] for m in metrics[:2]] == ["airloop_model_rows_total", "airloop_model_inference_ms"]
    predicted = {m["tags"]["class"]: m["value"] for m in metrics if m["key"] == PREDICTIONS_METRIC}
    assert predicted == {
        "0": int((probabilities.argmax(axis=1) == 0).sum()),
        "1": int((probabilities.argmax(axis=1) == 1).sum()),
    }
    assert model.metrics() == []  # reported once per prediction
    with pytest.raises(ValueError, match="expected rows of 4 features"):
        model.predict(rows[:, :3])


def test_model_class_counts_the_feedback_it_predicts_correctly(models):
    # What Prometheus reads of a predictor's accuracy on Kubernetes, where no gateway counts it.
    model = OpenVinoModel(model_dir=str(models["v2"]))
    model.load()
    rows = np.random.default_rng(4).normal(size=(300, 4))
    right = int((model.predict(rows, FEATURES).argmax(axis=1) == truth(rows)).sum())
    model.metrics()
    # Seldon passes the truth as an array of rows, the request's features as the features.
    assert model.send_feedback(rows, FEATURES, 0.0, truth(rows)[:, None]) == []
    counts = {m["tags"]["outcome"]: m["value"] for m in model.metrics() if m["key"] == FEEDBACK_METRIC}
    assert counts == {"correct": right, "incorrect": 300 - right}
    assert 0 < right < 300  # v2 is the sloppy model: both outcomes occur
    assert model.metrics() == []
    model.send_feedback(np.empty((0, 4)), FEATURES, 1.0, None)  # nothing to judge: nothing counted
    assert model.metrics() == []
    with pytest.raises(ValueError, match="2 truth labels for 3 rows"):
        model.send_feedback(rows[:3], FEATURES, 0.0, [1, 0])


def test_model_class_refuses_altered_or_missing_files(models, tmp_path):
    altered = Path(shutil.copytree(models["v1"], tmp_path / "altered"))
    with (altered / "model.bin").open("r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(ModelIntegrityError, match="checksum mismatch for model file 'model.bin'"):
        OpenVinoModel(model_dir=str(altered)).load()
    (altered / "model.bin").unlink()
    with pytest.raises(ModelIntegrityError, match="'model.bin' .* is missing"):
        OpenVinoModel(model_dir=str(altered)).load()


# -- the target ---------------------------------------------------------------------------------------
def test_registry_and_input_checks(target, models):
    assert isinstance(get_target("local", home=target.home), LocalServingTarget)
    with pytest.raises(ValueError, match="unknown serving target 'nope'"):
        get_target("nope")
    with pytest.raises(ValueError, match="weights must sum to 100"):
        target.deploy(
            "other", [{"name": "v1", "model_version": "1", "model_dir": str(models["v1"]), "weight": 60}]
        )
    with pytest.raises(ValueError, match="invalid deployment name"):
        target.deploy("Bad_Name", [])


def test_traffic_split_follows_weights(deployed, target):
    before = target.metrics(DEPLOYMENT)

    def send(rows: np.ndarray) -> Counter:
        served = Counter()
        with httpx.Client(base_url=deployed["endpoint"], trust_env=False, timeout=10) as c:
            for row in rows:
                answer = predict(c, row[None, :])
                assert answer.status_code == 200, answer.text
                assert answer.json()["meta"]["puid"] == answer.headers["X-Airloop-Request-Id"]
                served[answer.headers["X-Airloop-Predictor"]] += 1
        return served

    with ThreadPoolExecutor(4) as pool:
        rows = np.random.default_rng(1).normal(size=(1000, 4))
        served = sum(pool.map(send, np.array_split(rows, 4)), Counter())
    # Binomial(1000, 0.8): standard deviation 12.6, so +-60 is almost five of them.
    assert abs(served["v1"] - 800) <= 60, served
    after = target.metrics(DEPLOYMENT)
    assert {n: delta(after, before, n, "requests") for n in ("v1", "v2")} == dict(served)
    assert delta(after, before, "v1", "errors") == delta(after, before, "v2", "errors") == 0
    assert after["v1"]["latency_ms_buckets"]["+Inf"] == after["v1"]["requests"]


def model_feedback(spec: dict) -> dict[str, float]:
    """The model server's own feedback counters, from Seldon's metrics port: ``{outcome: rows}``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{spec['metrics_port']}/metrics", trust_env=False, timeout=10).text
    counts: dict[str, float] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{FEEDBACK_METRIC}_total":
                counts[sample.labels["outcome"]] += sample.value
    return counts


def test_feedback_gives_accuracy_per_predictor(deployed, target, client):
    predictors = target.state(DEPLOYMENT)["predictors"]
    served_before = {name: model_feedback(spec) for name, spec in predictors.items()}
    before = target.metrics(DEPLOYMENT)
    rows = np.random.default_rng(2).normal(size=(200, 4))
    expected = {"v1": [0, 0], "v2": [0, 0]}  # [feedback, correct]
    for row, label in zip(rows, truth(rows), strict=True):
        answer = predict(client, row[None, :])
        name = answer.headers["X-Airloop-Predictor"]
        expected[name][0] += 1
        expected[name][1] += int(np.argmax(answer.json()["data"]["ndarray"][0]) == label)
        # Seldon's feedback body for one, the short form with the id in a header for the other.
        body = (
            {"response": answer.json(), "truth": {"data": {"ndarray": [[int(label)]]}}, "reward": 1}
            if name == "v1"
            else {"truth": int(label)}
        )
        fed = client.post(
            "/api/v1.0/feedback",
            json=body,
            headers={"X-Airloop-Request-Id": answer.headers["X-Airloop-Request-Id"]},
        )
        assert fed.status_code == 200, fed.text
    after = target.metrics(DEPLOYMENT)
    for name, (feedback, correct) in expected.items():
        assert delta(after, before, name, "feedback") == feedback
        assert delta(after, before, name, "feedback_correct") == correct
    assert expected["v1"][1] / expected["v1"][0] > expected["v2"][1] / expected["v2"][0]
    # Each model server counted the feedback passed on to it the same way, on its own metrics port.
    for name, (feedback, correct) in expected.items():
        served = model_feedback(predictors[name])
        assert served["correct"] - served_before[name]["correct"] == correct
        assert served["incorrect"] - served_before[name]["incorrect"] == feedback - correct
    unknown = client.post("/api/v1.0/feedback", json={"request_id": "nope", "truth": 1})
    assert unknown.status_code == 404


def test_request_log_holds_every_request(deployed, client):
    rows = np.random.default_rng(3).normal(size=(40, 4))
    sent = {}
    for row in rows:
        answer = predict(client, row[None, :])
        sent[answer.headers["X-Airloop-Request-Id"]] = (answer.headers["X-Airloop-Predictor"], row.tolist())
    folder = Path(urlparse(settings.artefact_root()).path) / "requests" / DEPLOYMENT
    logged: dict[str, dict] = {}
    deadline = time.monotonic() + 20  # the gateway writes a batch at least every 5 s
    while not sent.keys() <= logged.keys() and time.monotonic() < deadline:
        time.sleep(0.5)
        logged = {
            r["request_id"]: r
            for f in folder.glob("*/*.jsonl")
            for r in map(json.loads, f.read_text().splitlines())
        }
    assert sent.keys() <= logged.keys()
    for request_id, (predictor, row) in sent.items():
        record = logged[request_id]
        assert record["predictor"] == predictor and record["status"] == 200
        assert record["names"] == FEATURES and record["features"] == [row]
        assert len(record["prediction"][0]) == 2 and record["latency_ms"] > 0
    assert not list(folder.glob("*/.*.tmp"))


def test_weights_change_under_load_without_failures(deployed, target, client):
    failures, served_after_switch, stop = [], Counter(), threading.Event()
    switched = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=deployed["endpoint"], trust_env=False, timeout=10) as c:
            while not stop.is_set():
                was_switched = switched.is_set()
                answer = predict(c, np.zeros((1, 4)))
                if answer.status_code != 200:
                    failures.append(answer.text)
                elif was_switched:
                    served_after_switch[answer.headers["X-Airloop-Predictor"]] += 1

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.5)
        target.set_traffic(DEPLOYMENT, {"v1": 50, "v2": 50})
        time.sleep(0.5)
        # From another, short-lived process, as an Airflow task would: state comes from state.json.
        call = (
            f"from airloop.serving.local import LocalServingTarget; import json; "
            f"print(json.dumps(LocalServingTarget(home={target.home!r})"
            f".set_traffic({DEPLOYMENT!r}, {{'v1': 0, 'v2': 100}})))"
        )
        done = subprocess.run([sys.executable, "-c", call], capture_output=True, text=True, check=True)
        assert json.loads(done.stdout)["predictors"]["v2"]["weight"] == 100
        switched.set()
        time.sleep(1.0)
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert failures == []
    assert served_after_switch["v1"] == 0 and served_after_switch["v2"] > 0
    state = target.set_traffic(DEPLOYMENT, {"v1": 80, "v2": 20})
    assert {n: p["weight"] for n, p in state["predictors"].items()} == {"v1": 80, "v2": 20}


def test_a_shadow_gets_mirrored_requests_and_no_client_gets_its_answers(deployed, target, client):
    state = target.set_traffic(DEPLOYMENT, {"v1": 100}, shadow={"v2": 100})
    assert (state["predictors"]["v2"]["shadow"], state["predictors"]["v2"]["weight"]) == (True, 100)
    before = target.metrics(DEPLOYMENT)
    served = Counter()
    for row in np.random.default_rng(5).normal(size=(150, 4)):
        answer = predict(client, row[None, :])
        served[(answer.status_code, answer.headers["X-Airloop-Predictor"])] += 1
    assert served == {(200, "v1"): 150}
    deadline = time.monotonic() + 20  # mirrored requests finish after their clients got answers
    while delta(target.metrics(DEPLOYMENT), before, "v2", "pairs") < 150 and time.monotonic() < deadline:
        time.sleep(0.2)
    after = target.metrics(DEPLOYMENT)
    pairs, agreements = delta(after, before, "v2", "pairs"), delta(after, before, "v2", "agreements")
    assert pairs == delta(after, before, "v2", "requests") == 150
    # v2 ignores a feature v1 uses: they agree mostly, not always.
    assert 0.5 * pairs < agreements < pairs
    # Back to a canary: the shadow is live again at its weight.
    state = target.set_traffic(DEPLOYMENT, {"v1": 80, "v2": 20})
    assert (state["predictors"]["v2"]["shadow"], state["predictors"]["v2"]["weight"]) == (False, 20)


def test_altered_model_is_refused_naming_the_file(deployed, target, models, tmp_path):
    altered = Path(shutil.copytree(models["v2"], tmp_path / "v3"))
    manifest = json.loads((altered / "manifest.json").read_text())
    manifest["files"]["model.bin"] = "0" * 64
    (altered / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError, match="model.bin"):
        target.deploy(
            DEPLOYMENT, [{"name": "v3", "model_version": "3", "model_dir": str(altered), "weight": 0}]
        )
    assert set(target.state(DEPLOYMENT)["predictors"]) == {"v1", "v2"}


def test_crashed_predictor_counts_errors_no_client_sees_them_and_deploy_restarts_it(deployed, target, client):
    before = target.metrics(DEPLOYMENT)
    os.killpg(target.state(DEPLOYMENT)["predictors"]["v2"]["pid"], signal.SIGKILL)
    codes = Counter()
    for _ in range(200):
        answer = predict(client, np.zeros((1, 4)))
        codes[(answer.headers["X-Airloop-Predictor"], answer.status_code)] += 1
    after = target.metrics(DEPLOYMENT)
    # Every request that went to v2 failed there (its error) and was answered by v1.
    assert codes == {("v1", 200): 200}
    assert 0 < delta(after, before, "v2", "errors") == delta(after, before, "v2", "requests")
    assert delta(after, before, "v1", "errors") == 0
    assert delta(after, before, "v1", "requests") == 200
    assert target.state(DEPLOYMENT)["predictors"]["v2"]["healthy"] is False

    state = target.deploy(DEPLOYMENT, [])
    assert all(p["healthy"] for p in state["predictors"].values())
    assert predict(client, np.zeros((1, 4))).status_code == 200


def test_client_mistakes_are_4xx_never_a_predictors_error_and_every_server_keeps_answering(
    deployed, target, client
):
    before = target.metrics(DEPLOYMENT)
    junk = [
        '{"data": {"names": ["f0", "f1", "f2", "f3"], "ndarray": [[0.1, NaN, 0, 0]]}}',
        '{"data": {"ndarray": [[Infinity, 0, 0, 0]]}}',
        '{"data": {"ndarray": [[1e400, 0, 0, 0]]}}',
        '{"data": {"ndarray": [[null, 0, 0, 0]]}}',
        '{"data": {"ndarray": [[0, 0, 0, 0], [0, 0]]}}',
        "[" * 100_000 + "]" * 100_000,
    ]
    for body in junk:
        answer = client.post("/api/v1.0/predictions", content=body)
        assert answer.status_code == 400, answer.text
    # Over the limit (4 MiB by default): 413, whatever the body.
    assert client.post("/api/v1.0/predictions", content=b"[" * (5 << 20)).status_code == 413
    # The model class refuses them too, through Seldon's wrapper (a client of a predictor itself).
    v1 = target.state(DEPLOYMENT)["predictors"]["v1"]
    direct = httpx.post(
        f"http://127.0.0.1:{v1['port']}/api/v1.0/predictions",
        content='{"data": {"names": ["f0", "f1", "f2", "f3"], "ndarray": [[0, 0, Infinity, 0]]}}',
        headers={"content-type": "application/json"},
        trust_env=False,
        timeout=10,
    )
    assert direct.status_code == 400 and "feature 'f2' of row 0 must be a finite number" in direct.text
    assert predict(client, np.zeros((1, 4))).status_code == 200
    after = target.metrics(DEPLOYMENT)
    assert sum(delta(after, before, n, "requests") for n in ("v1", "v2")) == 1
    assert delta(after, before, "v1", "errors") == delta(after, before, "v2", "errors") == 0


def test_the_admin_api_needs_the_deployments_token(deployed, target, client):
    token_file = Path(target.home) / DEPLOYMENT / "admin-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    forged = {"v1": {"url": "http://127.0.0.1:9", "model_version": "9", "weight": 100}}
    assert client.put("/admin/predictors", json=forged).status_code == 401
    assert client.get("/admin/state").status_code == 401
    headers = {"Authorization": f"Bearer {token_file.read_text()}"}
    assert client.get("/admin/state", headers=headers).json()["predictors"]["v1"]["model_version"] == "1"
    assert predict(client, np.zeros((1, 4))).status_code == 200


SELDON_CLIENT = """
import json, sys
import numpy as np
from seldon_core.seldon_client import SeldonClient
from seldon_core.utils import array_to_grpc_datadef
from seldon_core.proto import prediction_pb2

endpoint, rows, labels = sys.argv[1], np.array(json.loads(sys.argv[2])), json.loads(sys.argv[3])
client = SeldonClient(
    gateway="ambassador", transport="rest", gateway_endpoint=endpoint, client_return_type="proto"
)
out = []
for payload_type in ("tensor", "ndarray"):
    for row, label in zip(rows, labels):
        answer = client.predict(data=row[None, :], names=["f0", "f1", "f2", "f3"], payload_type=payload_type,
            gateway_prefix="",
        )
        truth = prediction_pb2.SeldonMessage(data=array_to_grpc_datadef(payload_type, np.array([[label]])))
        fed = client.feedback(
            prediction_request=answer.request, prediction_response=answer.response,
            prediction_truth=truth, reward=1.0, gateway_prefix="",
        )
        probabilities = answer.response.data.tensor.values if payload_type == "tensor" else None
        out.append({
            "type": payload_type, "success": answer.success, "msg": answer.msg,
            "puid": answer.response.meta.puid,
            "predictor": answer.response.meta.tags["predictor"].string_value,
            "tensor": list(probabilities) if probabilities is not None else None,
            "feedback": fed.success, "feedback_msg": fed.msg,
        })
print(json.dumps(out))
"""


def test_seldon_core_own_client_predicts_and_sends_feedback_through_the_gateway(deployed, target):
    before = target.metrics(DEPLOYMENT)
    rows = np.random.default_rng(7).normal(size=(10, 4))
    endpoint = deployed["endpoint"].removeprefix("http://")
    done = subprocess.run(
        [
            runtimes.python("serving"),
            "-c",
            SELDON_CLIENT,
            endpoint,
            json.dumps(rows.tolist()),
            json.dumps(truth(rows).tolist()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_PROXY": "*"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.splitlines()[-1])
    assert len(results) == 20
    for result in results:
        assert result["success"] and result["feedback"], result
        assert len(result["puid"]) == 32 and result["predictor"] in {"v1", "v2"}
    assert all(len(r["tensor"]) == 2 for r in results if r["type"] == "tensor")
    after = target.metrics(DEPLOYMENT)
    assert sum(delta(after, before, n, "feedback") for n in ("v1", "v2")) == 20


def test_remove_needs_zero_weight(deployed, target):
    with pytest.raises(ValueError, match="set its weight to 0 first"):
        target.remove(DEPLOYMENT, "v2")
    target.set_traffic(DEPLOYMENT, {"v1": 100, "v2": 0})
    pid = target.state(DEPLOYMENT)["predictors"]["v2"]["pid"]
    state = target.remove(DEPLOYMENT, "v2")
    assert set(state["predictors"]) == {"v1"}
    assert not _group_alive(pid)


def test_delete_leaves_no_process(deployed, target):
    state = target.state(DEPLOYMENT)
    pids = [state["gateway"]["pid"], *(p["pid"] for p in state["predictors"].values())]
    assert all(_group_alive(pid) for pid in pids)
    target.delete(DEPLOYMENT)
    assert not any(_group_alive(pid) for pid in pids)
    with pytest.raises(ValueError, match="not deployed"):
        target.state(DEPLOYMENT)
    target.delete(DEPLOYMENT)  # nothing left to stop: a no-op


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
