"""How long a drift check takes, and how often it raises a false alarm.

Speed: 100k current rows x 20 features against a 10k-row reference, both backends, in the worker's
process and across the runtime hop as the operator makes it (``airloop.runtimes.run_step``: Airflow's
ExternalPythonOperator starting the serving runtime's interpreter). The hop's cost is printed apart
from the check itself; the target is 2 s for a check including the hop. A bare interpreter start of
the runtime, timed in the same run, shows how loaded the machine was; so does the CPU time of each hop
(all its processes and threads), which the load sways much less than the clock.

False alarms: the no-shift control over many windows (each a fresh reference and window from the same
distribution), the share of windows judged ``drift`` against ``p_val`` (per window, after correction).

    .venv/bin/python benchmarks/drift.py [--rows 100000] [--reference 10000] [--features 20] [--repeat 3]
                                         [--windows 1000] [--runtime-windows 200]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from airloop import runtimes
from airloop.steps.drift import detect as drift

TARGET_S = 2.0
P_VAL = 0.05
# The step the timed hops run, from a module of its own on the runtime's path: it notes when the
# runtime's interpreter reaches it, when the libraries every check needs are imported, and when the
# check is done (the clocks of both processes are the same), with the CPU time the process had used
# by then, so one real hop splits into its parts.
_TIMED_STEP = """
import resource, time


def _mark():
    used = resource.getrusage(resource.RUSAGE_SELF)
    return time.time(), used.ru_utime + used.ru_stime


def detect(request, whole_package=False):
    entered = _mark()
    import pandas, pyarrow.dataset, scipy.stats
    if whole_package:  # what a plain ``import alibi_detect`` costs, for comparison
        import alibi_detect
    if request["backend"] == "alibi":
        from airloop.steps.drift.alibi import _detector
        _detector("ks", "KSDrift"), _detector("chisquare", "ChiSquareDrift")
    imported = _mark()
    from airloop.steps.drift.detect import detect
    detect(request)
    return {"entered": entered, "imported": imported, "checked": _mark()}


def detect_whole_package(request):
    return detect(request, whole_package=True)
"""


def _data(folder: Path, rows: int, reference_rows: int, features: int) -> dict[str, str]:
    rng = np.random.default_rng(0)
    columns = [f"f{i}" for i in range(features)]
    reference = pd.DataFrame(rng.normal(size=(reference_rows, features)), columns=columns)
    current = pd.DataFrame(rng.normal(size=(rows, features)), columns=columns)
    current["f0"] += 0.05  # one feature drifts, so the verdict path with a flagged feature is timed too
    reference.to_parquet(folder / "reference.parquet")
    current.to_parquet(folder / "current.parquet")
    return {
        "reference_uri": str(folder / "reference.parquet"),
        "current_uri": str(folder / "current.parquet"),
    }


def _best(repeat: int, call) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def _cpu() -> float:
    """CPU seconds used so far by this process and its finished children (the runtime hops)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def speed(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="drift-bench-") as tmp:
        folder = Path(tmp)
        base = _data(folder, args.rows, args.reference, args.features)
        print(
            f"{args.rows} current rows x {args.features} features vs {args.reference} reference rows, "
            f"best of {args.repeat}"
        )
        request = {**base, "backend": "scipy", "report_dir": str(folder / "report")}
        drift.detect(request)  # warm: imports and file cache
        no_report = _best(args.repeat, lambda: drift.detect({**base, "backend": "scipy"}))
        with_report = _best(args.repeat, lambda: drift.detect(request))
        print(
            f"worker  scipy   check {no_report:6.3f} s   with report {with_report:6.3f} s "
            f"(report {with_report - no_report:.3f} s)"
        )

        try:
            python = runtimes.python("serving")
        except runtimes.RuntimeMissingError as error:
            print(f"runtime hop not measured: {error}")
            return
        bare = _best(args.repeat, lambda: subprocess.run([python, "-c", "pass"], check=True))
        print(f"runtime bare interpreter start {bare:.3f} s (the machine's load, for reading the rest)")
        (folder / "drift_timed_step.py").write_text(_TIMED_STEP)
        os.environ["PYTHONPATH"] = str(folder)  # the hop's interpreter inherits the environment
        context = {"ti": SimpleNamespace(bundle_instance=None)}
        totals = {}
        for backend, step, label in (
            ("scipy", "detect", "scipy"),
            ("alibi", "detect", "alibi"),
            ("alibi", "detect_whole_package", "alibi with `import alibi_detect`"),
        ):
            hop_request = {**base, "backend": backend, "report_dir": str(folder / f"report-{backend}")}
            hops = []
            for _ in range(args.repeat):
                start, cpu = time.time(), _cpu()
                marks = runtimes.run_step(
                    f"drift_timed_step:{step}",
                    hop_request,
                    runtime="serving",
                    context=context,
                    task_id="bench",
                )
                hops.append({**marks, "start": start, "end": time.time(), "cpu": _cpu() - cpu})
            hop = min(hops, key=lambda hop: hop["end"] - hop["start"])
            (entered, entered_cpu), (imported, imported_cpu), (checked, checked_cpu) = (
                hop["entered"],
                hop["imported"],
                hop["checked"],
            )
            total, check = hop["end"] - hop["start"], checked - imported
            totals[step if backend == "alibi" else backend] = total
            print(
                f"runtime {label}\n  total {total:6.3f} s = check {check:6.3f} s "
                f"+ hop {total - check:6.3f} s (start and ExternalPythonOperator "
                f"{entered - hop['start']:.3f} s, imports {imported - entered:.3f} s, "
                f"result and exit {hop['end'] - checked:.3f} s); "
                f"{total / TARGET_S:.2f}x the {TARGET_S} s target"
            )
            # CPU time, less swayed by the machine's load than the clock: what the hop would take alone.
            check_cpu, imports_cpu = checked_cpu - imported_cpu, imported_cpu - entered_cpu
            print(
                f"  CPU   {hop['cpu']:6.3f} s = check {check_cpu:6.3f} s (all threads) + imports "
                f"{imports_cpu:.3f} s + interpreter start, probes, ExternalPythonOperator and exit "
                f"{hop['cpu'] - check_cpu - imports_cpu:.3f} s"
            )
        print(
            f"alibi: loading only the detector modules makes the whole check "
            f"{totals['detect_whole_package'] / totals['detect']:.2f}x faster than `import alibi_detect`"
        )


def _window_pair(rng: np.random.Generator, reference_rows: int, rows: int) -> tuple[pd.DataFrame, ...]:
    """8 normal features, a 3-category one and a boolean one; both sides from the same distribution."""

    def frame(n: int) -> pd.DataFrame:
        table = pd.DataFrame(rng.normal(size=(n, 8)), columns=[f"x{i}" for i in range(8)])
        table["colour"] = rng.choice(["red", "green", "blue"], n, p=[0.5, 0.3, 0.2])
        table["flag"] = rng.random(n) < 0.3
        return table

    return frame(reference_rows), frame(rows)


def false_alarms(backend: str, windows: int) -> dict[str, float]:
    """Share of no-shift windows judged drift, per correction (the same p-values corrected two ways)."""
    rng = np.random.default_rng(2024)
    alarms = {"bonferroni": 0, "fdr": 0}
    for _ in range(windows):
        reference, current = _window_pair(rng, 2000, 500)
        scores = (
            drift.get(backend)(p_val=P_VAL, categorical=["colour", "flag"], min_rows=200)
            .fit(reference)
            .score(current)
        )
        p_values = [score["p_value"] for score in scores.values()]
        for correction in alarms:
            alarms[correction] += any(drift.flag(p_values, P_VAL, correction))
    return {correction: count / windows for correction, count in alarms.items()}


def _report_false_alarms(backend: str, where: str, rates: dict[str, float], windows: int) -> None:
    for correction, rate in rates.items():
        # Normal approximation to the binomial: enough for a few hundred windows.
        half = 1.96 * math.sqrt(max(rate * (1 - rate), 1e-12) / windows)
        print(
            f"false alarms {backend:5} ({where}, {correction:10}): {rate:.3f} of {windows} windows "
            f"(95% interval {max(rate - half, 0):.3f}-{rate + half:.3f}) vs p_val {P_VAL}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--reference", type=int, default=10_000)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--windows", type=int, default=1000, help="no-shift windows, scipy in the worker")
    parser.add_argument(
        "--runtime-windows", type=int, default=200, help="no-shift windows, alibi in the runtime"
    )
    parser.add_argument("--false-alarms-of", help=argparse.SUPPRESS)  # the run inside the runtime
    args = parser.parse_args()
    if args.false_alarms_of:
        print(json.dumps(false_alarms(args.false_alarms_of, args.runtime_windows)))
        return
    # Airflow is imported later, by the first hop: quiet its per-hop INFO lines.
    os.environ.update(
        {"CI": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING"}
    )

    speed(args)
    if args.windows:
        _report_false_alarms("scipy", "worker", false_alarms("scipy", args.windows), args.windows)
    if args.runtime_windows:
        try:
            python = runtimes.python("serving")
        except runtimes.RuntimeMissingError as error:
            print(f"alibi false alarms not measured: {error}")
        else:
            done = subprocess.run(
                [
                    python,
                    __file__,
                    "--false-alarms-of",
                    "alibi",
                    "--runtime-windows",
                    str(args.runtime_windows),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rates = json.loads(done.stdout.strip().splitlines()[-1])
            _report_false_alarms("alibi", "runtime", rates, args.runtime_windows)
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores, "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()
