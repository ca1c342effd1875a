"""A deployment on the local serving target without models: the real gateway (``airloop.serving.gateway``)
in front of predictors that only answer their health check, for the UI's tests and its browser test."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from airloop.ports import free_port
from airloop.serving.local import TOKEN_ENV

# The gateway's admin token, given to the UI as the serving connection's password.
TOKEN = "gateway-admin-token"


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/health/ping" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def local_deployment(
    home: Path, deployment: str, weights: dict[str, int]
) -> Iterator[tuple[subprocess.Popen, dict]]:
    """Deployment ``deployment`` under ``home`` with one predictor ``v<version>`` per entry of ``weights``
    (model version -> traffic %); yields the gateway's process (its own process group) and the
    ``airloop_serving`` connection that reaches it."""
    predictor = ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    threading.Thread(target=predictor.serve_forever, daemon=True).start()
    folder = home / deployment
    folder.mkdir(parents=True)
    predictors: dict[str, Any] = {
        f"v{version}": {
            "model_version": version,
            "model_dir": str(home),
            "pid": os.getpid(),
            "port": predictor.server_port,
            "weight": weight,
            "shadow": False,
        }
        for version, weight in weights.items()
    }
    state = {"deployment": deployment, "features": None, "predictors": predictors}
    (folder / "state.json").write_text(json.dumps(state))
    port = free_port()
    gateway = subprocess.Popen(
        [sys.executable, "-m", "airloop.serving.gateway", "--state-dir", str(folder), "--port", str(port)],
        env={**os.environ, TOKEN_ENV: TOKEN},
        stdout=(home / "gateway.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ping", timeout=2).is_success:
                    break
            except httpx.TransportError:
                assert gateway.poll() is None and time.monotonic() < deadline, (
                    home / "gateway.log"
                ).read_text()
            time.sleep(0.2)
        (folder / "state.json").write_text(
            json.dumps({**state, "gateway": {"pid": gateway.pid, "port": port}})
        )
        connection = {
            "conn_type": "airloop_serving",
            "password": TOKEN,
            "extra": {"target": "local", "home": str(home)},
        }
        yield gateway, connection
    finally:
        if gateway.poll() is None:
            os.killpg(gateway.pid, signal.SIGTERM)
            gateway.wait(timeout=30)
        predictor.shutdown()
