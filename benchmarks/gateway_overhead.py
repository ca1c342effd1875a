"""What the local gateway adds on top of calling a Seldon model server directly.

Deploys one predictor with the local serving target, then sends the same one-row requests to the
model server and through the gateway, in alternating rounds (so background load hits both alike),
and prints p50 / p99 latency, requests per second and the ratios, and the gateway's CPU time per
request (from /proc: unlike latency, it hardly moves with the machine's other load).

    python benchmarks/gateway_overhead.py [--model-dir IR_DIR] [--requests 1000] [--rounds 3]

Without ``--model-dir`` it builds the integration tests' small MLP IR (``tests.fakes.models``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("CI", "true")  # OpenVINO telemetry off
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("AIRLOOP_RUNTIMES", str(REPO / ".airloop" / "runtimes"))

import httpx  # noqa: E402

from airloop.serving.local import LocalServingTarget  # noqa: E402

BODY = {"data": {"names": ["f0", "f1", "f2", "f3"], "ndarray": [[0.5, -1.0, 2.0, 0.1]]}}


def sequential(url: str, n: int) -> list[float]:
    """Latencies (ms) of n back-to-back requests over one keep-alive connection."""
    with httpx.Client(trust_env=False) as client:
        for _ in range(20):
            client.post(url, json=BODY)
        latencies = []
        for _ in range(n):
            start = time.perf_counter()
            answer = client.post(url, json=BODY)
            latencies.append((time.perf_counter() - start) * 1e3)
            answer.raise_for_status()
    return latencies


def throughput(url: str, n: int, clients: int) -> float:
    """Requests per second with ``clients`` concurrent senders."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: sequential(url, n // clients), range(clients)))
    return n / (time.perf_counter() - start)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="an OpenVINO IR folder with manifest.json")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4, help="concurrent senders for requests/s")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="airloop-bench-"))
    os.environ.setdefault("AIRLOOP_HOME", str(work / "home"))
    model_dir = args.model_dir
    if model_dir is None:
        sys.path.insert(0, str(REPO))
        from tests.fakes.models import build_ir

        model_dir = build_ir(work / "ir", seed=1)

    target = LocalServingTarget(home=str(work / "serving"))
    predictor = {"name": "v1", "model_version": "1", "model_dir": str(model_dir.resolve()), "weight": 100}
    state = target.deploy("bench", [predictor])
    urls = {
        "direct": f"http://127.0.0.1:{state['predictors']['v1']['port']}/api/v1.0/predictions",
        "gateway": f"{state['endpoint']}/api/v1.0/predictions",
    }
    try:
        latencies: dict[str, list[float]] = {k: [] for k in urls}
        rates: dict[str, list[float]] = {k: [] for k in urls}
        gateway_cpu = 0.0
        for _ in range(args.rounds):
            for kind, url in urls.items():
                before = cpu_seconds(state["gateway"]["pid"])
                latencies[kind] += sequential(url, args.requests)
                if kind == "gateway":
                    gateway_cpu += cpu_seconds(state["gateway"]["pid"]) - before
                rates[kind].append(throughput(url, args.requests, args.clients))
    finally:
        target.delete("bench")

    print(
        f"{args.rounds} rounds x {args.requests} one-row requests; req/s with {args.clients} clients; "
        f"{os.cpu_count()} CPUs"
    )
    summary = {}
    for kind in urls:
        summary[kind] = (
            quantile(latencies[kind], 0.5),
            quantile(latencies[kind], 0.99),
            statistics.median(rates[kind]),
        )
        print(
            f"{kind:8s} p50 {summary[kind][0]:6.2f} ms  p99 {summary[kind][1]:6.2f} ms  "
            f"{summary[kind][2]:7.0f} req/s"
        )
    (d50, d99, drate), (g50, g99, grate) = summary["direct"], summary["gateway"]
    print(
        f"gateway/direct: p50 x{g50 / d50:.2f} (+{g50 - d50:.2f} ms), p99 x{g99 / d99:.2f}, "
        f"req/s x{grate / drate:.2f}"
    )
    # Sequential rounds only; includes the 20 warm-up requests of each round.
    print(f"gateway CPU {1e6 * gateway_cpu / (args.rounds * (args.requests + 20)):.0f} us per request")


if __name__ == "__main__":
    main()
