"""Parse time of ``dags/airloop_loops.py`` with 1 and with N loop specs (target: 20 specs <= 0.5 s).

Each trial is a fresh interpreter that imports Airflow and the provider's operators first (a DAG
processor has them loaded), then times what parsing the file costs: ``DagBag`` on that one file.
The reference DAG ``dags/airloop_loop.py`` (one hand-written loop) is timed the same way alongside,
so the ratio per loop shows what a spec costs over a DAG file.

    python benchmarks/loop_specs.py [--specs 20] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TRIAL = """
import json, sys, time
import airflow.sdk, airloop.loops.dags  # what a DAG processor has imported already
from airflow.dag_processing.dagbag import DagBag
started = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
seconds = time.perf_counter() - started
assert not bag.import_errors, bag.import_errors
tasks = sum(len(d.tasks) for d in bag.dags.values())
print(json.dumps({"seconds": seconds, "dags": len(bag.dag_ids), "tasks": tasks}))
"""


def _spec(index: int) -> dict:
    return {
        "name": f"loop-{index:02d}",
        "data": {"uri": f"s3://lake/loop-{index:02d}/", "window": "latest:3"},
        "label": "label",
        "keys": ["id"],
        "model": {
            "estimator": "sklearn.ensemble.RandomForestClassifier",
            "params": {"n_estimators": 100},
            **({"candidates": [{"max_depth": 6}, {"max_depth": 12}]} if index % 2 else {}),
        },
        "suite": "suite.json",
        "rollout": {"steps": [10, 50, 100], "approval": bool(index % 3 == 0)},
        "drift": {"schedule": "@hourly"},
    }


def _trial(path: Path, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", TRIAL, str(path)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--specs", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="airloop-specs-bench-"))
    env = {**os.environ, "AIRFLOW_HOME": str(work / "airflow"), "AIRLOOP_HOME": str(work / "home")}
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    rows = []
    for count in (1, args.specs):
        folder = work / f"specs-{count}"
        folder.mkdir()
        for index in range(count):
            (folder / f"loop-{index:02d}.yaml").write_text(yaml.safe_dump(_spec(index)))
        specs_env = {**env, "AIRLOOP_LOOPS_DIR": str(folder)}
        trials = [_trial(REPO / "dags" / "airloop_loops.py", specs_env) for _ in range(args.repeat)]
        rows.append((f"airloop_loops.py, {count} spec(s)", count, trials))
    reference = [_trial(REPO / "dags" / "airloop_loop.py", env) for _ in range(args.repeat)]
    rows.append(("airloop_loop.py (reference)", 1, reference))
    print(f"median of {args.repeat} fresh processes each; CPU: {os.cpu_count()} cores")
    per_reference = statistics.median(t["seconds"] for t in reference)
    for label, loops, trials in rows:
        seconds = statistics.median(t["seconds"] for t in trials)
        print(
            f"{label:34} {seconds:6.3f} s  {trials[0]['dags']:3} DAGs {trials[0]['tasks']:4} tasks"
            f"  {seconds / loops / per_reference:5.2f} x the reference DAG file per loop"
        )
    twenty = statistics.median(t["seconds"] for t in rows[1][2])
    print(f"{args.specs} specs: {twenty:.3f} s against the 0.5 s target ({twenty / 0.5:.2f} of it)")


if __name__ == "__main__":
    main()
