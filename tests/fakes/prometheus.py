"""Prometheus' query API for the tests, on 127.0.0.1: ``/api/v1/query`` answers each query with the
instant vector a test put under the metric the query names (``series``), and keeps the queries."""

from __future__ import annotations

import json
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


class FakePrometheus(ThreadingHTTPServer):
    """``series``: ``{metric: [{"metric": labels, "value": [ts, "n"]}, ...]}``; ``queries``: the queries."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.series: dict[str, list[dict[str, Any]]] = {}
        self.queries: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def sample(labels: dict[str, str], value: float) -> dict[str, Any]:
    """One element of an instant vector."""
    return {"metric": labels, "value": [1700000000.0, str(value)]}


class _Handler(BaseHTTPRequestHandler):
    server: FakePrometheus

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        query = parse_qs(urlparse(self.path).query)["query"][0]
        self.server.queries.append(query)
        metric = re.search(r"\(([a-z_]+)\{", query)
        result = self.server.series.get(metric.group(1), []) if metric else []
        data = json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
