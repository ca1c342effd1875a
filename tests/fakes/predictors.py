"""Model servers that speak Seldon's REST protocol, stood up on 127.0.0.1 with aiohttp, for tests of
the gateway that need no model runtime: each answers predictions with ``answer(row)`` probabilities
and keeps the feedback it is passed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web

from airloop.ports import free_port


class Predictor:
    """``url`` once started; ``feedback``: the bodies passed on to it; ``down()`` stops it answering."""

    def __init__(self, answer: Callable[[list[float]], list[float]], delay_s: float = 0.0) -> None:
        self.answer = answer
        self.delay_s = delay_s
        self.feedback: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> Predictor:
        app = web.Application()
        app.router.add_post("/api/v1.0/predictions", self._predict)
        app.router.add_post("/api/v1.0/feedback", self._feedback)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def down(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _predict(self, request: web.Request) -> web.Response:
        rows = (await request.json())["data"]["ndarray"]
        await asyncio.sleep(self.delay_s)
        return web.json_response(
            {"data": {"names": ["0", "1"], "ndarray": [self.answer(row) for row in rows]}, "meta": {}}
        )

    async def _feedback(self, request: web.Request) -> web.Response:
        self.feedback.append(await request.json())
        return web.json_response({"meta": {}})


def champion(row: list[float]) -> list[float]:
    return [0.2, 0.8] if row[0] > 0 else [0.9, 0.1]


def contrarian(row: list[float]) -> list[float]:
    """Agrees with the champion on rows with a positive second feature only."""
    return champion(row) if row[1] > 0 else champion(row)[::-1]


class V2Predictor(Predictor):
    """A model server speaking the V2 inference protocol, as MLServer serves the IR (``requests``: the
    V2 bodies it was sent). A request holds one ``[rows]`` tensor per feature of ``features`` or one
    ``[rows, columns]`` tensor; anything else is answered 400 with V2's ``{"error": ...}``."""

    def __init__(self, answer: Callable[[list[float]], list[float]], features: list[str]) -> None:
        super().__init__(answer)
        self.features = features
        self.requests: list[dict[str, Any]] = []

    async def start(self) -> V2Predictor:
        from airloop.serving.local import V2_MODEL

        app = web.Application()
        app.router.add_post(f"/v2/models/{V2_MODEL}/infer", self._infer)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def _infer(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        tensors = {t["name"]: t for t in body["inputs"]}
        if set(tensors) == set(self.features):
            rows = [list(r) for r in zip(*(tensors[f]["data"] for f in self.features), strict=True)]
        elif len(tensors) == 1:
            (tensor,) = tensors.values()
            width = tensor["shape"][1]
            rows = [tensor["data"][i : i + width] for i in range(0, len(tensor["data"]), width)]
        else:
            return web.json_response({"error": f"inputs {sorted(tensors)} do not match"}, status=400)
        data = [p for row in rows for p in self.answer(row)]
        output = {"name": "probabilities", "shape": [len(rows), 2], "datatype": "FP64", "data": data}
        return web.json_response(
            {"model_name": "m", "outputs": [output], "parameters": {"classes": ["0", "1"]}}
        )
