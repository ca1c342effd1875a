"""The local gateway: one HTTP endpoint per deployment that splits traffic between predictors.

It plays the part of Seldon's service orchestrator for the local serving target: a weighted random
choice of predictor per request, a shadow predictor that gets a mirrored share of the requests
(its answers are compared with the live ones, never returned), Prometheus metrics named like the
executor's, quality accounting from feedback, and request logs (JSON lines, in batches) that the
drift monitor reads.

Every answered prediction carries its request id (``meta.puid`` and the ``X-Airloop-Request-Id``
header); the request log records it with the predictor (the arm), its model version and the time.
Labels may come at any later time: feedback for a prediction the gateway still remembers (the last
``feedback_window``) is counted at once, with its label lag, in the metrics the canary reads; feedback
for one it has forgotten is answered 202 and kept in the labels log (``labels/<deployment>/``, JSON
lines like the request log), which ``airloop.labels`` joins to the request log on the id. A second
label for a remembered prediction is refused (409) and counted, never counted twice.

    python -m airloop.serving.gateway --state-dir DIR --port N

Endpoints: ``POST /api/v1.0/predictions`` and ``/api/v1.0/feedback`` (Seldon's protocol, as
seldon-core's ``SeldonClient`` speaks it), ``GET /metrics`` (Prometheus), ``GET /health/ping``,
``GET /admin/state``, ``GET /admin/stats`` and ``PUT /admin/predictors`` (``{name: {"url",
"model_version", "weight", "shadow", "protocol"}}``, the whole routing table).

Clients speak Seldon's protocol whatever the predictors speak: a predictor's ``protocol`` is
``"seldon"`` (Seldon's wrapper) or ``"v2"`` (MLServer), whose requests and answers the gateway
translates (``v2_request``, ``seldon_answer``). Feedback is counted here for both; only Seldon's
predictors are passed it (V2 has no feedback endpoint). The admin endpoints need
``Authorization: Bearer <token>``, the token in ``$AIRLOOP_GATEWAY_TOKEN`` when the gateway started.

A client's mistake (a body that is not JSON, too deep or too large, ragged rows, a feature value that
is not a finite number, feedback that names no class of the model) is answered with a 4xx here,
before any predictor sees it, so it never counts against one. A predictor whose model has an input
encoding (``encoded``: its manifest's ``encoding``, ``airloop.encoding``) takes strings and nulls too,
which pass here when every live predictor's does; its model server decides what each column accepts.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import hmac
import itertools
import json
import math
import os
import random
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route as HttpRoute
from starlette.types import Receive, Scope, Send

from airloop import settings
from airloop.serving.base import check_mirror, check_traffic, check_weight
from airloop.serving.features import FeatureLookup, FeatureLookupError
from airloop.serving.local import (
    MAX_BODY_BYTES,
    SERVER_KEEPALIVE_S,
    STATE_FILE,
    TOKEN_ENV,
    V2_MODEL,
    routes_from_state,
)
from airloop.serving.logs import FLUSH_INTERVAL_S, LABELS_FOLDER, SHADOW_FOLDER, RequestLog
from airloop.serving.model import label_value, predicted_class

PREDICT_PATH = "/api/v1.0/predictions"
FEEDBACK_PATH = "/api/v1.0/feedback"
V2_PATH = f"/v2/models/{V2_MODEL}/infer"
PROTOCOLS = ("seldon", "v2")
# Predictors are processes of this machine: a routing table pointing elsewhere is refused.
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
# The largest float32: feature values beyond it are infinite for the model.
_FLOAT32_MAX = 3.4028234663852886e38
PREDICTOR_HEADER = "X-Airloop-Predictor"
REQUEST_ID_HEADER = "X-Airloop-Request-Id"
# Drop idle connections before the model servers do, so that no request goes out on a connection
# the server is closing.
CLIENT_KEEPALIVE_S = SERVER_KEEPALIVE_S / 2
# Seconds. Finer than Prometheus' defaults at the low end: a canary compares p99s of a few ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# Seconds from a prediction to its label: a second to a week.
LABEL_LAG_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 6 * 3600.0, 86400.0, 7 * 86400.0)
# The ids the gateway gives its predictions (os.urandom(16).hex()): feedback naming another is refused.
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")
CLIENT_METRIC = "seldon_api_executor_client_requests_seconds"
SERVER_METRIC = "seldon_api_executor_server_requests_seconds"
FEEDBACK_METRIC = "airloop_gateway_feedback"
LABEL_LAG_METRIC = "airloop_gateway_label_lag_seconds"
LABELS_METRIC = "airloop_gateway_labels"
PREDICTIONS_METRIC = "airloop_gateway_predictions"
SHADOW_METRIC = "airloop_gateway_shadow_pairs"
# Mirrored requests in flight at most: a slow or hung shadow must not pile up work in the gateway;
# requests beyond this are not mirrored (counted in airloop_gateway_shadow_dropped_total).
MAX_MIRRORS = 64
_JSON = {"content-type": "application/json"}
# One encoder for every answer: json.dumps with separators builds a new one per call.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


@dataclass(frozen=True)
class Route:
    name: str
    url: str
    model_version: str
    weight: int  # a shadow's weight is the percentage of requests mirrored to it
    shadow: bool = False
    protocol: str = "seldon"  # one of PROTOCOLS
    # A V2 predictor's columns, named after these when the client names none.
    feature_names: tuple[str, ...] | None = None
    # Its model encodes its inputs: strings (categories) and nulls (missing values) are its to take.
    encoded: bool = False


class RoutingTable:
    """An immutable set of routes; the gateway swaps the whole table, so a change is atomic."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self._live = [r for r in routes.values() if r.weight > 0 and not r.shadow]
        self._cumulative = list(itertools.accumulate(r.weight for r in self._live))
        self.shadow = next((r for r in routes.values() if r.shadow), None)
        # Strings and nulls pass the gateway only when every live predictor's model takes them.
        self.encoded = bool(self._live) and all(r.encoded for r in self._live)

    def pick(self) -> Route | None:
        # bisect on one random number: random.choices costs several times more per request.
        if len(self._live) < 2:
            return self._live[0] if self._live else None
        return self._live[bisect.bisect(self._cumulative, random.random() * self._cumulative[-1])]

    def fallback(self, failed: Route) -> Route | None:
        """Where a request that failed on ``failed`` is retried: the other live predictor with the
        largest weight (the champion, during a canary); None when there is no other."""
        others = [r for r in self._live if r is not failed]
        return max(others, key=lambda r: r.weight) if others else None

    def mirror(self) -> Route | None:
        """The shadow, for the share of requests it mirrors; None for the others."""
        shadow = self.shadow
        return shadow if shadow is not None and random.random() * 100 < shadow.weight else None

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {
            r.name: {
                "url": r.url,
                "model_version": r.model_version,
                "weight": r.weight,
                "shadow": r.shadow,
                "protocol": r.protocol,
                "feature_names": None if r.feature_names is None else list(r.feature_names),
                "encoded": r.encoded,
            }
            for r in self.routes.values()
        }


def parse_routes(table: dict[str, Any], hosts: frozenset[str] = LOOPBACK) -> RoutingTable:
    """``{name: {"url", "model_version", "weight", "shadow"}}`` -> RoutingTable; ValueError names the
    problem. A predictor's URL must be ``http(s)://host:port`` with a host in ``hosts``."""
    if not isinstance(table, dict):
        raise ValueError(
            f"predictors must be an object {{name: {{url, model_version, weight}}}}, got {table!r}"
        )
    routes = {}
    for name, spec in table.items():
        if not isinstance(spec, dict) or not {"url", "model_version", "weight"} <= spec.keys():
            raise ValueError(f"predictor {name!r} needs url, model_version and weight, got {spec!r}")
        shadow = spec.get("shadow", False)
        if not isinstance(shadow, bool):
            raise ValueError(f"'shadow' of predictor {name!r} must be true or false, got {shadow!r}")
        (check_mirror if shadow else check_weight)(name, spec["weight"])
        protocol = spec.get("protocol", "seldon")
        if protocol not in PROTOCOLS:
            raise ValueError(f"'protocol' of predictor {name!r} must be one of {PROTOCOLS}, got {protocol!r}")
        features = spec.get("feature_names")
        if features is not None and (
            not isinstance(features, list) or not features or not all(isinstance(f, str) for f in features)
        ):
            raise ValueError(
                f"'feature_names' of predictor {name!r} must be a list of strings, got {features!r}"
            )
        encoded = spec.get("encoded", False)
        if not isinstance(encoded, bool):
            raise ValueError(f"'encoded' of predictor {name!r} must be true or false, got {encoded!r}")
        url = _predictor_url(name, spec["url"], hosts)
        routes[name] = Route(
            name,
            url,
            str(spec["model_version"]),
            spec["weight"],
            shadow,
            protocol,
            None if features is None else tuple(features),
            encoded,
        )
    if routes:
        check_traffic({name: {"weight": r.weight, "shadow": r.shadow} for name, r in routes.items()})
    return RoutingTable(routes)


def _predictor_url(name: str, url: Any, hosts: frozenset[str]) -> str:
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        port = parts.port if parts else None
    except ValueError:
        parts = port = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or parts.hostname not in hosts
        or port is None
        or parts.username is not None
        or parts.password is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ValueError(
            f"url of predictor {name!r} must be http(s)://HOST:PORT with HOST one of {sorted(hosts)}, "
            f"got {url!r}"
        )
    return url.rstrip("/")


class BadRequest(ValueError):
    """A client's mistake: answered with ``code`` (a 4xx), never counted against a predictor."""

    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.code = code


_EXPECTED = (
    "expected {'data': {'names': [...], 'ndarray': [[...], ...]}}, "
    "{'data': {'names': [...], 'tensor': {'shape': [rows, columns], 'values': [...]}}} "
    "or {'jsonData': {name: value, ...} or [{name: value, ...}, ...]}"
)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body.decode())  # a str skips json's encoding detection
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than json can parse
        raise BadRequest(
            f"the body is not JSON the gateway can read: {type(exc).__name__}: {exc}"[:300]
        ) from None


def _datadef_rows(data: Any, what: str) -> tuple[list[list[Any]], str]:
    """Seldon's ``data`` (``ndarray`` or ``tensor``) -> (rectangular rows, the kind it came as)."""
    if isinstance(data, dict) and "ndarray" in data:
        rows, kind = data["ndarray"], "ndarray"
    elif isinstance(data, dict) and isinstance(data.get("tensor"), dict):
        shape, values = data["tensor"].get("shape"), data["tensor"].get("values")
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or not all(type(n) is int and n > 0 for n in shape)
            or not isinstance(values, list)
            or len(values) != shape[0] * shape[1]
        ):
            raise BadRequest(f"{what}: a tensor needs shape [rows, columns] and rows x columns values")
        width = shape[1]
        rows, kind = [values[i : i + width] for i in range(0, len(values), width)], "tensor"
    else:
        raise BadRequest(f"{what}: {_EXPECTED}")
    if not isinstance(rows, list) or not rows or not all(isinstance(row, list) for row in rows):
        raise BadRequest(f"{what}: rows must be a non-empty list of lists")
    width = len(rows[0])
    ragged = next((i for i, row in enumerate(rows) if len(row) != width), None)
    if ragged is not None or width == 0:
        raise BadRequest(
            f"{what}: every row needs the same number of columns ({width}); row {ragged} differs"
        )
    return rows, kind


def parse_prediction(payload: Any) -> tuple[list[str] | None, list[list[Any]], str]:
    """A prediction request -> (column names or None, rows, the kind of payload it came as)."""
    if isinstance(payload, dict) and "jsonData" in payload:
        records = payload["jsonData"]
        records = [records] if isinstance(records, dict) else records
        if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
            raise BadRequest(f"jsonData must be an object or a list of objects: {_EXPECTED}")
        keys = list(records[0])
        if not all(list(r) == keys for r in records):
            raise BadRequest(f"every jsonData record needs the same keys, in the same order: {keys}")
        return keys, [list(r.values()) for r in records], "jsonData"
    if not isinstance(payload, dict):
        raise BadRequest(_EXPECTED)
    rows, kind = _datadef_rows(payload.get("data"), "data")
    names = payload["data"].get("names") or None
    if names is not None and (
        not isinstance(names, list)
        or not all(isinstance(n, str) for n in names)
        or len(names) != len(rows[0])
    ):
        raise BadRequest(f"names must be {len(rows[0])} strings, one per column, got {names!r:.200}")
    return names, rows, kind


def check_features(names: list[str] | None, rows: list[list[Any]], encoded: bool = False) -> None:
    """Every feature value a finite number (float32 range): null, NaN, Infinity and 1e400 are refused,
    naming the column, rather than answered with made-up probabilities. For a model that ``encoded``
    its inputs, strings and nulls pass too (its server checks them against its encoding)."""
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            if encoded and (value is None or type(value) is str):
                continue
            # One comparison refuses NaN, infinities and values beyond float32 (ints of any size too).
            if type(value) not in (int, float) or not -_FLOAT32_MAX <= value <= _FLOAT32_MAX:
                column = repr(names[j]) if names else str(j)
                takes = "a finite number, a string or null" if encoded else "a finite number"
                raise BadRequest(
                    f"feature {column} of row {i} must be {takes}, got {json.dumps(value)[:50]}"
                    + ("" if encoded else " (the model declares no handling of missing values)")
                )


def v2_request(names: list[str] | None, rows: list[list[Any]], encoded: bool = False) -> bytes:
    """Checked rows as a V2 inference request: one ``[rows]`` tensor per named column (V2's named
    columns, which MLServer's adaptive batching merges by name), else one ``[rows, columns]`` tensor.
    For a model that ``encoded`` its inputs every tensor is ``BYTES``, each element the value's JSON
    text (``"x"``, ``1.5``, ``null``), which its server reads back (``airloop.serving.mlserver``)."""
    datatype = "BYTES" if encoded else "FP64"

    def data(values: list[Any]) -> list[Any]:
        return [_COMPACT.encode(v) for v in values] if encoded else values

    if names and len(names) == len(rows[0]):
        inputs = [
            {"name": name, "shape": [len(rows)], "datatype": datatype, "data": data([row[j] for row in rows])}
            for j, name in enumerate(names)
        ]
    else:
        width = len(rows[0])
        flat = data([value for row in rows for value in row])
        inputs = [{"name": "features", "shape": [len(rows), width], "datatype": datatype, "data": flat}]
    return _encode({"inputs": inputs})


def seldon_answer(code: int, answer: Any) -> dict[str, Any]:
    """A V2 answer (``probabilities`` ``[rows, classes]``, the classes in ``parameters.classes``) as
    Seldon's; a V2 error (``{"error": ...}``) as Seldon's failure. ValueError: not a V2 answer."""
    try:
        if code != 200:
            return _status(code, str(answer["error"]))
        output = answer["outputs"][0]
        rows, width = output["shape"]
        data = output["data"]
        if len(data) != rows * width:
            raise ValueError(f"{len(data)} values for shape {output['shape']}")
        classes = (answer.get("parameters") or {}).get("classes") or []
        ndarray = [data[i : i + width] for i in range(0, len(data), width)]
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise ValueError(f"not a V2 inference answer: {exc!r}") from None
    return {"data": {"names": classes, "ndarray": ndarray}, "meta": {}}


def _label(value: Any, allowed: dict[Any, str] | None = None) -> Any:
    """A truth label as ``label_value`` compares it; ``allowed``: the model's classes, when known."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if (
        isinstance(value, bool)
        or not isinstance(value, (str, int, float))
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        classes = (
            "one of the model's classes"
            if allowed is None
            else f"one of the model's classes {sorted(allowed.values())}"
        )
        raise BadRequest(f"a truth label must be {classes}, got {value!r:.50}")
    key = label_value(value)
    if allowed is not None and key not in allowed:
        raise BadRequest(f"truth {value!r:.50} is not one of the model's classes {sorted(allowed.values())}")
    return key


def _truth(value: Any) -> list[Any]:
    """Truth labels, one per row: Seldon's ``{"data": {"ndarray" | "tensor": ...}}``, ``[1, 0]`` or ``1``."""
    if isinstance(value, dict):
        rows, _ = _datadef_rows(value.get("data"), "truth")
        return rows
    return value if isinstance(value, list) else [value]


def _status(code: int, info: str) -> dict[str, Any]:
    # The shape of Seldon's error responses.
    return {"status": {"code": code, "info": info, "status": "FAILURE"}}


def _failure(code: int, info: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(_status(code, info), status_code=code, headers=headers)


def _encode(result: dict[str, Any]) -> bytes:
    return _COMPACT.encode(result).encode()


@dataclass
class _Outgoing:
    """A checked prediction request, encoded for each protocol once, when a predictor needs it."""

    names: list[str] | None
    rows: list[list[Any]]
    seldon: bytes
    _v2: dict[tuple[tuple[str, ...] | None, bool], bytes] = field(default_factory=dict)

    def v2(self, route: Route) -> bytes:
        """For a V2 predictor: columns named as the client named them, else as the route's model does."""
        names = tuple(self.names) if self.names else route.feature_names
        body = self._v2.get((names, route.encoded))
        if body is None:
            body = v2_request(list(names) if names else None, self.rows, route.encoded)
            self._v2[names, route.encoded] = body
        return body


@dataclass
class _Recent:
    route: Route
    names: list[str] | None
    features: list[Any]
    classes: list[str]
    probabilities: list[list[float]]
    at: float  # epoch seconds of the prediction
    labelled: bool = False


class Gateway:
    def __init__(
        self,
        deployment: str,
        table: RoutingTable,
        *,
        artefact_root: str,
        log_batch: int = 500,
        log_interval_s: float = FLUSH_INTERVAL_S,
        timeout_s: float = 10.0,
        feedback_window: int = 20_000,
        features: FeatureLookup | None = None,
        admin_token: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        hosts: frozenset[str] = LOOPBACK,
    ) -> None:
        """``admin_token``: what the admin endpoints need (without one they answer nobody);
        ``hosts``: where predictors may be (``PUT /admin/predictors`` refuses others)."""
        self.deployment = deployment
        self._admin_header = f"Bearer {admin_token}".encode() if admin_token else None
        self.max_body_bytes = max_body_bytes
        self.hosts = hosts
        self.features = features  # looks up features for requests that carry only entity keys
        self.table = table
        self.log = RequestLog(artefact_root, deployment, log_batch)
        # One line per mirrored request: both answers, the shadow's latency and whether they agree.
        self.shadow_log = RequestLog(artefact_root, deployment, log_batch, folder=SHADOW_FOLDER)
        # One line per label received through the feedback endpoint (airloop.labels joins it on the id).
        self.labels_log = RequestLog(artefact_root, deployment, log_batch, folder=LABELS_FOLDER)
        self.log_interval_s = log_interval_s
        self.timeout_s = timeout_s
        self.feedback_window = feedback_window
        self.recent: OrderedDict[str, _Recent] = OrderedDict()
        self.session: aiohttp.ClientSession  # opened by lifespan(), inside the server's event loop
        self.registry = CollectorRegistry()
        labels = ["deployment_name", "predictor_name", "predictor_version", "method", "code"]
        predictor = ["deployment_name", "predictor_name", "predictor_version"]
        self.client_seconds = Histogram(
            CLIENT_METRIC,
            "Requests from the gateway to a predictor",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.server_seconds = Histogram(
            SERVER_METRIC, "Requests to the gateway", labels, buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.feedback = Counter(
            FEEDBACK_METRIC,
            "Feedback received per predictor",
            [*predictor, "outcome"],
            registry=self.registry,
        )
        self.predicted = Counter(
            PREDICTIONS_METRIC,
            "Answered rows per predicted class",
            [*predictor, "class"],
            registry=self.registry,
        )
        self.shadow_pairs = Counter(
            SHADOW_METRIC,
            "Rows answered by the shadow and the live predictor",
            [*predictor, "outcome"],
            registry=self.registry,
        )
        self.label_lag = Histogram(
            LABEL_LAG_METRIC,
            "Seconds from a prediction to its truth label, per predictor (labelled requests)",
            predictor,
            buckets=LABEL_LAG_BUCKETS,
            registry=self.registry,
        )
        self.labels = Counter(
            LABELS_METRIC,
            "Labels received: counted (a remembered prediction), late (kept in the labels log) or duplicate",
            ["deployment_name", "outcome"],
            registry=self.registry,
        )
        self.rewards = Histogram(
            "airloop_gateway_feedback_reward",
            "Rewards sent with feedback per predictor (Seldon's reward)",
            predictor,
            buckets=(0.0, 0.25, 0.5, 0.75, 1.0),
            registry=self.registry,
        )
        self.shadow_dropped = Counter(
            "airloop_gateway_shadow_dropped",
            "Requests not mirrored: too many mirrored requests in flight",
            predictor,
            registry=self.registry,
        )
        # Labelled children by label values: labels() costs more than the observation itself.
        self._children: dict[tuple[Any, ...], Any] = {}
        self._flushes: set[asyncio.Task] = set()
        self._mirrors: set[asyncio.Task] = set()

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
            for mirror in self._mirrors:
                mirror.cancel()
            await asyncio.gather(*self._flushes, *self._mirrors, return_exceptions=True)
            for log in (self.log, self.shadow_log, self.labels_log):
                log.write(log.take())
            await self.session.close()

    async def _flush_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.log_interval_s)
            self._flush(self.log)
            self._flush(self.shadow_log)
            self._flush(self.labels_log)

    def _flush(self, log: RequestLog) -> None:
        records = log.take()
        if records:
            self._spawn(asyncio.to_thread(log.write, records), self._flushes)

    @staticmethod
    def _spawn(coroutine: Any, tasks: set[asyncio.Task]) -> None:
        task = asyncio.create_task(coroutine)
        tasks.add(task)  # a reference until done: the loop keeps only weak ones
        task.add_done_callback(tasks.discard)

    def _child(self, metric: Any, *labels: str) -> Any:
        child = self._children.get((metric, labels))
        if child is None:
            child = self._children[(metric, labels)] = metric.labels(*labels)
        return child

    def app(self) -> Callable[..., Awaitable[None]]:
        routes = Starlette(
            lifespan=self.lifespan,
            routes=[
                HttpRoute("/health/ping", lambda _: PlainTextResponse("pong")),
                HttpRoute("/metrics", self.prometheus),
                HttpRoute("/admin/state", self.get_state),
                HttpRoute("/admin/stats", lambda _: JSONResponse(self.stats())),
                HttpRoute("/admin/predictors", self.put_predictors, methods=["PUT"]),
            ],
        )
        handlers = {PREDICT_PATH: self.predict, FEEDBACK_PATH: self.send_feedback}

        async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return await routes(scope, receive, send)
            path = scope["path"]
            if path.startswith("/admin/") and not self._authorised(scope):
                return await _answer(
                    send, 401, _encode(_status(401, "the admin API needs the gateway's token"))
                )
            length = _content_length(scope)
            if length is not None and length > self.max_body_bytes:
                return await _answer(send, 413, _encode(_status(413, self._too_large())))
            handler = handlers.get(path) if scope["method"] == "POST" else None
            if handler is None:
                return await routes(scope, receive, send)
            # Predictions and feedback skip Starlette's routing, middleware and Request/Response
            # objects: about a tenth of the gateway's CPU time per request (docs/serving.md, "Overhead").
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:  # a body sent without its length
                    return await _answer(send, 413, _encode(_status(413, self._too_large())))
                chunks.append(chunk)
                more = message.get("more_body", False)
            headers = dict(scope["headers"])
            await _answer(send, *await handler(b"".join(chunks), headers))

        return asgi

    def _authorised(self, scope: Scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return self._admin_header is not None and hmac.compare_digest(given, self._admin_header)

    def _too_large(self) -> str:
        return f"request bodies are limited to {self.max_body_bytes} bytes (the target's max_body_bytes)"

    # -- traffic -----------------------------------------------------------------------------------
    async def predict(self, body: bytes, headers: dict[bytes, bytes]) -> tuple[int, bytes, dict[str, str]]:
        """One prediction request's body -> (status, response body, headers)."""
        start = time.perf_counter()
        try:
            names, rows, kind = parse_prediction(_json(body))
            if self.features is not None and self.features.wants(names):
                names, rows, body = await self.features.enrich(self.session, names or [], rows)
            elif kind != "ndarray":  # the predictors take ndarray only
                data: dict[str, Any] = (
                    {"ndarray": rows} if names is None else {"names": names, "ndarray": rows}
                )
                body = _encode({"data": data})
            check_features(names, rows, self.table.encoded)
        except BadRequest as exc:
            return exc.code, _encode(_status(exc.code, str(exc))), {}
        except FeatureLookupError as exc:
            return exc.code, _encode(_status(exc.code, str(exc))), {}
        route = self.table.pick()
        if route is None:
            info = f"deployment {self.deployment!r} has no predictor with traffic"
            return 503, _encode(_status(503, info)), {}
        request_id = os.urandom(16).hex()  # what uuid4().hex holds, without building a UUID
        outgoing = _Outgoing(names, rows, body)
        code, result, latency = await self._forward(route, outgoing)
        labels = (self.deployment, route.name, route.model_version, "predictions", str(code))
        self._child(self.client_seconds, *labels).observe(latency)
        failed = None
        if code >= 500 and (fallback := self.table.fallback(route)) is not None:
            # Counted against the predictor that failed, answered by the champion: no client sees a
            # canary crash.
            failed, route = route, fallback
            code, result, latency = await self._forward(route, outgoing)
            labels = (self.deployment, route.name, route.model_version, "predictions", str(code))
            self._child(self.client_seconds, *labels).observe(latency)
        probabilities = classes = None
        if code == 200:
            meta = result.setdefault("meta", {})
            # Seldon's fields only (SeldonClient parses answers into its protobuf): puid correlates
            # feedback, the tags name the predictor.
            meta["puid"] = request_id
            meta.setdefault("tags", {}).update(
                {"predictor": route.name, "model_version": route.model_version}
            )
            probabilities, classes = result["data"]["ndarray"], result["data"].get("names") or []
            self._count_predicted(route, probabilities, classes)
            self._remember(request_id, _Recent(route, names, rows, classes, probabilities, time.time()))
            if kind == "tensor":  # answered as asked
                width = len(probabilities[0]) if probabilities else 0
                values = [p for row in probabilities for p in row]
                result["data"] = {
                    "names": classes,
                    "tensor": {"shape": [len(probabilities), width], "values": values},
                }
        shadow = self.table.mirror()
        if shadow is not None:
            if len(self._mirrors) < MAX_MIRRORS:
                self._spawn(
                    self._mirror(shadow, outgoing, request_id, route, code, probabilities, classes),
                    self._mirrors,
                )
            else:
                self._child(self.shadow_dropped, self.deployment, shadow.name, shadow.model_version).inc()
        if self.log.add(
            {
                "request_id": request_id,
                "ts": time.time(),
                "deployment": self.deployment,
                "predictor": route.name,
                "model_version": route.model_version,
                "names": names,
                "features": rows,
                "prediction": probabilities,
                "classes": classes,
                "latency_ms": round(latency * 1e3, 3),
                "status": code,
                "failed_on": failed.name if failed else None,
            }
        ):
            self._flush(self.log)
        self._child(self.server_seconds, *labels).observe(time.perf_counter() - start)
        return code, _encode(result), {PREDICTOR_HEADER: route.name, REQUEST_ID_HEADER: request_id}

    async def _forward(self, route: Route, request: _Outgoing) -> tuple[int, dict[str, Any], float]:
        """POST a prediction request to a predictor: (status, Seldon's answer, seconds); failures become
        502/504."""
        sent = time.perf_counter()
        v2 = route.protocol == "v2"
        url, body = (
            (f"{route.url}{V2_PATH}", request.v2(route))
            if v2
            else (f"{route.url}{PREDICT_PATH}", request.seldon)
        )
        try:
            async with self.session.post(url, data=body, headers=_JSON) as answer:
                code, result = answer.status, json.loads((await answer.read()).decode())
            if v2:
                result = seldon_answer(code, result)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            code = 504 if isinstance(exc, TimeoutError) else 502
            result = _status(code, f"predictor {route.name}: {exc!r}")
        return code, result, time.perf_counter() - sent

    def _count_predicted(self, route: Route, probabilities: list[list[float]], classes: list[str]) -> None:
        for row in probabilities:
            self._child(
                self.predicted,
                self.deployment,
                route.name,
                route.model_version,
                predicted_class(row, classes),
            ).inc()

    async def _mirror(
        self,
        shadow: Route,
        request: _Outgoing,
        request_id: str,
        live: Route,
        live_code: int,
        live_answer: list[list[float]] | None,
        live_classes: list[str] | None,
    ) -> None:
        """Send a copy of a request to the shadow after the client has its answer; compare the answers."""
        code, result, latency = await self._forward(shadow, request)
        self._child(
            self.client_seconds, self.deployment, shadow.name, shadow.model_version, "predictions", str(code)
        ).observe(latency)
        answer = agreements = rows = None
        if code == 200:
            answer, classes = result["data"]["ndarray"], result["data"].get("names") or []
            self._count_predicted(shadow, answer, classes)
            if live_code == 200 and live_answer is not None and len(answer) == len(live_answer):
                rows = len(answer)
                agreements = sum(
                    label_value(predicted_class(mine, classes))
                    == label_value(predicted_class(theirs, live_classes or []))
                    for mine, theirs in zip(answer, live_answer, strict=True)
                )
                labels = (self.deployment, shadow.name, shadow.model_version)
                self._child(self.shadow_pairs, *labels, "agree").inc(agreements)
                self._child(self.shadow_pairs, *labels, "disagree").inc(rows - agreements)
        if self.shadow_log.add(
            {
                "request_id": request_id,
                "ts": time.time(),
                "deployment": self.deployment,
                "predictor": live.name,
                "model_version": live.model_version,
                "status": live_code,
                "prediction": live_answer,
                "shadow": shadow.name,
                "shadow_version": shadow.model_version,
                "shadow_status": code,
                "shadow_prediction": answer,
                "shadow_latency_ms": round(latency * 1e3, 3),
                "rows": rows,
                "agreements": agreements,
            }
        ):
            self._flush(self.shadow_log)

    def _remember(self, request_id: str, recent: _Recent) -> None:
        self.recent[request_id] = recent
        if len(self.recent) > self.feedback_window:
            self.recent.popitem(last=False)

    async def send_feedback(
        self, body: bytes, headers: dict[bytes, bytes]
    ) -> tuple[int, bytes, dict[str, str]]:
        """Seldon's feedback (``truth`` and/or ``reward``, the prediction named by the response's
        ``meta.puid``, a ``request_id`` or the request id header) -> (status, body, headers).

        200: counted now; 202: a prediction the gateway no longer remembers, kept in the labels log;
        409: the prediction already had its feedback (one per prediction)."""
        try:
            payload = _json(body)
            if not isinstance(payload, dict):
                raise BadRequest("feedback must be an object {'response': ..., 'truth': ..., 'reward': ...}")
            request_id = _request_id(payload, headers)
            reward = payload.get("reward")
            if reward is not None and (type(reward) not in (int, float) or not math.isfinite(reward)):
                raise BadRequest(f"reward must be a finite number, got {reward!r:.50}")
            if payload.get("truth") is None and reward is None:
                raise BadRequest("feedback needs a truth, a reward or both")
            recent = self.recent.get(request_id)
            if recent is None:
                if not _REQUEST_ID.fullmatch(request_id):
                    raise BadRequest(
                        f"unknown request id {request_id!r}: the gateway's ids are 32 hexadecimal characters",
                        404,
                    )
                late = None if payload.get("truth") is None else [_label(t) for t in _truth(payload["truth"])]
                return self._late_label(request_id, late, reward)
            if recent.labelled:
                self._child(self.labels, self.deployment, "duplicate").inc()
                raise BadRequest(
                    f"request {request_id} already has its feedback: a second one is not counted", 409
                )
            truth = None
            if payload.get("truth") is not None:
                width = len(recent.probabilities[0])
                classes = recent.classes or [str(i) for i in range(width)]
                allowed = {label_value(c): str(c) for c in classes}
                truth = [_label(t, allowed) for t in _truth(payload["truth"])]
                if len(truth) != len(recent.probabilities):
                    raise BadRequest(
                        f"{len(truth)} truth labels for {len(recent.probabilities)} predicted rows"
                    )
        except BadRequest as exc:
            return exc.code, _encode(_status(exc.code, str(exc))), {}
        recent.labelled = True  # one feedback per prediction
        route = recent.route
        labels = (self.deployment, route.name, route.model_version)
        forward: dict[str, Any] = {
            "request": {"data": {"names": recent.names, "ndarray": recent.features}},
            "response": {"data": {"names": recent.classes, "ndarray": recent.probabilities}},
        }
        if recent.names is None:
            del forward["request"]["data"]["names"]
        correct = None
        if truth is not None:
            correct = sum(
                label_value(predicted_class(p, recent.classes)) == t
                for p, t in zip(recent.probabilities, truth, strict=True)
            )
            self._child(self.feedback, *labels, "correct").inc(correct)
            self._child(self.feedback, *labels, "incorrect").inc(len(truth) - correct)
            self._child(self.label_lag, *labels).observe(time.time() - recent.at)
            forward["truth"] = {"data": {"ndarray": [[_class_of(t, recent.classes)] for t in truth]}}
            forward["reward"] = correct / len(truth)
        if reward is not None:
            self._child(self.rewards, *labels).observe(reward)
            forward["reward"] = reward
        self._child(self.labels, self.deployment, "counted").inc()
        self._log_label(
            request_id,
            truth,
            reward,
            predictor=route.name,
            model_version=route.model_version,
            lag_s=round(time.time() - recent.at, 3),
            correct=correct,
        )
        answer_headers = {PREDICTOR_HEADER: route.name, REQUEST_ID_HEADER: request_id}
        # Seldon's model servers take feedback too (e.g. for online learning): pass it on. V2 has no
        # feedback endpoint: the gateway's counts are all there is.
        if route.protocol == "seldon" and not await self._pass_feedback(route, forward):
            info = f"feedback counted, but predictor {route.name} did not take it"
            return 502, _encode(_status(502, info)), answer_headers
        done = {
            "meta": {"puid": request_id, "tags": {"predictor": route.name}},
            "jsonData": {"feedback": len(truth or ()), "correct": correct, "reward": reward},
        }
        return 200, _encode(done), answer_headers

    def _late_label(
        self, request_id: str, truth: list[Any] | None, reward: float | None
    ) -> tuple[int, bytes, dict[str, str]]:
        """Feedback for a prediction no longer remembered: kept in the labels log for the join."""
        self._child(self.labels, self.deployment, "late").inc()
        self._log_label(request_id, truth, reward)
        info = (
            f"request {request_id} is not among the last {self.feedback_window} predictions: its label "
            "is kept in the labels log and joined to the request log on the id"
        )
        done = {
            "meta": {"puid": request_id},
            "status": {"code": 202, "info": info, "status": "SUCCESS"},
            "jsonData": {"feedback": len(truth or ()), "correct": None, "reward": reward},
        }
        return 202, _encode(done), {REQUEST_ID_HEADER: request_id}

    def _log_label(
        self, request_id: str, truth: list[Any] | None, reward: float | None, **known: Any
    ) -> None:
        """One line of the labels log; ``known``: what the gateway still remembered of the prediction."""
        record = {
            "request_id": request_id,
            "ts": time.time(),
            "deployment": self.deployment,
            "truth": truth,
            "reward": reward,
            "source": "feedback",
            **known,
        }
        if self.labels_log.add(record):
            self._flush(self.labels_log)

    async def _pass_feedback(self, route: Route, forward: dict[str, Any]) -> bool:
        try:
            async with self.session.post(f"{route.url}{FEEDBACK_PATH}", json=forward) as answer:
                return answer.ok
        except (aiohttp.ClientError, TimeoutError):
            return False

    # -- admin -------------------------------------------------------------------------------------
    async def get_state(self, request: Request) -> JSONResponse:
        return JSONResponse({"deployment": self.deployment, "predictors": self.table.as_dict()})

    async def put_predictors(self, request: Request) -> JSONResponse:
        try:
            self.table = parse_routes(await request.json(), self.hosts)
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
                        entry["latency_ms_buckets"][_bound(sample.labels["le"], 1e3)] += int(sample.value)
                elif family.name == LABEL_LAG_METRIC:
                    if sample.name.endswith("_count"):
                        entry["labelled"] += int(sample.value)
                    elif sample.name.endswith("_bucket"):
                        entry["label_lag_s_buckets"][_bound(sample.labels["le"])] += int(sample.value)
                elif not sample.name.endswith("_total"):
                    continue  # a counter's "_created" sample
                elif family.name == FEEDBACK_METRIC:
                    entry["feedback"] += int(sample.value)
                    if sample.labels["outcome"] == "correct":
                        entry["feedback_correct"] += int(sample.value)
                elif family.name == PREDICTIONS_METRIC:
                    predicted, label = entry["predicted"], sample.labels["class"]
                    predicted[label] = predicted.get(label, 0) + int(sample.value)
                elif family.name == SHADOW_METRIC:
                    entry["pairs"] += int(sample.value)
                    if sample.labels["outcome"] == "agree":
                        entry["agreements"] += int(sample.value)
        return stats


def _request_id(payload: dict[str, Any], headers: dict[bytes, bytes]) -> str:
    response = payload.get("response")
    meta = response.get("meta") if isinstance(response, dict) else None
    request_id = (
        headers.get(REQUEST_ID_HEADER.lower().encode(), b"").decode(errors="replace")
        or payload.get("request_id")
        or (meta.get("puid") if isinstance(meta, dict) else None)
    )
    if not isinstance(request_id, str) or not 0 < len(request_id) <= 64:
        raise BadRequest(
            "feedback needs the prediction's id: the response's meta.puid, 'request_id' or the "
            f"{REQUEST_ID_HEADER} header (a string), got {request_id!r:.50}"
        )
    return request_id


def _class_of(label: Any, classes: list[str]) -> Any:
    """A truth label as the model names its class (``1.0`` -> ``"1"``), for the model server."""
    return next((c for c in classes if label_value(c) == label), label)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _answer(send: Send, code: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *((k.encode(), v.encode()) for k, v in (headers or {}).items()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _bound(le: str, scale: float = 1.0) -> str:
    return le if le == "+Inf" else format(float(le) * scale, "g")


def _empty_stats() -> dict[str, Any]:
    # "pairs" is there for every predictor: this target records mirrored pairs, none yet is a count.
    return {
        "requests": 0,
        "errors": 0,
        "latency_ms_sum": 0.0,
        "feedback": 0,
        "feedback_correct": 0,
        "latency_ms_buckets": {_bound(str(b), 1e3): 0 for b in (*LATENCY_BUCKETS, "+Inf")},
        # Requests whose truth label came while the gateway remembered them, by seconds it took.
        "labelled": 0,
        "label_lag_s_buckets": {_bound(str(b)): 0 for b in (*LABEL_LAG_BUCKETS, "+Inf")},
        "predicted": {},
        "pairs": 0,
        "agreements": 0,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--state-dir", required=True, type=Path, help=f"folder holding the deployment's {STATE_FILE}"
    )
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--log-batch", type=int, default=500, help="write the request log every N requests")
    parser.add_argument("--log-interval", type=float, default=FLUSH_INTERVAL_S, help="... or every T seconds")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a predictor")
    args = parser.parse_args(argv)
    token = os.environ.pop(TOKEN_ENV, None)  # not passed on to anything the gateway runs
    if not token:
        parser.error(f"set {TOKEN_ENV}: the admin API's token (the serving target passes it)")
    state = json.loads((args.state_dir / STATE_FILE).read_text())
    gateway = Gateway(
        state["deployment"],
        parse_routes(routes_from_state(state)),
        artefact_root=settings.artefact_root(),
        log_batch=args.log_batch,
        log_interval_s=args.log_interval,
        timeout_s=args.timeout,
        features=FeatureLookup.from_config(state.get("features")),
        admin_token=token,
        max_body_bytes=state.get("max_body_bytes", MAX_BODY_BYTES),
    )
    # No Server and Date headers: nothing a client needs, and two header lines less to build per answer.
    uvicorn.run(
        gateway.app(),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
