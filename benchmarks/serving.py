"""One-row requests through the local gateway to each model server, side by side in one run.

Deploys the same OpenVINO IR twice with the local serving target, once on Seldon's Python wrapper
(``server="seldon"``, the serving runtime) and once on MLServer (``server="mlserver"``, V2 protocol),
starts a bare ASGI echo under uvicorn (a canned answer: the floor of any Python HTTP server here),
then sends one-row requests in alternating rounds, so background load hits every path alike:

- ``echo``: straight to the echo;
- ``<server> direct``: straight to the model server (Seldon's protocol, or V2);
- ``<server> gateway``: through the gateway, as clients call it (Seldon's protocol).

Prints p50 / p99 latency of back-to-back requests, requests per second with ``--clients`` concurrent
senders, the gateway's CPU time per request (from /proc: unlike latency it hardly moves with the
machine's other load) and the ratios the serving targets are judged by: MLServer against Seldon's
wrapper through the gateway (requests/s, p99), and what the gateway adds at p50 to each server.

    python benchmarks/serving.py [--model-dir IR_DIR] [--requests 1000] [--rounds 3] [--clients 4]

Without ``--model-dir`` it builds the integration tests' small MLP IR (``tests.fakes.models``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("CI", "true")  # OpenVINO telemetry off
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("AIRLOOP_RUNTIMES", str(REPO / ".airloop" / "runtimes"))

import httpx  # noqa: E402

from airloop.ports import free_port  # noqa: E402
from airloop.serving.local import V2_MODEL, LocalServingTarget  # noqa: E402

ROW = [0.5, -1.0, 2.0, 0.1]
SELDON_BODY = {"data": {"names": ["f0", "f1", "f2", "f3"], "ndarray": [ROW]}}
# What the gateway sends MLServer for SELDON_BODY (``airloop.serving.gateway.v2_request``).
V2_BODY = {
    "inputs": [
        {"name": name, "shape": [1], "datatype": "FP64", "data": [value]}
        for name, value in zip(SELDON_BODY["data"]["names"], ROW, strict=True)
    ]
}
ECHO = """
import json, sys, uvicorn
body = json.dumps({"data": {"names": ["0", "1"], "ndarray": [[0.4, 0.6]]}, "meta": {}}).encode()
headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", server_header=False,
            date_header=False)
"""


def sequential(url: str, body: dict[str, Any], n: int) -> list[float]:
    """Latencies (ms) of n back-to-back requests over one keep-alive connection."""
    with httpx.Client(trust_env=False) as client:
        for _ in range(20):
            client.post(url, json=body)
        latencies = []
        for _ in range(n):
            start = time.perf_counter()
            answer = client.post(url, json=body)
            latencies.append((time.perf_counter() - start) * 1e3)
            answer.raise_for_status()
    return latencies


def throughput(url: str, body: dict[str, Any], n: int, clients: int) -> float:
    """Requests per second with ``clients`` concurrent senders."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: sequential(url, body, n // clients), range(clients)))
    return n / (time.perf_counter() - start)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1]


def _echo() -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", ECHO, str(port)])
    url = f"http://127.0.0.1:{port}/api/v1.0/predictions"
    for _ in range(100):
        try:
            httpx.post(url, json=SELDON_BODY, trust_env=False).raise_for_status()
            return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the echo server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="an OpenVINO IR folder with manifest.json")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4, help="concurrent senders for requests/s")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="airloop-serving-bench-"))
    os.environ.setdefault("AIRLOOP_HOME", str(work / "home"))
    model_dir = args.model_dir
    if model_dir is None:
        sys.path.insert(0, str(REPO))
        from tests.fakes.models import build_ir

        model_dir = build_ir(work / "ir", seed=1)

    predictor = {"name": "v1", "model_version": "1", "model_dir": str(model_dir.resolve()), "weight": 100}
    echo, echo_url = _echo()
    paths: dict[str, tuple[str, dict[str, Any]]] = {"echo": (echo_url, SELDON_BODY)}
    gateways: dict[str, int] = {}
    targets = {}
    try:
        for server in ("seldon", "mlserver"):
            targets[server] = LocalServingTarget(home=str(work / "serving"), server=server)
            state = targets[server].deploy(server, [predictor])
            port = state["predictors"]["v1"]["port"]
            direct = (
                (f"http://127.0.0.1:{port}/api/v1.0/predictions", SELDON_BODY)
                if server == "seldon"
                else (f"http://127.0.0.1:{port}/v2/models/{V2_MODEL}/infer", V2_BODY)
            )
            paths[f"{server} direct"] = direct
            paths[f"{server} gateway"] = (f"{state['endpoint']}/api/v1.0/predictions", SELDON_BODY)
            gateways[f"{server} gateway"] = state["gateway"]["pid"]
        latencies: dict[str, list[float]] = {k: [] for k in paths}
        rates: dict[str, list[float]] = {k: [] for k in paths}
        cpu = dict.fromkeys(gateways, 0.0)
        for _ in range(args.rounds):
            for name, (url, body) in paths.items():
                before = cpu_seconds(gateways[name]) if name in gateways else 0.0
                latencies[name] += sequential(url, body, args.requests)
                if name in gateways:
                    cpu[name] += cpu_seconds(gateways[name]) - before
                rates[name].append(throughput(url, body, args.requests, args.clients))
    finally:
        for server, target in targets.items():
            target.delete(server)
        echo.kill()

    print(
        f"{args.rounds} rounds x {args.requests} one-row requests; req/s with {args.clients} clients; "
        f"{os.cpu_count()} CPUs"
    )
    summary = {}
    for name in paths:
        summary[name] = (
            quantile(latencies[name], 0.5),
            quantile(latencies[name], 0.99),
            statistics.median(rates[name]),
        )
        p50, p99, rate = summary[name]
        line = f"{name:16s} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  {rate:7.0f} req/s"
        if name in cpu:  # sequential rounds only, with their 20 warm-up requests
            line += f"  gateway CPU {1e6 * cpu[name] / (args.rounds * (args.requests + 20)):.0f} us/request"
        print(line)
    seldon, mlserver = summary["seldon gateway"], summary["mlserver gateway"]
    print(
        "through the gateway, MLServer / Seldon's wrapper: "
        f"req/s x{mlserver[2] / seldon[2]:.2f} (target >= 2), "
        f"p99 x{mlserver[1] / seldon[1]:.2f} (target <= 1)"
    )
    for server in ("seldon", "mlserver"):
        added = summary[f"{server} gateway"][0] - summary[f"{server} direct"][0]
        print(f"the gateway adds at p50, {server}: {added:+.2f} ms (target <= 0.5 ms)")
    print(f"floor (bare ASGI echo): p50 {summary['echo'][0]:.2f} ms, {summary['echo'][2]:.0f} req/s")


if __name__ == "__main__":
    main()
