"""The local serving target on MLServer (``server="mlserver"``): the OpenVINO IR over the V2 protocol
behind the gateway, driven by the V2 protocol's official client (tritonclient, in the mlserver runtime)
and by Seldon-protocol clients through the gateway, which translates."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from airloop import runtimes, settings
from airloop.openvino_ir import ir_predictor
from airloop.serving.local import V2_MODEL, LocalServingTarget
from tests.fakes.models import FEATURES, build_ir, truth

DEPLOYMENT = "churn-v2"
# Run by the mlserver runtime's interpreter: tritonclient's HTTP client asks the predictor whether it
# is ready, for the model's metadata and for the probabilities of the rows it reads from stdin. JSON
# tensors only: MLServer does not take Triton's binary tensor extension.
TRITON_CLIENT = f"""
import json, sys
import numpy as np
import tritonclient.http as triton

port, rows = sys.argv[1], np.array(json.load(sys.stdin), dtype=np.float64)
client = triton.InferenceServerClient(url=f"127.0.0.1:{{port}}")
features = triton.InferInput("features", list(rows.shape), "FP64")
features.set_data_from_numpy(rows, binary_data=False)
wanted = triton.InferRequestedOutput("probabilities", binary_data=False)
answer = client.infer({V2_MODEL!r}, [features], outputs=[wanted])
# Beyond float32: infinite for the model, refused rather than answered.
bad = triton.InferInput("features", [1, rows.shape[1]], "FP64")
bad.set_data_from_numpy(np.full((1, rows.shape[1]), 1e300), binary_data=False)
try:
    client.infer({V2_MODEL!r}, [bad])
    refused = None
except triton.InferenceServerException as exc:
    refused = [exc.status(), exc.message()]
print(json.dumps({{
    "ready": client.is_server_ready() and client.is_model_ready({V2_MODEL!r}),
    "metadata": client.get_model_metadata({V2_MODEL!r}),
    "probabilities": answer.as_numpy("probabilities").tolist(),
    "classes": answer.get_response()["parameters"]["classes"],
    "refused": refused,
}}))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("irs")
    return {"v1": build_ir(root / "v1", seed=1), "v2": build_ir(root / "v2", seed=2, sloppy=True)}


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> str:
    try:
        runtimes.python("mlserver")
    except runtimes.RuntimeMissingError as exc:
        pytest.skip(f"needs the mlserver runtime: {exc}")
    return str(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def target(home) -> LocalServingTarget:
    return LocalServingTarget(home=home, server="mlserver")


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


def predict(client: httpx.Client, rows: np.ndarray, names: list[str] | None = FEATURES) -> httpx.Response:
    data = {"ndarray": rows.tolist()} if names is None else {"names": names, "ndarray": rows.tolist()}
    return client.post("/api/v1.0/predictions", json={"data": data})


def in_process(model_dir: Path, rows: np.ndarray) -> np.ndarray:
    """The IR's probabilities run here, one row at a time as the predictor serves single rows."""
    infer = ir_predictor(str(model_dir / "model.xml"), np.float64)
    return np.concatenate([infer(rows[i : i + 1].astype(np.float32)) for i in range(len(rows))])


def delta(after: dict, before: dict, name: str, key: str) -> int:
    return after[name][key] - before.get(name, {}).get(key, 0)


def test_the_v2_protocols_own_client_gets_the_probabilities_of_the_ir_run_in_process(deployed, models):
    rows = np.random.default_rng(0).normal(size=(5, len(FEATURES)))
    port = deployed["predictors"]["v1"]["port"]
    done = subprocess.run(
        [runtimes.python("mlserver"), "-c", TRITON_CLIENT, str(port)],
        input=json.dumps(rows.tolist()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["ready"] is True
    assert answer["metadata"]["name"] == V2_MODEL
    assert [i["name"] for i in answer["metadata"]["inputs"]] == FEATURES
    assert answer["classes"] == ["0", "1"]
    batch = ir_predictor(str(models["v1"] / "model.xml"), np.float64)(rows.astype(np.float32))
    np.testing.assert_allclose(answer["probabilities"], batch, rtol=0, atol=1e-6)
    status, message = answer["refused"]
    assert status == "400" and "feature 'f0' of row 0 must be a finite number" in message


def test_seldon_clients_get_the_same_probabilities_through_the_gateway(client, target, models):
    before = target.metrics(DEPLOYMENT)
    rows = np.random.default_rng(1).normal(size=(60, len(FEATURES)))
    expected = {name: in_process(models[name], rows) for name in ("v1", "v2")}
    served = Counter()
    for i, row in enumerate(rows):
        # Named columns go as one V2 tensor per feature, unnamed ones as one [rows, columns] tensor.
        answer = predict(client, row[None, :], FEATURES if i % 2 else None)
        assert answer.status_code == 200, answer.text
        name = answer.headers["X-Airloop-Predictor"]
        served[name] += 1
        assert answer.json()["data"]["names"] == ["0", "1"]
        np.testing.assert_allclose(answer.json()["data"]["ndarray"], expected[name][i : i + 1], atol=1e-6)
    assert set(served) == {"v1", "v2"}
    batch = predict(client, rows[:7]).json()
    assert len(batch["data"]["ndarray"]) == 7
    # Seldon's tensor payload is answered as a tensor.
    tensor = {"shape": [2, len(FEATURES)], "values": rows[:2].ravel().tolist()}
    answer = client.post("/api/v1.0/predictions", json={"data": {"names": FEATURES, "tensor": tensor}})
    assert answer.status_code == 200 and answer.json()["data"]["tensor"]["shape"] == [2, 2]
    after = target.metrics(DEPLOYMENT)
    assert delta(after, before, "v1", "errors") == delta(after, before, "v2", "errors") == 0
    assert sum(delta(after, before, n, "requests") for n in ("v1", "v2")) == 62


def test_client_mistakes_are_4xx_and_never_a_predictors_error(client, target):
    before = target.metrics(DEPLOYMENT)
    wrong_names = predict(client, np.zeros((1, 4)), ["a", "b", "c", "d"])
    assert wrong_names.status_code == 400
    assert "do not match the model's features" in wrong_names.json()["status"]["info"]
    not_finite = client.post(
        "/api/v1.0/predictions", json={"data": {"names": FEATURES, "ndarray": [[1, None, 0, 0]]}}
    )
    assert not_finite.status_code == 400 and "feature 'f1' of row 0" in not_finite.json()["status"]["info"]
    assert predict(client, np.zeros((1, 3)), None).status_code == 400
    after = target.metrics(DEPLOYMENT)
    assert delta(after, before, "v1", "errors") == delta(after, before, "v2", "errors") == 0
    assert predict(client, np.zeros((1, 4))).status_code == 200


def test_feedback_gives_accuracy_per_predictor(client, target):
    before = target.metrics(DEPLOYMENT)
    rows = np.random.default_rng(2).normal(size=(200, 4))
    expected = {"v1": [0, 0], "v2": [0, 0]}  # [feedback, correct]
    for row, label in zip(rows, truth(rows), strict=True):
        answer = predict(client, row[None, :])
        name = answer.headers["X-Airloop-Predictor"]
        expected[name][0] += 1
        expected[name][1] += int(np.argmax(answer.json()["data"]["ndarray"][0]) == label)
        # Seldon's feedback as SeldonClient sends it: the response (its meta.puid) and the truth.
        body = {"response": answer.json(), "truth": {"data": {"ndarray": [[int(label)]]}}, "reward": 1}
        fed = client.post("/api/v1.0/feedback", json=body)
        assert fed.status_code == 200, fed.text
    after = target.metrics(DEPLOYMENT)
    for name, (feedback, correct) in expected.items():
        assert delta(after, before, name, "feedback") == feedback
        assert delta(after, before, name, "feedback_correct") == correct
    assert expected["v1"][1] / expected["v1"][0] > expected["v2"][1] / expected["v2"][0]
    bad = client.post("/api/v1.0/feedback", json={"request_id": "nope", "truth": "abc"})
    assert bad.status_code == 404


def test_request_log_holds_every_request(client):
    rows = np.random.default_rng(3).normal(size=(30, 4))
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
        assert len(record["prediction"][0]) == 2


def test_a_shadow_on_mlserver_is_compared_and_never_answers_a_client(client, target):
    target.set_traffic(DEPLOYMENT, {"v1": 100}, shadow={"v2": 100})
    before = target.metrics(DEPLOYMENT)
    served = Counter(
        predict(client, row[None, :]).headers["X-Airloop-Predictor"]
        for row in np.random.default_rng(5).normal(size=(100, 4))
    )
    assert served == {"v1": 100}
    deadline = time.monotonic() + 20
    while delta(target.metrics(DEPLOYMENT), before, "v2", "pairs") < 100 and time.monotonic() < deadline:
        time.sleep(0.2)
    after = target.metrics(DEPLOYMENT)
    pairs, agreements = delta(after, before, "v2", "pairs"), delta(after, before, "v2", "agreements")
    assert pairs == 100 and 50 < agreements < 100  # v2 ignores a feature v1 uses
    target.set_traffic(DEPLOYMENT, {"v1": 80, "v2": 20})


def test_adaptive_batching_answers_each_client_its_own_rows(home, models):
    target = LocalServingTarget(home=home, server="mlserver", max_batch_size=16, max_batch_time=0.05)
    state = target.deploy(
        "batched", [{"name": "v1", "model_version": "1", "model_dir": str(models["v1"]), "weight": 100}]
    )
    settings_file = Path(home) / "batched" / "mlserver-v1" / V2_MODEL / "model-settings.json"
    written = json.loads(settings_file.read_text())
    assert (written["max_batch_size"], written["max_batch_time"]) == (16, 0.05)
    rows = np.random.default_rng(6).normal(size=(48, len(FEATURES)))
    expected = in_process(models["v1"], rows)
    try:
        with httpx.Client(base_url=state["endpoint"], trust_env=False, timeout=10) as c:

            def ask(i: int) -> list[list[float]]:
                # One and two-row requests side by side: batched together, split back per client.
                chunk = rows[i : i + 1] if i % 3 else rows[i : i + 2]
                answer = predict(c, chunk, FEATURES if i % 2 else None)
                assert answer.status_code == 200, answer.text
                return answer.json()["data"]["ndarray"]

            with ThreadPoolExecutor(16) as pool:
                answers = list(pool.map(ask, range(0, 46)))
        for i, answer in enumerate(answers):
            width = 1 if i % 3 else 2
            np.testing.assert_allclose(answer, expected[i : i + width], atol=1e-6)
    finally:
        target.delete("batched")


def test_an_altered_model_is_refused_naming_the_file(target, deployed, models, tmp_path):
    altered = Path(shutil.copytree(models["v2"], tmp_path / "v3"))
    manifest = json.loads((altered / "manifest.json").read_text())
    manifest["files"]["model.bin"] = "0" * 64
    (altered / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError, match="checksum mismatch for model file 'model.bin'"):
        target.deploy(
            DEPLOYMENT, [{"name": "v3", "model_version": "3", "model_dir": str(altered), "weight": 0}]
        )
    assert set(target.state(DEPLOYMENT)["predictors"]) == {"v1", "v2"}


def test_a_crashed_predictor_is_answered_by_the_champion_and_restarted(target, deployed, client):
    before = target.metrics(DEPLOYMENT)
    os.killpg(target.state(DEPLOYMENT)["predictors"]["v2"]["pid"], 9)
    codes = Counter()
    for _ in range(100):
        answer = predict(client, np.zeros((1, 4)))
        codes[(answer.headers["X-Airloop-Predictor"], answer.status_code)] += 1
    assert codes == {("v1", 200): 100}
    assert 0 < delta(target.metrics(DEPLOYMENT), before, "v2", "errors")
    state = target.deploy(DEPLOYMENT, [])
    assert all(p["healthy"] and p["server"] == "mlserver" for p in state["predictors"].values())


def test_unknown_server_is_refused_before_anything_starts(home, models):
    with pytest.raises(ValueError, match=r"server must be one of \['mlserver', 'seldon'\]"):
        LocalServingTarget(home=home, server="triton").deploy(
            "other", [{"name": "v1", "model_version": "1", "model_dir": str(models["v1"]), "weight": 100}]
        )
    assert not (Path(home) / "other" / "state.json").exists()


def test_a_model_with_an_input_encoding_is_served_raw_rows_over_v2(target, models, tmp_path):
    from airloop.encoding import encode

    encoded = Path(shutil.copytree(models["v1"], tmp_path / "encoded"))
    manifest = json.loads((encoded / "manifest.json").read_text())
    # f0 a category (its vocabulary, a missing one's code, an unseen one's), the others numbers with
    # their training fill: the pre-step a conversion writes for a model of such a table.
    manifest["encoding"] = {
        "inputs": [
            {"column": "f0", "kind": "categorical", "categories": ["a", "b"], "missing": -2, "unknown": -1},
            *({"column": f, "kind": "numeric", "fill": 0.5} for f in FEATURES[1:]),
        ]
    }
    (encoded / "manifest.json").write_text(json.dumps(manifest))
    state = target.deploy(
        "encoded", [{"name": "v1", "model_version": "1", "model_dir": str(encoded), "weight": 100}]
    )
    try:
        rows = [["b", None, 0.25, -1.0], ["z", 1.5, None, 2.0], [None, None, None, None]]
        with httpx.Client(base_url=state["endpoint"], trust_env=False, timeout=10) as gateway:
            answer = gateway.post(
                "/api/v1.0/predictions", json={"data": {"names": FEATURES, "ndarray": rows}}
            )
            assert answer.status_code == 200, answer.text
            expected = in_process(encoded, encode(manifest["encoding"], FEATURES, rows))
            np.testing.assert_allclose(answer.json()["data"]["ndarray"], expected, atol=1e-6)
            refused = gateway.post(
                "/api/v1.0/predictions", json={"data": {"names": FEATURES, "ndarray": [["a", "x", 0, 0]]}}
            )
        assert refused.status_code == 400 and "feature 'f1' must be a number or null" in refused.text
    finally:
        target.delete("encoded")
