"""The gateway in front of V2-protocol predictors (MLServer's), in-process: Seldon-protocol clients are
translated to V2 and back, and every gateway feature (weights, shadow, feedback, request log, metrics)
holds with a V2 predictor beside a Seldon one. The predictors are ``tests.fakes.predictors``; the real
MLServer runs in tests/integration/test_mlserver_serving.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from airloop.serving.gateway import Gateway, parse_routes, seldon_answer, v2_request
from tests.fakes.predictors import Predictor, V2Predictor, champion, contrarian

FEATURES = ["f0", "f1"]


@contextlib.asynccontextmanager
async def running(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    app = gateway.app()
    async with (
        gateway.lifespan(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client,
    ):
        yield client


def v2_route(url: str, weight: int, **extra: object) -> dict[str, object]:
    return {"url": url, "model_version": "4", "weight": weight, "protocol": "v2", **extra}


def test_seldon_rows_become_v2_tensors_and_v2_answers_seldons():
    named = json.loads(v2_request(FEATURES, [[1, 2.5], [3, 4]]))
    assert named == {
        "inputs": [
            {"name": "f0", "shape": [2], "datatype": "FP64", "data": [1, 3]},
            {"name": "f1", "shape": [2], "datatype": "FP64", "data": [2.5, 4]},
        ]
    }
    unnamed = json.loads(v2_request(None, [[1, 2], [3, 4]]))
    assert unnamed["inputs"] == [
        {"name": "features", "shape": [2, 2], "datatype": "FP64", "data": [1, 2, 3, 4]}
    ]
    answer = {
        "outputs": [{"name": "probabilities", "shape": [2, 2], "data": [0.1, 0.9, 0.8, 0.2]}],
        "parameters": {"classes": ["no", "yes"]},
    }
    assert seldon_answer(200, answer) == {
        "data": {"names": ["no", "yes"], "ndarray": [[0.1, 0.9], [0.8, 0.2]]},
        "meta": {},
    }
    assert seldon_answer(400, {"error": "bad input"})["status"] == {
        "code": 400,
        "info": "bad input",
        "status": "FAILURE",
    }
    for garbage in ({"outputs": []}, {"outputs": [{"shape": [2, 2], "data": [1]}]}, [1]):
        with pytest.raises(ValueError, match="not a V2 inference answer"):
            seldon_answer(200, garbage)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"protocol": "grpc"}, "'protocol' of predictor 'v4' must be one of"),
        ({"feature_names": "f0"}, "'feature_names' of predictor 'v4' must be a list of strings"),
        ({"feature_names": []}, "'feature_names' of predictor 'v4' must be a list of strings"),
    ],
)
def test_a_routing_table_with_a_bad_protocol_or_feature_names_is_refused(spec, problem):
    with pytest.raises(ValueError, match=problem):
        parse_routes({"v4": {**v2_route("http://127.0.0.1:9", 100), **spec}})


def test_the_routing_table_keeps_each_predictors_protocol():
    table = {"v4": v2_route("http://127.0.0.1:9", 100, feature_names=FEATURES)}
    assert parse_routes(table).as_dict() == {"v4": {**table["v4"], "shadow": False, "encoded": False}}
    seldon = parse_routes({"v3": {"url": "http://127.0.0.1:9", "model_version": "3", "weight": 100}})
    assert seldon.as_dict()["v3"]["protocol"] == "seldon"


@pytest.mark.asyncio
async def test_a_v2_predictor_beside_a_seldon_one_answers_seldon_clients_with_every_feature(tmp_path: Path):
    seldon = await Predictor(champion).start()
    v2 = await V2Predictor(contrarian, FEATURES).start()
    shadow = await V2Predictor(champion, FEATURES).start()
    table = {
        "v3": {"url": seldon.url, "model_version": "3", "weight": 50},
        "v4": v2_route(v2.url, 50, feature_names=FEATURES),
        "v5": v2_route(shadow.url, 100, shadow=True, feature_names=FEATURES),
    }
    gateway = Gateway("churn", parse_routes(table), artefact_root=tmp_path.as_uri(), log_batch=10_000)
    rows = [[(i % 7) - 3.0, (i % 5) - 2.0] for i in range(100)]
    served: Counter[str] = Counter()
    sent: dict[str, str] = {}
    async with running(gateway) as client:
        for i, row in enumerate(rows):
            # Named and unnamed columns: a V2 predictor gets them named after its model's features.
            data = {"names": FEATURES, "ndarray": [row]} if i % 2 else {"ndarray": [row]}
            answer = await client.post("/api/v1.0/predictions", json={"data": data})
            assert answer.status_code == 200, answer.text
            name = answer.headers["X-Airloop-Predictor"]
            served[name] += 1
            sent[answer.headers["X-Airloop-Request-Id"]] = name
            expected = champion(row) if name == "v3" else contrarian(row)
            assert answer.json()["data"] == {"names": ["0", "1"], "ndarray": [expected]}
            truth = int(expected[1] > expected[0])  # what the answer says: counted correct
            fed = await client.post("/api/v1.0/feedback", json={"response": answer.json(), "truth": truth})
            assert fed.status_code == 200, fed.text  # V2 has no feedback endpoint: not passed on
        tensor = {"names": FEATURES, "tensor": {"shape": [2, 2], "values": [1, 1, -1, -1]}}
        answered = await client.post("/api/v1.0/predictions", json={"data": tensor})
        assert answered.json()["data"]["tensor"]["shape"] == [2, 2]
        for _ in range(100):  # mirrored requests finish after their clients got answers
            if gateway.stats()["v5"]["pairs"] >= 101:
                break
            await asyncio.sleep(0.02)
        stats = gateway.stats()
    for predictor in (seldon, v2, shadow):
        await predictor.down()
    assert served["v3"] > 20 and served["v4"] > 20 and "v5" not in served
    for name in ("v3", "v4"):
        assert stats[name]["feedback"] == stats[name]["feedback_correct"] == served[name]
        assert stats[name]["errors"] == 0
    assert stats["v5"]["pairs"] == 102 and stats["v5"]["requests"] == 101
    every = [t["name"] for body in v2.requests + shadow.requests for t in body["inputs"]]
    assert set(every) == set(FEATURES)  # never one unnamed tensor: batching merges by name
    assert len(seldon.feedback) == served["v3"]
    records = [
        json.loads(line)
        for f in (tmp_path / "requests" / "churn").glob("*/*.jsonl")
        for line in f.read_text().splitlines()
    ]
    assert sent.items() <= {r["request_id"]: r["predictor"] for r in records}.items()
    assert len(records) == 101


@pytest.mark.asyncio
async def test_a_v2_predictors_refusal_is_a_4xx_not_its_error(tmp_path: Path):
    v2 = await V2Predictor(champion, ["a", "b"]).start()
    gateway = Gateway("churn", parse_routes({"v4": v2_route(v2.url, 100)}), artefact_root=tmp_path.as_uri())
    async with running(gateway) as client:
        # Named columns the model does not have: V2's {"error"} comes back as Seldon's failure.
        refused = await client.post(
            "/api/v1.0/predictions", json={"data": {"names": FEATURES, "ndarray": [[1, 2]]}}
        )
        answered = await client.post("/api/v1.0/predictions", json={"data": {"ndarray": [[1, 2]]}})
        stats = gateway.stats()
    await v2.down()
    assert refused.status_code == 400 and "do not match" in refused.json()["status"]["info"]
    assert answered.status_code == 200 and answered.json()["data"]["ndarray"] == [champion([1, 2])]
    assert stats["v4"]["errors"] == 0
