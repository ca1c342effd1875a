"""Wall time of each rollout step on the local target, next to the analysis window it waits for.

Trains, converts and registers three versions of a model with the real steps (MLflow on SQLite in a
temporary AIRLOOP_HOME), deploys the first as champion, starts the embedded loop's simulated clients
(a second process) and rolls out the second as a canary (10 -> 25 -> 50 -> 100) and the third as a
shadow then a canary (shadow -> 50 -> 100). Prints, per step, its wall time, the analysis window
and the ratio of the two: what a step costs beyond the window (starting a model server, traffic
changes, waiting for enough data, promotion) is what the ratio shows.

    python benchmarks/rollout_steps.py [--window 5] [--rate 150]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CI", "true")  # OpenVINO telemetry off
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
REPO = Path(__file__).resolve().parents[1]
WORK = Path(tempfile.mkdtemp(prefix="airloop-rollout-bench-"))
os.environ.setdefault("AIRLOOP_RUNTIMES", str(REPO / ".airloop" / "runtimes"))
os.environ["AIRLOOP_HOME"] = str(WORK / "home")
sys.path.insert(0, str(REPO))  # the test helpers (tests.fakes), which test_rollout imports too

from rollout_helpers import rollout_tests, seconds  # noqa: E402

from airloop import artefacts  # noqa: E402
from airloop.embedded.demo import generate  # noqa: E402
from airloop.operators.rollout import RolloutChallengerOperator  # noqa: E402
from airloop.serving.base import get_target  # noqa: E402
from airloop.tables import write_table  # noqa: E402
from tests.fakes.context import task_context  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=5.0, help="analysis_seconds of each step")
    parser.add_argument("--rate", type=float, default=150.0, help="client requests per second, about")
    args = parser.parse_args()
    tests = rollout_tests()
    data = write_table(generate(800, seed=3), str(WORK / "train.parquet"))
    started = time.perf_counter()
    champion, canary, shadow = (tests.register_version(data, seed=seed) for seed in (1, 2, 3))
    print(f"3 versions trained, converted and registered in {time.perf_counter() - started:.1f} s")

    def operator(version: str, **kwargs: object) -> RolloutChallengerOperator:
        return RolloutChallengerOperator(
            task_id="rollout",
            model_name=tests.MODEL,
            version=version,
            deployment="bench",
            analysis_seconds=args.window,
            max_wait_seconds=120,
            poll_interval=0.5,
            **kwargs,
        )

    operator(champion).execute(task_context("rollout"))
    clients = tests.Clients(get_target("local").state("bench")["endpoint"], WORK, rate=args.rate)
    try:
        runs = [
            ("canary", operator(canary, steps=(10, 25, 50, 100))),
            ("shadow", operator(shadow, mode="shadow", steps=(50, 100), criteria={"min_agreement": 0.7})),
        ]
        print(
            f"analysis window {args.window:g} s; clients about {args.rate:g} requests/s; "
            f"{os.cpu_count()} CPUs"
        )
        print(f"{'rollout':8s} {'step':18s} {'wall s':>7s} {'window s':>9s} {'wall/window':>12s}")
        for name, rollout in runs:
            result = rollout.execute(task_context("rollout"))
            report = json.loads((artefacts.root() / rollout.report_path).read_text())
            steps = report["steps"]
            deploy = seconds(report["started"], steps[0]["started"])
            print(f"{name:8s} {'deploy challenger':18s} {deploy:7.2f}")
            for step in steps:
                label = f"{step['kind']} {step.get('mirror', step['weight'])}%"
                wall = seconds(step["started"], step.get("ended") or report["ended"])
                window = args.window if step["kind"] in ("canary", "shadow") else 0.0
                ratio = f"x{wall / window:.2f}" if window else ""
                print(f"{name:8s} {label:18s} {wall:7.2f} {window:9.2f} {ratio:>12s}")
            print(
                f"{name:8s} {'total':18s} {seconds(report['started'], report['ended']):7.2f}   "
                f"-> {result['decision']}"
            )
    finally:
        clients.stop()
        get_target("local").delete("bench")


if __name__ == "__main__":
    main()
