"""The local gateway: one HTTP endpoint per deployment that splits traffic between predictors.

It plays the part of Seldon's service orchestrator for the local serving target: a weighted random
choice of predictor per request, Prometheus metrics named like the executor's, quality accounting
from feedback, and a request log (JSON lines, in batches) that the drift monitor reads.

    python -m airloop.serving.gateway --state-dir DIR --port N

Endpoints: ``POST /api/v1.0/predictions`` and ``/api/v1.0/feedback`` (Seldon's protocol),
``GET /metrics`` (Prometheus), ``GET /health/ping``, ``GET /admin/state``, ``GET /admin/stats``,
``PUT /admin/weights`` (``{name: weight}``) and ``PUT /admin/predictors`` (``{name: {"url",
"model_version", "weight"}}``, the whole routing table).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pyarrow import fs as pafs
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route as HttpRoute

from airloop import settings
from airloop.serving.base import check_weight, merge_weights
from airloop.serving.local import SERVER_KEEPALIVE_S, STATE_FILE, routes_from_state

PREDICTOR_HEADER = "X-Airloop-Predictor"
REQUEST_ID_HEADER = "X-Airloop-Request-Id"
# Drop idle connections before the model servers do, so that no request goes out on a connection
# the server is closing.
CLIENT_KEEPALIVE_S = SERVER_KEEPALIVE_S / 2
# Seconds. Finer than Prometheus' defaults at the low end: a canary compares p99s of a few ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
CLIENT_METRIC = "seldon_api_executor_client_requests_seconds"
SERVER_METRIC = "seldon_api_executor_server_requests_seconds"
FEEDBACK_METRIC = "airloop_gateway_feedback"


@dataclass(frozen=True)
class Route:
    name: str
    url: str
    model_version: str
    weight: int


class RoutingTable:
    """An immutable set of routes; the gateway swaps the whole table, so a change is atomic."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self._live = [r for r in routes.values() if r.weight > 0]
        self._cumulative = list(itertools.accumulate(r.weight for r in self._live))

    def pick(self) -> Route | None:
        if not self._live:
            return None
        return random.choices(self._live, cum_weights=self._cumulative)[0]

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {r.name: {"url": r.url, "model_version": r.model_version, "weight": r.weight}
                for r in self.routes.values()}


def parse_routes(table: dict[str, Any]) -> RoutingTable:
    """``{name: {"url", "model_version", "weight"}}`` -> RoutingTable; ValueError names the problem."""
    if not isinstance(table, dict):
        raise ValueError(f"predictors must be an object {{name: {{url, model_version, weight}}}}, "
                         f"got {table!r}")
    routes = {}
    for name, spec in table.items():
        if not isinstance(spec, dict) or not {"url", "model_version", "weight"} <= spec.keys():
            raise ValueError(f"predictor {name!r} needs url, model_version and weight, got {spec!r}")
        check_weight(name, spec["weight"])
        routes[name] = Route(name, str(spec["url"]).rstrip("/"), str(spec["model_version"]), spec["weight"])
    total = sum(r.weight for r in routes.values())
    if routes and total != 100:
        raise ValueError(f"weights must sum to 100, got {total}")
    return RoutingTable(routes)


class RequestLog:
    """Buffers one JSON line per request and writes complete files of them to the artefact store.

    Files go to ``<root>/requests/<deployment>/<YYYYMMDD>/<HHMMSS>-<uuid>.jsonl``; on a local disk
    they are written under a temporary name and renamed, so a reader never sees half a file.
    """

    def __init__(self, root_uri: str, deployment: str, batch_size: int) -> None:
        self._fs, base = pafs.FileSystem.from_uri(root_uri)
        self._dir = f"{base.rstrip('/')}/requests/{deployment}"
        self._batch_size = batch_size
        self._lines: list[str] = []

    def add(self, record: dict[str, Any]) -> bool:
        """Buffer a record; True when the batch is full and should be flushed."""
        self._lines.append(json.dumps(record, separators=(",", ":")))
        return len(self._lines) >= self._batch_size

    def take(self) -> list[str]:
        lines, self._lines = self._lines, []
        return lines

    def write(self, lines: list[str]) -> str | None:
        if not lines:
            return None
        now = datetime.now(timezone.utc)
        folder = f"{self._dir}/{now:%Y%m%d}"
        path = f"{folder}/{now:%H%M%S}-{uuid.uuid4().hex}.jsonl"
        self._fs.create_dir(folder, recursive=True)
        local = isinstance(self._fs, pafs.LocalFileSystem)
        # Object stores publish whole objects anyway; a local file is renamed once complete.
        staging = f"{folder}/.{uuid.uuid4().hex}.tmp" if local else path
        with self._fs.open_output_stream(staging) as out:
            out.write(("\n".join(lines) + "\n").encode())
        if local:
            self._fs.move(staging, path)
        return path


def _label(value: Any) -> Any:
    """Compare labels by value: the truth may come as 1, 1.0 or "1" for class "1"."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _predicted(probabilities: list[float], classes: list[str]) -> Any:
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return _label(classes[best] if classes else best)


def _rows(value: Any) -> list[Any]:
    """Truth labels as a flat list: ``{"data": {"ndarray": [[1], [0]]}}``, ``[1, 0]`` or ``1``."""
    if isinstance(value, dict):
        value = (value.get("data") or {}).get("ndarray")
        if value is None:
            raise ValueError("truth must be {'data': {'ndarray': [[label], ...]}} or a list of labels")
    if not isinstance(value, list):
        return [value]
    return [v[0] if isinstance(v, list) and len(v) == 1 else v for v in value]


def _failure(code: int, info: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # The shape of Seldon's error responses.
    return JSONResponse({"status": {"code": code, "info": info, "status": "FAILURE"}}, status_code=code,
                        headers=headers)


@dataclass
class _Recent:
    route: Route
    names: list[str] | None
    features: list[Any]
    classes: list[str]
    probabilities: list[list[float]]


class Gateway:
    def __init__(self, deployment: str, table: RoutingTable, *, artefact_root: str, log_batch: int = 500,
                 log_interval_s: float = 5.0, timeout_s: float = 10.0, feedback_window: int = 20_000) -> None:
        self.deployment = deployment
        self.table = table
        self.log = RequestLog(artefact_root, deployment, log_batch)
        self.log_interval_s = log_interval_s
        self.timeout_s = timeout_s
        self.feedback_window = feedback_window
        self.recent: OrderedDict[str, _Recent] = OrderedDict()
        self.session: aiohttp.ClientSession  # opened by lifespan(), inside the server's event loop
        self.registry = CollectorRegistry()
        labels = ["deployment_name", "predictor_name", "predictor_version", "method", "code"]
        self.client_seconds = Histogram(CLIENT_METRIC, "Requests from the gateway to a predictor",
                                        labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.server_seconds = Histogram(SERVER_METRIC, "Requests to the gateway", labels,
                                        buckets=LATENCY_BUCKETS, registry=self.registry)
        self.feedback = Counter(FEEDBACK_METRIC, "Feedback received per predictor",
                                ["deployment_name", "predictor_name", "predictor_version", "outcome"],
                                registry=self.registry)
        self._flushes: set[asyncio.Task] = set()

    # -- lifecycle ---------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # aiohttp rather than httpx on this path: about 1 ms less per request here (docs/serving.md).
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=CLIENT_KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
        )
        ticker = asyncio.create_task(self._flush_every_interval())
        try:
            yield
        finally:
            ticker.cancel()
            await asyncio.gather(*self._flushes, return_exceptions=True)
            self.log.write(self.log.take())
            await self.session.close()

    async def _flush_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.log_interval_s)
            self._flush()

    def _flush(self) -> None:
        lines = self.log.take()
        if lines:
            task = asyncio.create_task(asyncio.to_thread(self.log.write, lines))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    def app(self) -> Starlette:
        return Starlette(lifespan=self.lifespan, routes=[
            HttpRoute("/api/v1.0/predictions", self.predict, methods=["POST"]),
            HttpRoute("/api/v1.0/feedback", self.send_feedback, methods=["POST"]),
            HttpRoute("/health/ping", lambda _: PlainTextResponse("pong")),
            HttpRoute("/metrics", self.prometheus),
            HttpRoute("/admin/state", self.get_state),
            HttpRoute("/admin/stats", lambda _: JSONResponse(self.stats())),
            HttpRoute("/admin/weights", self.put_weights, methods=["PUT"]),
            HttpRoute("/admin/predictors", self.put_predictors, methods=["PUT"]),
        ])

    # -- traffic -----------------------------------------------------------------------------------
    async def predict(self, request: Request) -> Response:
        start = time.perf_counter()
        body = await request.body()
        try:
            payload = json.loads(body)
            names, rows = payload["data"].get("names"), payload["data"]["ndarray"]
        except (ValueError, KeyError, TypeError, AttributeError):
            return _failure(400, "expected a JSON body {'data': {'names': [...], 'ndarray': [[...], ...]}}")
        route = self.table.pick()
        if route is None:
            return _failure(503, f"deployment {self.deployment!r} has no predictor with traffic")
        request_id = uuid.uuid4().hex
        headers = {PREDICTOR_HEADER: route.name, REQUEST_ID_HEADER: request_id}
        sent = time.perf_counter()
        try:
            async with self.session.post(f"{route.url}/api/v1.0/predictions", data=body,
                                         headers={"content-type": "application/json"}) as answer:
                code, result = answer.status, json.loads(await answer.read())
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            code = 504 if isinstance(exc, TimeoutError) else 502
            result = {"status": {"code": code, "info": f"predictor {route.name}: {exc!r}",
                                 "status": "FAILURE"}}
        latency = time.perf_counter() - sent
        labels = (self.deployment, route.name, route.model_version, "predictions", str(code))
        self.client_seconds.labels(*labels).observe(latency)
        probabilities = None
        if code == 200:
            result.setdefault("meta", {}).update({"requestId": request_id, "predictor": route.name})
            probabilities = result["data"]["ndarray"]
            self._remember(request_id, _Recent(route, names, rows, result["data"].get("names") or [],
                                               probabilities))
        if self.log.add({
            "request_id": request_id, "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "deployment": self.deployment, "predictor": route.name, "model_version": route.model_version,
            "names": names, "features": rows, "prediction": probabilities,
            "latency_ms": round(latency * 1e3, 3), "status": code,
        }):
            self._flush()
        self.server_seconds.labels(*labels).observe(time.perf_counter() - start)
        return Response(json.dumps(result, separators=(",", ":")), status_code=code, headers=headers,
                        media_type="application/json")

    def _remember(self, request_id: str, recent: _Recent) -> None:
        self.recent[request_id] = recent
        if len(self.recent) > self.feedback_window:
            self.recent.popitem(last=False)

    async def send_feedback(self, request: Request) -> Response:
        try:
            payload = await request.json()
            request_id = (request.headers.get(REQUEST_ID_HEADER) or payload.get("request_id")
                          or payload.get("response", {}).get("meta", {}).get("requestId"))
            truth = _rows(payload["truth"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return _failure(400, f"expected Seldon feedback with 'truth' and a request id: {exc}")
        recent = self.recent.get(request_id) if request_id else None
        if recent is None:
            return _failure(404, f"unknown or expired request id {request_id!r} "
                                 f"(the gateway remembers the last {self.feedback_window} predictions)")
        if len(truth) != len(recent.probabilities):
            return _failure(400, f"{len(truth)} truth labels for {len(recent.probabilities)} predicted rows")
        del self.recent[request_id]  # one feedback per prediction
        correct = sum(_predicted(p, recent.classes) == _label(t) for p, t in zip(recent.probabilities, truth))
        route = recent.route
        labels = (self.deployment, route.name, route.model_version)
        self.feedback.labels(*labels, "correct").inc(correct)
        self.feedback.labels(*labels, "incorrect").inc(len(truth) - correct)
        # Seldon's model servers take feedback too (e.g. for online learning): pass it on.
        forward = {"request": {"data": {"names": recent.names, "ndarray": recent.features}},
                   "response": {"data": {"names": recent.classes, "ndarray": recent.probabilities}},
                   "truth": {"data": {"ndarray": [[t] for t in truth]}},
                   "reward": payload.get("reward", correct / len(truth))}
        if recent.names is None:
            del forward["request"]["data"]["names"]
        headers = {PREDICTOR_HEADER: route.name, REQUEST_ID_HEADER: request_id}
        try:
            async with self.session.post(f"{route.url}/api/v1.0/feedback", json=forward) as answer:
                accepted = answer.ok
        except (aiohttp.ClientError, TimeoutError):
            accepted = False
        if not accepted:
            return _failure(502, f"feedback counted, but predictor {route.name} did not take it", headers)
        return JSONResponse({"meta": {"requestId": request_id, "predictor": route.name},
                             "jsonData": {"feedback": len(truth), "correct": correct}}, headers=headers)

    # -- admin -------------------------------------------------------------------------------------
    async def get_state(self, request: Request) -> JSONResponse:
        return JSONResponse({"deployment": self.deployment, "predictors": self.table.as_dict()})

    async def put_weights(self, request: Request) -> JSONResponse:
        try:
            weights = merge_weights({n: r.weight for n, r in self.table.routes.items()}, await request.json())
        except (ValueError, AttributeError, TypeError) as exc:
            return _failure(400, str(exc))
        self.table = RoutingTable({n: Route(r.name, r.url, r.model_version, weights[n])
                                   for n, r in self.table.routes.items()})
        return await self.get_state(request)

    async def put_predictors(self, request: Request) -> JSONResponse:
        try:
            self.table = parse_routes(await request.json())
        except ValueError as exc:
            return _failure(400, str(exc))
        return await self.get_state(request)

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Cumulative per-predictor counts in the shape of ``ServingTarget.metrics()``."""
        stats = {name: _empty_stats() for name in self.table.routes}
        for family in self.registry.collect():
            for sample in family.samples:
                name = sample.labels.get("predictor_name")
                if name is None:
                    continue
                entry = stats.setdefault(name, _empty_stats())
                if family.name == CLIENT_METRIC:
                    if sample.name.endswith("_count"):
                        entry["requests"] += int(sample.value)
                        if int(sample.labels["code"]) >= 500:
                            entry["errors"] += int(sample.value)
                    elif sample.name.endswith("_sum"):
                        entry["latency_ms_sum"] += sample.value * 1e3
                    elif sample.name.endswith("_bucket"):
                        entry["latency_ms_buckets"][_bound_ms(sample.labels["le"])] += int(sample.value)
                elif family.name == FEEDBACK_METRIC and sample.name.endswith("_total"):
                    entry["feedback"] += int(sample.value)
                    if sample.labels["outcome"] == "correct":
                        entry["feedback_correct"] += int(sample.value)
        return stats


def _bound_ms(le: str) -> str:
    return le if le == "+Inf" else format(float(le) * 1e3, "g")


def _empty_stats() -> dict[str, Any]:
    return {"requests": 0, "errors": 0, "latency_ms_sum": 0.0, "feedback": 0, "feedback_correct": 0,
            "latency_ms_buckets": {_bound_ms(str(b)): 0 for b in (*LATENCY_BUCKETS, "+Inf")}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", required=True, type=Path,
                        help=f"folder holding the deployment's {STATE_FILE}")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--log-batch", type=int, default=500, help="write the request log every N requests")
    parser.add_argument("--log-interval", type=float, default=5.0, help="... or every T seconds")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a predictor")
    args = parser.parse_args(argv)
    state = json.loads((args.state_dir / STATE_FILE).read_text())
    gateway = Gateway(state["deployment"], parse_routes(routes_from_state(state)),
                      artefact_root=settings.artefact_root(), log_batch=args.log_batch,
                      log_interval_s=args.log_interval, timeout_s=args.timeout)
    uvicorn.run(gateway.app(), host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
