"""Labels that come late, end to end on localhost: the real gateway (uvicorn, its own port) in front of
two model servers (``tests.fakes.predictors``), clients that send their labels after the gateway has
forgotten most predictions, the canary's analysis of its metrics (waiting) and of its labels log
(judging), and the labels ingest joining the ground truth to the logs the gateway wrote."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import uvicorn

from airloop.labels import window_quality
from airloop.ports import free_port
from airloop.serving.gateway import Gateway, parse_routes
from airloop.steps.rollout.canary import analyse
from airloop.steps.rollout.labels import ingest
from tests.fakes.predictors import Predictor, champion, contrarian

CRITERIA = {"min_requests": 20, "min_feedback": 20}
REQUESTS, REMEMBERED, LATE = 80, 10, 70


@contextlib.asynccontextmanager
async def serving(gateway: Gateway) -> AsyncIterator[str]:
    """The gateway's app under uvicorn on 127.0.0.1; its logs are written when it stops."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(gateway.app(), host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the gateway did not start"
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.mark.asyncio
async def test_late_labels_keep_the_canary_waiting_and_the_ingest_joins_them_all(tmp_path: Path):
    v1, v2 = await Predictor(champion).start(), await Predictor(contrarian).start()
    routes = {
        "v1": {"url": v1.url, "model_version": "1", "weight": 50},
        "v2": {"url": v2.url, "model_version": "2", "weight": 50},
    }
    root = (tmp_path / "artefacts").as_uri()
    gateway = Gateway(
        "churn", parse_routes(routes), artefact_root=root, feedback_window=REMEMBERED, log_interval_s=0.1
    )
    rows = np.random.default_rng(7).normal(size=(REQUESTS, 2)).round(3)
    served: list[tuple[str, str, int]] = []  # request id, predictor, true class
    try:
        async with serving(gateway) as url, httpx.AsyncClient(base_url=url) as client:
            before, since = gateway.stats(), time.time()
            for row in rows:
                answer = await client.post(
                    "/api/v1.0/predictions", json={"data": {"ndarray": [row.tolist()]}}
                )
                assert answer.status_code == 200, answer.text
                served.append(
                    (answer.json()["meta"]["puid"], answer.headers["X-Airloop-Predictor"], int(row[0] > 0))
                )
            arms = {name for _, name, _ in served}
            assert arms == {"v1", "v2"}
            waiting = analyse(
                {
                    "before": before,
                    "after": gateway.stats(),
                    "champion": "v1",
                    "challenger": "v2",
                    "criteria": CRITERIA,
                }
            )
            assert waiting["verdict"] == "wait" and waiting["tests"]["accuracy"]["status"] == "wait"
            assert waiting["tests"]["errors"]["status"] == "pass"  # traffic enough: only labels are missing
            # The clients label the first LATE: long forgotten by the gateway, so kept for the join.
            for request_id, _, truth in served[:LATE]:
                late = await client.post(
                    "/api/v1.0/feedback", json={"request_id": request_id, "truth": truth}
                )
                assert late.status_code == 202, late.text
            still = analyse(
                {
                    "before": before,
                    "after": gateway.stats(),
                    "champion": "v1",
                    "challenger": "v2",
                    "criteria": CRITERIA,
                }
            )
            assert still["verdict"] == "wait" and still["challenger"]["labelled"] == 0
            # The canary reading the labels log sees them all, once the gateway has written them.
            labels, deadline = window_quality(root, "churn", since), time.monotonic() + 30
            while sum(arm["labelled"] for arm in labels.values()) < LATE:
                assert time.monotonic() < deadline, f"the labels log holds {labels}"
                await asyncio.sleep(0.1)
                labels = window_quality(root, "churn", since)
            judged = analyse(
                {
                    "before": before,
                    "after": gateway.stats(),
                    "champion": "v1",
                    "challenger": "v2",
                    "criteria": CRITERIA,
                    "labels": labels,
                }
            )
            assert judged["verdict"] == "fail" and judged["tests"]["accuracy"]["status"] == "fail", judged
            assert judged["champion"]["accuracy"] == 1.0
    finally:
        await v1.down()
        await v2.down()
    # The ground truth of every request lands later as a file: the first LATE are already labelled.
    truth = tmp_path / "outcomes.csv"
    pd.DataFrame({"request_id": [i for i, _, _ in served], "label": [t for _, _, t in served]}).to_csv(
        truth, index=False
    )
    result = ingest({"labels_path": str(truth), "deployment": "churn", "artefact_root": root})
    assert (result["matched"], result["duplicates"], result["unknown"], result["invalid"]) == (
        REQUESTS - LATE,
        LATE,
        0,
        0,
    )
    assert result["unresolved"] == 0
    quality = result["quality"]
    expected = {name: sum(1 for _, arm, _ in served if arm == name) for name in ("v1", "v2")}
    assert {name: arm["labelled"] for name, arm in quality.items()} == expected
    # The champion's rule is the truth; the contrarian is wrong wherever the second feature is negative.
    assert quality["v1"]["accuracy"] == 1.0
    wrong = sum(1 for (_, arm, _), row in zip(served, rows, strict=True) if arm == "v2" and row[1] <= 0)
    assert quality["v2"]["correct"] == expected["v2"] - wrong and wrong > 0
