"""Traffic rules of the serving targets, and the gateway's mirroring, in-process.

The gateway runs its real ASGI app against model servers stood up here on 127.0.0.1 (aiohttp), so
the mirrored requests really go over HTTP; no model runtime is needed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from airloop.ports import free_port
from airloop.serving.base import check_predictor, merge_traffic
from airloop.serving.gateway import Gateway, parse_routes
from tests.fakes.predictors import Predictor, champion, contrarian

LIVE, SHADOW = {"weight": 100, "shadow": False}, {"weight": 0, "shadow": False}


# -- the rules ------------------------------------------------------------------------------------------


def test_a_shadow_is_not_counted_in_the_live_weights_and_changes_role_by_name():
    current = {"v3": LIVE, "v4": SHADOW}
    mirrored = merge_traffic(current, {"v3": 100}, {"v4": 25})
    assert mirrored == {"v3": {"weight": 100, "shadow": False}, "v4": {"weight": 25, "shadow": True}}
    # Named among the live weights, the shadow becomes live.
    assert merge_traffic(mirrored, {"v3": 90, "v4": 10})["v4"] == {"weight": 10, "shadow": False}
    # Not named: it keeps its role and percentage.
    assert merge_traffic(mirrored, {"v3": 100})["v4"] == {"weight": 25, "shadow": True}


@pytest.mark.parametrize(
    ("weights", "shadow", "problem"),
    [
        ({"v3": 100}, {"v4": 0}, "from 1 to 100 .*remove the shadow"),
        ({"v3": 100}, {"v4": 101}, "from 1 to 100"),
        ({"v3": 90}, {"v4": 10}, r"weights must sum to 100, got 90 .*\(shadow v4 not counted\)"),
        ({"v3": 100, "v4": 0}, {"v4": 5}, "named both live and shadow"),
        ({"v3": 100}, {"v9": 5}, r"unknown predictors \['v9'\]"),
        ({}, {"v3": 50, "v4": 50}, "at most one shadow"),
    ],
)
def test_bad_traffic_is_refused_naming_the_problem(weights, shadow, problem):
    with pytest.raises(ValueError, match=problem):
        merge_traffic({"v3": LIVE, "v4": SHADOW}, weights, shadow)


def test_a_predictor_dict_may_be_a_shadow():
    check_predictor({"name": "v4", "model_version": "4", "model_dir": "/m", "weight": 30, "shadow": True})
    with pytest.raises(ValueError, match="'shadow' of predictor 'v4' must be true or false"):
        check_predictor({"name": "v4", "model_version": "4", "model_dir": "/m", "weight": 3, "shadow": "yes"})
    with pytest.raises(ValueError, match="mirrored percentage of shadow predictor 'v4'"):
        check_predictor({"name": "v4", "model_version": "4", "model_dir": "/m", "weight": 0, "shadow": True})


def test_the_routing_table_never_picks_the_shadow_and_mirrors_its_share():
    table = parse_routes(
        {
            "v3": {"url": "http://127.0.0.1:9001", "model_version": "3", "weight": 100},
            "v4": {"url": "http://127.0.0.1:9002", "model_version": "4", "weight": 30, "shadow": True},
        }
    )
    assert {table.pick().name for _ in range(200)} == {"v3"}
    mirrored = sum(table.mirror() is not None for _ in range(4000))
    # Binomial(4000, 0.3): standard deviation 29, so +-150 is five of them.
    assert abs(mirrored - 1200) <= 150
    assert table.as_dict()["v4"]["shadow"] is True
    with pytest.raises(ValueError, match="at most one shadow"):
        parse_routes(
            {
                "v3": {"url": "http://127.0.0.1:9001", "model_version": "3", "weight": 100},
                "v4": {"url": "http://127.0.0.1:9002", "model_version": "4", "weight": 30, "shadow": True},
                "v5": {"url": "http://127.0.0.1:9003", "model_version": "5", "weight": 30, "shadow": True},
            }
        )


# -- the gateway mirroring over HTTP ----------------------------------------------------------------------


async def _send(client: httpx.AsyncClient, rows: list[list[float]]) -> tuple[Counter, list[float]]:
    codes, latencies = Counter(), []
    for row in rows:
        start = time.perf_counter()
        answer = await client.post("/api/v1.0/predictions", json={"data": {"ndarray": [row]}})
        latencies.append(time.perf_counter() - start)
        codes[(answer.status_code, answer.headers.get("X-Airloop-Predictor"))] += 1
    return codes, latencies


def _rows(n: int) -> list[list[float]]:
    return [[(-1) ** i * 0.5, (-1) ** (i // 2) * 0.5] for i in range(n)]


@pytest.mark.asyncio
async def test_mirrored_requests_are_compared_but_never_slow_or_fail_the_client(tmp_path: Path):
    live = await Predictor(champion).start()
    # A slow shadow that disagrees on half the rows.
    shadow = await Predictor(contrarian, delay_s=0.3).start()
    gateway = Gateway(
        "churn",
        parse_routes(
            {
                "v3": {"url": live.url, "model_version": "3", "weight": 100},
                "v4": {"url": shadow.url, "model_version": "4", "weight": 100, "shadow": True},
            }
        ),
        artefact_root=tmp_path.as_uri(),
        log_batch=1000,
    )
    app = gateway.app()
    try:
        async with (
            gateway.lifespan(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client,
        ):
            codes, latencies = await _send(client, _rows(40))
            assert codes == {(200, "v3"): 40}  # every answer is the live predictor's
            # Answers did not wait for the 0.3 s shadow (generous: a loaded machine jitters).
            assert sorted(latencies)[len(latencies) // 2] < 0.15
            deadline = time.monotonic() + 10
            while gateway.stats()["v4"]["pairs"] < 40 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            stats = gateway.stats()
        # The shadow's requests, latency and answers are its own; the pairs say how often they agree.
        assert stats["v4"]["requests"] == 40 and stats["v4"]["errors"] == 0
        assert (stats["v4"]["pairs"], stats["v4"]["agreements"]) == (40, 20)
        assert stats["v3"]["predicted"] == stats["v4"]["predicted"] == {"0": 20, "1": 20}
        assert stats["v4"]["latency_ms_buckets"]["200"] == 0  # every mirrored call took over 0.3 s
        assert stats["v3"]["pairs"] == 0
        # The pairs are logged (written at shutdown here), one line per mirrored request.
        lines = [
            json.loads(line)
            for f in (tmp_path / "shadow" / "churn").glob("*/*.jsonl")
            for line in f.read_text().splitlines()
        ]
        assert len(lines) == 40
        assert {(r["predictor"], r["shadow"], r["status"], r["shadow_status"]) for r in lines} == {
            ("v3", "v4", 200, 200)
        }
        assert sum(r["agreements"] for r in lines) == 20
        assert all(r["shadow_latency_ms"] >= 300 for r in lines)
        # The request log (the drift monitor's input) holds client requests only.
        requests = [
            line
            for f in (tmp_path / "requests" / "churn").glob("*/*.jsonl")
            for line in f.read_text().splitlines()
        ]
        assert len(requests) == 40
    finally:
        await live.down()
        await shadow.down()


@pytest.mark.asyncio
async def test_a_shadow_that_is_down_costs_the_clients_nothing(tmp_path: Path):
    live = await Predictor(champion).start()
    gateway = Gateway(
        "churn",
        parse_routes(
            {
                "v3": {"url": live.url, "model_version": "3", "weight": 100},
                "v4": {
                    "url": f"http://127.0.0.1:{free_port()}",
                    "model_version": "4",
                    "weight": 50,
                    "shadow": True,
                },
            }
        ),
        artefact_root=tmp_path.as_uri(),
    )
    app = gateway.app()
    try:
        async with (
            gateway.lifespan(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client,
        ):
            codes, _ = await _send(client, _rows(60))
            await asyncio.sleep(0.2)
            stats = gateway.stats()
        assert codes == {(200, "v3"): 60}
        # Refused connections count as the shadow's errors (502), about half of the requests mirrored.
        assert 0 < stats["v4"]["requests"] == stats["v4"]["errors"] < 60
        assert stats["v4"]["pairs"] == 0 and stats["v3"]["errors"] == 0
    finally:
        await live.down()
