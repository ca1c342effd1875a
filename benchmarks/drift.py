"""How long a drift check takes: 100k current rows x 20 features against a 10k-row reference.

Both backends, in the worker's process and across the runtime hop (a fresh process of the serving
runtime's interpreter calling the step by name, as ExternalPythonOperator does). The hop's cost is
printed apart from the check itself; the target is 2 s for a check including the hop.

    .venv/bin/python benchmarks/drift.py [--rows 100000] [--reference 10000] [--features 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from airloop import runtimes
from airloop.steps.drift import detect

TARGET_S = 2.0
# Runs in the runtime: times the imports and each check inside the process, for the hop's share.
_IN_RUNTIME = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
start = time.perf_counter()
from airloop.runtimes import call_step
import pandas, pyarrow.dataset, scipy.stats
request = json.loads(sys.argv[1])
if request["backend"] == "alibi":
    import alibi_detect.cd
imported = time.perf_counter()
call_step("airloop.steps.drift:detect", request)
print(json.dumps({"import_s": imported - start, "check_s": time.perf_counter() - imported}))
"""


def _data(folder: Path, rows: int, reference_rows: int, features: int) -> dict[str, str]:
    rng = np.random.default_rng(0)
    columns = [f"f{i}" for i in range(features)]
    reference = pd.DataFrame(rng.normal(size=(reference_rows, features)), columns=columns)
    current = pd.DataFrame(rng.normal(size=(rows, features)), columns=columns)
    current["f0"] += 0.05  # one feature drifts, so the verdict path with a flagged feature is timed too
    reference.to_parquet(folder / "reference.parquet")
    current.to_parquet(folder / "current.parquet")
    return {"reference_uri": str(folder / "reference.parquet"),
            "current_uri": str(folder / "current.parquet")}


def _best(repeat: int, call) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--reference", type=int, default=10_000)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "CI": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}
    os.environ.update(env)

    with tempfile.TemporaryDirectory(prefix="drift-bench-") as tmp:
        folder = Path(tmp)
        base = _data(folder, args.rows, args.reference, args.features)
        print(f"{args.rows} current rows x {args.features} features vs {args.reference} reference rows, "
              f"best of {args.repeat}")
        request = {**base, "backend": "scipy", "report_dir": str(folder / "report")}
        detect(request)  # warm: imports and file cache
        no_report = _best(args.repeat, lambda: detect({**base, "backend": "scipy"}))
        with_report = _best(args.repeat, lambda: detect(request))
        print(f"worker  scipy   check {no_report:6.3f} s   with report {with_report:6.3f} s "
              f"(report {with_report - no_report:.3f} s)")

        try:
            python = runtimes.python("serving")
        except runtimes.RuntimeMissingError as error:
            print(f"runtime hop not measured: {error}")
            return
        for backend in ("scipy", "alibi"):
            hop_request = json.dumps({**base, "backend": backend,
                                      "report_dir": str(folder / f"report-{backend}")})
            runs = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                done = subprocess.run([python, "-c", _IN_RUNTIME, hop_request], capture_output=True,
                                      text=True, env=env, check=False)
                wall = time.perf_counter() - start
                if done.returncode != 0:
                    print(f"runtime {backend}: failed: {done.stderr.strip().splitlines()[-1:]}")
                    break
                runs.append((wall, json.loads(done.stdout.strip().splitlines()[-1])))
            if not runs:
                continue
            wall, inside = min(runs, key=lambda run: run[0])
            hop = wall - inside["check_s"]
            print(f"runtime {backend:7} total {wall:6.3f} s = check {inside['check_s']:6.3f} s "
                  f"+ hop {hop:6.3f} s (of which imports {inside['import_s']:.3f} s); target {TARGET_S} s: "
                  f"{wall / TARGET_S:.2f}x the target")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
