"""Time from a bad challenger's first request to its rollback, with labels that come with the answer and
with labels that come late; and the error of the CBPE estimate against the realized accuracy.

Trains, converts and registers a champion and two bad challengers of the reference model with the real
steps (MLflow on SQLite in a temporary AIRLOOP_HOME), deploys the champion on the local target and
starts the embedded loop's simulated clients (a second process), once per label setting:

- ``inverted``: trained on inverted labels, confident and wrong: only labels can tell;
- ``unsure``: trained on shuffled labels, unsure of every answer: the estimate tells first.

Each is rolled out as a canary (50 -> 100, windows of ``--window`` s, ``on_inconclusive="extend"``), and
the time from its first window opening (its first request) to the end of its rollback is printed per
label setting, with how the rollback was decided. Then the champion's CBPE estimate over everything it
answered with every label in is set against its realized accuracy.

    python benchmarks/label_lag.py [--window 2] [--rate 150] [--lag 2-30] [--share 0.6]
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
WORK = Path(tempfile.mkdtemp(prefix="airloop-label-lag-bench-"))
os.environ.setdefault("AIRLOOP_RUNTIMES", str(REPO / ".airloop" / "runtimes"))
os.environ["AIRLOOP_HOME"] = str(WORK / "home")
sys.path.insert(0, str(REPO))  # the test helpers (tests.fakes), which test_rollout imports too

from airflow.sdk.exceptions import AirflowFailException  # noqa: E402
from rollout_helpers import rollout_tests, seconds  # noqa: E402

from airloop import artefacts, runtimes  # noqa: E402
from airloop.embedded.demo import generate  # noqa: E402
from airloop.hooks.mlflow import MlflowHook  # noqa: E402
from airloop.operators.performance import RUNTIME, STEP, measure  # noqa: E402
from airloop.operators.rollout import RolloutChallengerOperator  # noqa: E402
from airloop.serving.base import get_target  # noqa: E402
from airloop.tables import write_table  # noqa: E402
from tests.fakes.context import task_context  # noqa: E402

MODEL, DEPLOYMENT = "label-lag-bench", "label-lag-bench"


def _decided_by(step: dict) -> str:
    failed = [name for name, test in (step.get("tests") or {}).items() if test.get("status") == "fail"]
    return ", ".join(failed) or step["verdict"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=2.0, help="analysis_seconds of each window")
    parser.add_argument("--rate", type=float, default=150.0, help="client requests per second, about")
    parser.add_argument("--lag", default="2-30", help="LOW-HIGH seconds until a late label comes")
    parser.add_argument("--share", type=float, default=0.6, help="share of answers whose late label comes")
    args = parser.parse_args()
    tests = rollout_tests()
    good = generate(1600, seed=3)
    shuffled = good.assign(label=good["label"].sample(frac=1.0, random_state=0).to_numpy())
    started = time.perf_counter()
    champion = tests.register_version(write_table(good, str(WORK / "good.parquet")), 1, MODEL)
    bad = {
        "inverted": tests.register_version(
            write_table(good.assign(label=1 - good["label"]), str(WORK / "inverted.parquet")), 2, MODEL
        ),
        "unsure": tests.register_version(write_table(shuffled, str(WORK / "shuffled.parquet")), 3, MODEL),
    }
    print(f"3 versions trained, converted and registered in {time.perf_counter() - started:.1f} s")
    runtimes.python(RUNTIME)  # the early warning's runtime: fail now rather than silently without it

    def operator(version: str) -> RolloutChallengerOperator:
        return RolloutChallengerOperator(
            task_id="rollout",
            model_name=MODEL,
            version=version,
            deployment=DEPLOYMENT,
            steps=(50, 100),
            analysis_seconds=args.window,
            max_wait_seconds=args.window,
            poll_interval=0.5,
            criteria={"min_requests": 30, "min_feedback": 30, "alpha": 0.001},
            on_inconclusive="extend",
            max_extensions=200,
            allow_rejected=True,  # the same bad version, once per label setting
        )

    operator(champion).execute(task_context("rollout"))
    late = ["--label-share", str(args.share), "--label-delay", args.lag]
    settings = [
        ("with the answer", ["--label-share", "1", "--label-delay", "0"]),
        (f"{args.share:.0%} late, {args.lag} s", late),
    ]
    print(f"windows of {args.window:g} s; clients about {args.rate:g} requests/s; {os.cpu_count()} CPUs")
    print(
        f"{'labels':22s} {'challenger':10s} {'first request -> rolled back, s':>31s} "
        f"{'windows':>8s}  decided by"
    )
    endpoint = get_target("local").state(DEPLOYMENT)["endpoint"]
    try:
        for index, (name, labels) in enumerate(settings):
            folder = WORK / f"clients-{index}"
            folder.mkdir()
            since = time.time()
            clients = tests.Clients(endpoint, folder, rate=args.rate, labels=labels)
            try:
                for kind, version in bad.items():
                    _roll_out(operator(version), name, kind)
                if index == 0:
                    _cbpe_error(champion, since)
            finally:
                clients.stop()
    finally:
        get_target("local").delete(DEPLOYMENT)


def _roll_out(rollout: RolloutChallengerOperator, labels: str, kind: str) -> None:
    try:
        rollout.execute(task_context("rollout"))
        outcome = "promoted (!)"
    except AirflowFailException:
        outcome = "rolled back"
    report = json.loads((artefacts.root() / rollout.report_path).read_text())
    steps = [s for s in report["steps"] if s["kind"] == "canary"]
    took = seconds(steps[0]["started"], report["ended"])
    print(f"{labels:22s} {kind:10s} {took:31.1f} {len(steps):8d}  {_decided_by(steps[-1])} ({outcome})")


def _cbpe_error(champion: str, since: float) -> None:
    """The champion's estimate over every answer since ``since`` against its realized accuracy."""
    time.sleep(6)  # the gateway writes its request log every 5 s
    _, result = measure(MlflowHook(), MODEL, DEPLOYMENT, since, _hop, monitored=champion)
    numbers = result["versions"][champion]
    print(
        f"champion v{champion}, every label in: CBPE {numbers['estimated_accuracy']:.4f} "
        f"(+/- {numbers['sampling_error']:.4f}) vs realized {numbers['realized_accuracy']:.4f} on "
        f"{numbers['labelled']} of {numbers['rows']} rows: error "
        f"{numbers['estimated_accuracy'] - numbers['realized_accuracy']:+.4f}"
    )


def _hop(request: dict) -> dict:
    """The monitoring step in its runtime, as the operators run it."""
    import subprocess

    path = WORK / "request.json"
    path.write_text(json.dumps(request))
    code = (
        "import json, sys; from airloop.runtimes import call_step; "
        f"print(json.dumps(call_step({STEP!r}, json.load(open(sys.argv[1])))))"
    )
    out = subprocess.run([runtimes.python(RUNTIME), "-c", code, str(path)], check=True, capture_output=True)
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


if __name__ == "__main__":
    main()
