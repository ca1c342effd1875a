"""What probing the gateway found, each fixed: its real ASGI app in-process, in front of model servers
on 127.0.0.1 (``tests.fakes.predictors``). A client's mistake is a 4xx that no predictor sees or is
charged with, the admin API needs the token, a challenger's failure is answered by the champion, and
the gateway keeps answering other clients after each."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from airloop.ports import free_port
from airloop.serving.gateway import Gateway, parse_routes
from tests.fakes.predictors import Predictor, champion, contrarian

TOKEN = "s3cret-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
GOOD = {"data": {"names": ["f0", "f1"], "ndarray": [[0.5, -0.5]]}}


def table(url: str) -> dict[str, Any]:
    return {"v3": {"url": url, "model_version": "3", "weight": 100}}


@contextlib.asynccontextmanager
async def running(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    app = gateway.app()
    async with (
        gateway.lifespan(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client,
    ):
        yield client


@pytest_asyncio.fixture
async def live() -> AsyncIterator[Predictor]:
    predictor = await Predictor(champion).start()
    yield predictor
    await predictor.down()


@pytest.fixture
def gateway(live: Predictor, tmp_path: Path) -> Gateway:
    return Gateway("churn", parse_routes(table(live.url)), artefact_root=tmp_path.as_uri(), admin_token=TOKEN)


async def answers_clients(client: httpx.AsyncClient) -> bool:
    return (await client.post("/api/v1.0/predictions", json=GOOD)).status_code == 200


def logged(root: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for f in (root / "requests" / "churn").glob("*/*.jsonl")
        for line in f.read_text().splitlines()
    ]


# -- the admin API -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_admin_api_needs_the_token_and_checks_predictor_urls(gateway, live):
    stub = {"v3": {"url": f"http://127.0.0.1:{free_port()}", "model_version": "9", "weight": 100}}
    async with running(gateway) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            assert (await client.put("/admin/predictors", json=stub, headers=headers)).status_code == 401
            assert (await client.get("/admin/state", headers=headers)).status_code == 401
            assert (await client.get("/admin/stats", headers=headers)).status_code == 401
        for url in (
            "file:///etc/passwd",
            "http://10.0.0.7:9000",
            "http://127.0.0.1",
            "http://u:p@127.0.0.1:1/",
        ):
            refused = await client.put(
                "/admin/predictors", json={"v3": {**stub["v3"], "url": url}}, headers=ADMIN
            )
            assert refused.status_code == 400 and "must be http(s)://HOST:PORT" in refused.text, url
        state = (await client.get("/admin/state", headers=ADMIN)).json()
        assert state["predictors"]["v3"]["url"] == live.url  # the table was never swapped
        assert await answers_clients(client)
    # Without a token the admin API answers nobody.
    closed = Gateway("churn", gateway.table, artefact_root=gateway.log._dir, admin_token=None)
    async with running(closed) as client:
        assert (await client.get("/admin/state", headers={"Authorization": "Bearer "})).status_code == 401


# -- bad feature values and bodies -------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ('{"data": {"names": ["f0", "f1"], "ndarray": [[0.5, NaN]]}}', "feature 'f1' of row 0"),
        ('{"data": {"names": ["f0", "f1"], "ndarray": [[Infinity, 1]]}}', "feature 'f0' of row 0"),
        ('{"data": {"names": ["f0", "f1"], "ndarray": [[1, 2], [1e400, 1]]}}', "feature 'f0' of row 1"),
        ('{"data": {"names": ["f0", "f1"], "ndarray": [[1, null]]}}', "feature 'f1' of row 0 .* got null"),
        ('{"data": {"ndarray": [[1, "2"]]}}', "feature 1 of row 0"),
        ('{"data": {"ndarray": [[1, true]]}}', "feature 1 of row 0"),
        ('{"data": {"ndarray": [[1, [2]]]}}', "feature 1 of row 0"),
        ('{"data": {"ndarray": [[1, 2], [3]]}}', "row 1 differs"),
        ('{"data": {"ndarray": []}}', "non-empty list of lists"),
        ('{"data": {"names": ["f0"], "ndarray": [[1, 2]]}}', "names must be 2 strings"),
        ('{"data": {"tensor": {"shape": [1, 3], "values": [1, 2]}}}', "rows x columns values"),
        ('{"jsonData": [{"f0": 1}, {"f1": 2}]}', "same keys"),
        ('{"data": {"x": 1}}', "expected"),
        ("[1, 2]", "expected"),
        ("{not json", "not JSON"),
        ("[" * 100_000 + "]" * 100_000, "RecursionError"),
    ],
)
async def test_bad_requests_are_4xx_naming_the_problem_and_never_reach_or_count_against_a_predictor(
    gateway, tmp_path, body, problem
):
    async with running(gateway) as client:
        answer = await client.post("/api/v1.0/predictions", content=body)
        assert answer.status_code == 400, answer.text
        assert answer.json()["status"]["status"] == "FAILURE"
        assert re.search(problem, answer.json()["status"]["info"]), answer.json()
        assert await answers_clients(client)
        stats = gateway.stats()
    assert stats["v3"]["requests"] == 1 and stats["v3"]["errors"] == 0  # only the good request
    # The request log, the drift monitor's input, never holds them.
    assert [r["features"] for r in logged(tmp_path)] == [[[0.5, -0.5]]]


@pytest.mark.asyncio
async def test_a_body_over_the_limit_is_413_before_it_is_read(live, tmp_path):
    gateway = Gateway(
        "churn", parse_routes(table(live.url)), artefact_root=tmp_path.as_uri(), max_body_bytes=1000
    )
    app = gateway.app()
    sent: list[dict[str, Any]] = []

    async def never(*_: Any) -> dict[str, Any]:
        raise AssertionError("the gateway read a body it had to refuse")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/v1.0/predictions",
        "headers": [(b"content-length", str(100 << 20).encode())],
    }
    await app(scope, never, send)
    assert sent[0]["status"] == 413 and b"limited to 1000 bytes" in sent[1]["body"]

    async with running(gateway) as client:
        # Without a length (chunked), reading stops at the limit.
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(100):
                yield b" " * 100

        assert (await client.post("/api/v1.0/predictions", content=chunks())).status_code == 413
        assert (await client.post("/api/v1.0/feedback", content=b" " * 2000)).status_code == 413
        assert await answers_clients(client)
        assert gateway.stats()["v3"]["errors"] == 0


# -- Seldon's payloads -----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_tensor_and_json_data_requests_are_answered_as_asked(gateway):
    async with running(gateway) as client:
        tensor = await client.post(
            "/api/v1.0/predictions",
            json={"data": {"names": ["f0", "f1"], "tensor": {"shape": [2, 2], "values": [1, 0, -1, 0]}}},
        )
        assert tensor.status_code == 200, tensor.text
        assert tensor.json()["data"] == {
            "names": ["0", "1"],
            "tensor": {"shape": [2, 2], "values": [0.2, 0.8, 0.9, 0.1]},
        }
        meta = tensor.json()["meta"]
        assert meta["puid"] == tensor.headers["X-Airloop-Request-Id"] and meta["tags"]["predictor"] == "v3"
        records = await client.post("/api/v1.0/predictions", json={"jsonData": [{"f0": -1, "f1": 0}]})
        assert records.json()["data"]["ndarray"] == [[0.9, 0.1]]


# -- feedback --------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_feedback_is_validated_against_the_models_classes(gateway, live):
    async with running(gateway) as client:
        answer = (await client.post("/api/v1.0/predictions", json=GOOD)).json()
        puid = answer["meta"]["puid"]
        for body, problem in [
            ({"request_id": [puid], "truth": 1}, "needs the prediction's id"),
            ({"request_id": {"a": puid}, "truth": 1}, "needs the prediction's id"),
            ({"truth": 1}, "needs the prediction's id"),
            ({"request_id": puid, "truth": "abc"}, r"not one of the model's classes \['0', '1'\]"),
            ({"request_id": puid, "truth": 2}, "not one of the model's classes"),
            ({"request_id": puid, "truth": {"x": 1}}, "truth: expected"),
            ({"request_id": puid, "truth": [{"x": 1}]}, "must be one of the model's classes"),
            ({"request_id": puid, "truth": None}, "needs a truth, a reward or both"),
            ({"request_id": puid, "truth": [1, 0]}, "2 truth labels for 1 predicted rows"),
            ({"request_id": puid, "reward": "high"}, "reward must be a finite number"),
        ]:
            refused = await client.post("/api/v1.0/feedback", json=body)
            assert refused.status_code == 400, (body, refused.text)
            assert re.search(problem, refused.json()["status"]["info"]), (body, refused.text)
        assert gateway.stats()["v3"]["feedback"] == 0 and live.feedback == []
        # The response's meta.puid correlates it (Seldon's way), truth "1" and 1.0 name class "1".
        fed = await client.post(
            "/api/v1.0/feedback",
            json={
                "response": answer,
                "truth": {"data": {"tensor": {"shape": [1, 1], "values": [1.0]}}},
                "reward": 1,
            },
        )
        assert fed.status_code == 200, fed.text
        assert fed.json()["jsonData"] == {"feedback": 1, "correct": 1, "reward": 1}
        # One feedback per prediction: a second is refused as a duplicate, not counted again.
        again = await client.post("/api/v1.0/feedback", json={"response": answer, "truth": 1})
        assert again.status_code == 409 and "already has its feedback" in again.json()["status"]["info"]
        assert await answers_clients(client)
        stats = gateway.stats()
    assert (stats["v3"]["feedback"], stats["v3"]["feedback_correct"]) == (1, 1)
    (passed,) = live.feedback
    assert passed["truth"] == {"data": {"ndarray": [["1"]]}} and passed["reward"] == 1


@pytest.mark.asyncio
async def test_feedback_with_a_reward_only_is_passed_on_and_counts_no_accuracy(gateway, live):
    async with running(gateway) as client:
        answer = (await client.post("/api/v1.0/predictions", json=GOOD)).json()
        fed = await client.post("/api/v1.0/feedback", json={"response": answer, "reward": 0.25})
        assert fed.status_code == 200, fed.text
        metrics = (await client.get("/metrics")).text
    assert gateway.stats()["v3"]["feedback"] == 0
    labels = 'deployment_name="churn",predictor_name="v3",predictor_version="3"'
    assert f"airloop_gateway_feedback_reward_sum{{{labels}}} 0.25" in metrics
    assert live.feedback[0]["reward"] == 0.25 and "truth" not in live.feedback[0]


def labels_logged(root: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for f in sorted((root / "labels" / "churn").glob("*/*.jsonl"))
        for line in f.read_text().splitlines()
    ]


@pytest.mark.asyncio
async def test_every_prediction_is_logged_with_its_id_arm_version_time_and_classes(gateway, tmp_path):
    async with running(gateway) as client:
        answer = await client.post("/api/v1.0/predictions", json=GOOD)
    request_id = answer.headers["X-Airloop-Request-Id"]
    assert answer.json()["meta"]["puid"] == request_id
    (record,) = logged(tmp_path)
    assert {k: record[k] for k in ("request_id", "predictor", "model_version", "classes", "prediction")} == {
        "request_id": request_id,
        "predictor": "v3",
        "model_version": "3",
        "classes": ["0", "1"],
        "prediction": [[0.2, 0.8]],
    }
    assert record["ts"].endswith("+00:00")


@pytest.mark.asyncio
async def test_a_label_for_a_forgotten_prediction_is_kept_in_the_labels_log_not_counted_now(live, tmp_path):
    gateway = Gateway(
        "churn", parse_routes(table(live.url)), artefact_root=tmp_path.as_uri(), feedback_window=1
    )
    async with running(gateway) as client:
        first = (await client.post("/api/v1.0/predictions", json=GOOD)).json()
        second = (await client.post("/api/v1.0/predictions", json=GOOD)).json()  # the first is forgotten
        late = await client.post("/api/v1.0/feedback", json={"response": first, "truth": 1})
        assert late.status_code == 202, late.text
        assert "kept in the labels log" in late.json()["status"]["info"]
        fed = await client.post("/api/v1.0/feedback", json={"response": second, "truth": 0})
        assert fed.status_code == 200 and fed.json()["jsonData"]["correct"] == 0
        unknown = await client.post("/api/v1.0/feedback", json={"request_id": "nope", "truth": 1})
        assert unknown.status_code == 404 and "32 hexadecimal" in unknown.json()["status"]["info"]
        refused = await client.post("/api/v1.0/feedback", json={"request_id": "0" * 32, "truth": {"a": 1}})
        assert refused.status_code == 400  # a late label is still checked as far as it can be
        metrics = (await client.get("/metrics")).text
        stats = gateway.stats()
    # Only the remembered one is in the canary's counts, with its lag.
    assert (stats["v3"]["feedback"], stats["v3"]["labelled"]) == (1, 1)
    assert stats["v3"]["label_lag_s_buckets"]["+Inf"] == 1
    assert 'airloop_gateway_labels_total{deployment_name="churn",outcome="late"} 1.0' in metrics
    late_record, counted = labels_logged(tmp_path)
    assert late_record["request_id"] == first["meta"]["puid"] and late_record["truth"] == [1.0]
    assert "predictor" not in late_record  # the gateway no longer knew it: the join finds it
    assert counted["request_id"] == second["meta"]["puid"]
    assert (counted["predictor"], counted["model_version"], counted["correct"]) == ("v3", "3", 0)
    assert counted["lag_s"] >= 0


# -- a challenger that fails -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_request_failing_on_the_challenger_is_answered_by_the_champion_and_counted(live, tmp_path):
    challenger = await Predictor(contrarian).start()
    gateway = Gateway(
        "churn",
        parse_routes(
            {
                "v3": {"url": live.url, "model_version": "3", "weight": 90},
                "v4": {"url": challenger.url, "model_version": "4", "weight": 10},
            }
        ),
        artefact_root=tmp_path.as_uri(),
    )
    async with running(gateway) as client:
        await challenger.down()  # dies mid-canary
        codes = [(await client.post("/api/v1.0/predictions", json=GOOD)) for _ in range(200)]
        stats = gateway.stats()
    assert {(a.status_code, a.headers["X-Airloop-Predictor"]) for a in codes} == {(200, "v3")}
    # Every request that went to the challenger is its error, and was answered by the champion.
    failed = stats["v4"]["errors"]
    assert 0 < failed == stats["v4"]["requests"] and stats["v3"]["errors"] == 0
    assert stats["v3"]["requests"] == 200
    records = logged(tmp_path)
    assert sum(r["failed_on"] == "v4" for r in records) == failed
    assert {r["predictor"] for r in records} == {"v3"}
