"""``airloop loop``: a loop, end to end, on the embedded default.

The reference loop on generated data, or with ``--spec SPEC --data DATA --shift-by COLUMN`` a loop
spec's on the user's table (``airloop.embedded.worlds``):

1. a fresh state under AIRLOOP_HOME (the runtimes are kept); training data from the world (no shift);
2. Airflow (standalone: scheduler, triggerer, API server, SQLite) with the DAGs;
3. the loop's first turn makes the first champion and deploys it on the local serving target;
4. clients send traffic; the drift monitor finds no drift (the control);
5. the world shifts; the drift monitor finds drift and updates the loop's drift Asset, which schedules
   a retraining turn that rolls the challenger out step by step and promotes it (or stops it at a
   gate, with the verdict in the report);
6. a summary on the terminal and a JSON report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from airloop import runtimes, settings
from airloop.embedded.standalone import USERNAME, Standalone, airflow_env
from airloop.embedded.traffic import read_stats
from airloop.embedded.worlds import DemoWorld, TableWorld
from airloop.ports import free_port


def _say(message: str) -> None:
    print(f"[airloop {datetime.now():%H:%M:%S}] {message}", flush=True)


def _stop_serving() -> None:
    """Stop every deployment the local target runs from this home."""
    from airloop.serving.base import get_target

    folder = settings.serving_dir()
    for deployment in sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        get_target("local").delete(deployment)


def _fresh_home(home: Path) -> None:
    """Stop what a previous run left serving, then remove its state (keeping the built runtimes)."""
    _stop_serving()
    for child in home.glob("*") if home.exists() else []:
        if child.resolve() != settings.runtimes_dir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def _durations(airflow: Standalone, dag_id: str, run_id: str) -> dict[str, Any]:
    return {
        ti["task_id"]: {"state": ti["state"], "seconds": round(ti.get("duration") or 0.0, 1)}
        for ti in airflow.task_instances(dag_id, run_id)
    }


def _run(airflow: Standalone, dag_id: str, conf: dict[str, Any], timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    run_id = airflow.trigger(dag_id, conf)
    _say(f"{dag_id}: run {run_id} triggered")
    return _finished(airflow, dag_id, run_id, started, timeout)


def _finished(
    airflow: Standalone, dag_id: str, run_id: str, started: float, timeout: float
) -> dict[str, Any]:
    run = airflow.wait_for_run(dag_id, run_id, timeout)
    tasks = _durations(airflow, dag_id, run_id)
    _say(
        f"{dag_id}: {run['state']} in {time.monotonic() - started:.0f}s "
        + " ".join(f"{t}={v['state']}({v['seconds']}s)" for t, v in tasks.items())
    )
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "run_type": run["run_type"],
        "state": run["state"],
        "wall_seconds": round(time.monotonic() - started, 1),
        "tasks": tasks,
        "results": {t: airflow.xcom(dag_id, run_id, t) for t, v in tasks.items() if v["state"] == "success"},
    }


def _accuracy(stats: dict[str, Any], shift: str) -> dict[str, Any]:
    per_version = stats.get(shift, {})
    return {
        version: {**c, "accuracy": round(c["correct"] / max(c["requests"] - c["errors"], 1), 4)}
        for version, c in per_version.items()
    }


def _wait_traffic(stats_path: Path, shift: str, requests: int, timeout: float = 60.0) -> None:
    from airloop.serving.logs import FLUSH_INTERVAL_S

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(c["requests"] for c in read_stats(stats_path).get(shift, {}).values()) >= requests:
            # The monitor reads the gateway's request log, written in batches: wait for the last one.
            time.sleep(FLUSH_INTERVAL_S + 1)
            return
        time.sleep(0.5)
    raise TimeoutError(f"clients did not get {requests} answers in {timeout:.0f}s; see {stats_path}")


@dataclass(frozen=True)
class LabelLag:
    """How the simulated clients' labels come: for ``share`` of the answers, ``delay`` (low, high)
    seconds later; the rest never."""

    share: float = 1.0
    delay: tuple[float, float] = (0.0, 0.0)

    def args(self) -> list[str]:
        return ["--label-share", str(self.share), "--label-delay", f"{self.delay[0]}-{self.delay[1]}"]


def run_loop(
    dags: str,
    rows: int,
    report: str | None,
    keep_running: bool = False,
    topology: Callable[[Path, Path], Standalone] | None = None,
    world: DemoWorld | TableWorld | None = None,
    labels: LabelLag | None = None,
) -> int:
    """The loop of ``world`` (default: the reference loop's) on the embedded default, or on
    ``topology(home, dags)`` (``production.Production``), its clients' labels coming as ``labels``
    says (default: each with its answer)."""
    started = time.monotonic()
    world = world or DemoWorld(rows)
    labels = labels or LabelLag()
    loop_id, monitor_id, deployment = world.loop_dag_id, world.monitor_dag_id, world.deployment
    before, after = world.regimes
    home = settings.home()
    os.environ["AIRLOOP_HOME"] = str(home)  # absolute, for every process Airflow starts
    # Short canary windows: the simulated clients send enough requests in a few seconds.
    os.environ.setdefault("AIRLOOP_ANALYSIS_SECONDS", "4")
    dags_dir = Path(dags).resolve()
    stages: dict[str, float] = {}
    topology_name = getattr(topology, "NAME", "embedded default")
    title = "reference loop" if isinstance(world, DemoWorld) else f"loop {world.name}"
    summary: dict[str, Any] = {
        "home": str(home),
        "topology": topology_name,
        "loop": world.name,
        "title": title,
        "profile": settings.profile(),
        "labels": {"share": labels.share, "delay_seconds": list(labels.delay)},
        "runs": {},
    }
    from airloop.serving.local import SERVERS, LocalServingTarget

    # Fail now, with how to build it, rather than mid-loop: the model servers' runtime.
    runtimes.python(SERVERS[LocalServingTarget().server]["runtime"])
    _fresh_home(home)
    os.environ.update(world.prepare(home))
    world.enter(home, before)
    if topology is None:
        airflow = Standalone(airflow_env(home / "airflow", dags_dir, free_port()), home / "airflow.log")
    else:
        airflow = topology(home, dags_dir)
    traffic = None
    stats_path = home / "traffic.json"
    try:
        mark = time.monotonic()
        _say(f"starting Airflow at {airflow.url} (log: {home / 'airflow.log'})")
        airflow.start()
        _say(
            f"Airflow is up: log in as {USERNAME} with password {airflow.password} ({airflow.passwords_file})"
        )
        airflow.wait_for_dags([loop_id, monitor_id])
        for dag_id in (loop_id, monitor_id):
            airflow.unpause(dag_id)
        stages["airflow_start"] = time.monotonic() - mark

        mark = time.monotonic()
        first = summary["runs"]["first_turn"] = _run(airflow, loop_id, {}, timeout=300)
        stages["first_turn"] = time.monotonic() - mark
        if first["state"] != "success":
            raise RuntimeError(f"the first turn of {loop_id} failed: {first['tasks']}")

        from airloop.serving.base import get_target

        endpoint = get_target("local").state(deployment)["endpoint"]
        _say(f"clients start calling {endpoint}")
        traffic = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "airloop.embedded.traffic",
                "--endpoint",
                endpoint,
                "--control",
                str(home / "world.json"),
                "--stats",
                str(stats_path),
                *labels.args(),
            ],
            stdout=(home / "traffic.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        mark = time.monotonic()
        _wait_traffic(stats_path, before, 400)
        window = (time.monotonic() - mark) / 60 + 0.05
        control = summary["runs"]["drift_control"] = _run(
            airflow, monitor_id, {"window_minutes": window}, 180
        )
        stages["drift_control"] = time.monotonic() - mark

        mark = time.monotonic()
        _say("the world shifts: new data arrives, clients send shifted rows")
        world.enter(home, after)
        _wait_traffic(stats_path, after, 400)
        window = (time.monotonic() - mark) / 60
        known = {r["dag_run_id"] for r in airflow.runs(loop_id)}
        drift = summary["runs"]["drift_detected"] = _run(airflow, monitor_id, {"window_minutes": window}, 180)
        stages["drift_detection"] = time.monotonic() - mark

        second = None
        if drift["tasks"].get("decide", {}).get("state") == "success":
            mark = time.monotonic()
            retrain = airflow.wait_for_new_run(loop_id, "asset_triggered", known, timeout=60)
            _say(f"{loop_id}: {retrain['dag_run_id']} scheduled by the drift Asset")
            second = summary["runs"]["retrain_turn"] = _finished(
                airflow, loop_id, retrain["dag_run_id"], mark, 420
            )
            stages["retrain_turn"] = time.monotonic() - mark

        stats = read_stats(stats_path)
        summary["accuracy"] = {
            "before_shift": _accuracy(stats, before),
            "after_shift": _accuracy(stats, after),
        }
        summary["verdicts"] = _verdicts(first, control, drift, second)
        summary["champion"] = {
            "before": first["results"].get("register", {}).get("version"),
            "after": _champion(world.name),
        }
        summary["serving"] = get_target("local").state(deployment)
        summary["outcome"], reached = _outcome(drift, second)
        promoted = summary["champion"]["after"] != summary["champion"]["before"]
        # The demo world's shift is made to be won; on the user's data, a gate may rightly stop it.
        ok = promoted if isinstance(world, DemoWorld) else reached
    finally:
        if traffic:
            traffic.terminate()
            traffic.wait(timeout=30)
        if not keep_running:
            airflow.stop()
            _stop_serving()
    summary["stages_seconds"] = {k: round(v, 1) for k, v in stages.items()}
    summary["wall_seconds"] = round(time.monotonic() - started, 1)
    summary["ok"] = ok
    path = Path(report) if report else home / "report.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    _print_summary(summary, path)
    if keep_running and airflow.process:
        print(
            f"Airflow keeps running at {airflow.url} (log in as {USERNAME} with password {airflow.password});"
            f" stop it with: kill -INT -- -{airflow.process.pid}"
        )
    return 0 if ok else 1


def _outcome(drift: dict[str, Any], second: dict[str, Any] | None) -> tuple[str, bool]:
    """What the retraining turn came to, and whether the loop reached a verdict: a rollout's decision,
    or a gate that stopped the challenger with its reason."""
    if second is None:
        found = drift["results"].get("detect") or {}
        return (
            f"no retrain requested: drift verdict {found.get('verdict')}, severity {found.get('severity')},"
            f" {found.get('n_effective', found.get('n_current'))} distinct rows in the window",
            False,
        )
    rollout = second["results"].get("rollout")
    if rollout:
        return f"rollout {rollout['decision']}", True
    failed = [task for task, ran in second["tasks"].items() if ran["state"] == "failed"]
    trained = second["results"].get("train") or {}
    if failed == ["evaluate"] and trained.get("run_id"):
        verdict = _evaluation(trained["run_id"])
        return f"the offline gate kept the champion: {verdict['rule']}: {verdict['reason']}", True
    return f"failed at {', '.join(failed) or second['state']}", False


def _evaluation(run_id: str) -> dict[str, Any]:
    import tempfile

    import mlflow

    from airloop.hooks.mlflow import MlflowHook

    with tempfile.TemporaryDirectory() as tmp:
        client = mlflow.MlflowClient(MlflowHook().tracking_uri)
        found: dict[str, Any] = json.loads(
            Path(client.download_artifacts(run_id, "evaluation.json", tmp)).read_text()
        )
        return found


def _champion(model_name: str) -> str | None:
    from airloop.hooks.mlflow import MlflowHook
    from airloop.tracking.registry import aliases

    # The tasks' MLflow: the mlflow_default connection, else the embedded one.
    return aliases(MlflowHook().tracking_uri, model_name).get("champion")


def _verdicts(first: dict, control: dict, drift: dict, second: dict | None) -> dict[str, Any]:
    def result(run: dict, task: str, *keys: str) -> Any:
        value = run["results"].get(task) or {}
        return {k: value.get(k) for k in keys} if value else run["tasks"].get(task, {}).get("state")

    return {
        "first_turn": {
            "validation": result(first, "validate", "success", "evaluated"),
            "evaluation": result(first, "evaluate", "verdict", "rule"),
            "parity": (first["results"].get("convert") or {}).get("parity"),
            "rollout": result(first, "rollout", "decision"),
        },
        "drift_control": result(control, "detect", "verdict", "severity", "n_current"),
        "drift_after_shift": result(
            drift, "detect", "verdict", "severity", "drifted_features", "n_current", "n_effective"
        ),
        "retrain_requested": drift["tasks"].get("decide", {}).get("state"),
        "retrain_turn": second
        and {
            "trigger": second["run_type"],
            "validation": result(second, "validate", "success", "evaluated"),
            "evaluation": result(second, "evaluate", "verdict", "rule", "difference", "p_value", "earlier"),
            "parity": (second["results"].get("convert") or {}).get("parity"),
            "rollout": result(second, "rollout", "decision", "steps"),
        },
    }


def _print_summary(summary: dict[str, Any], path: Path) -> None:
    print(f"\n=== Airloop: {summary['title']} on the {summary['topology']} ===")
    for name, run in summary["runs"].items():
        tasks = ", ".join(f"{t} {v['seconds']}s" for t, v in run["tasks"].items())
        print(f"{name:16} {run['dag_id']:22} {run['state']:8} {run['wall_seconds']:6.1f}s  ({tasks})")
    for stage, seconds in summary["stages_seconds"].items():
        print(f"stage {stage:24} {seconds:6.1f}s")
    print("verdicts:", json.dumps(summary.get("verdicts"), indent=1, default=str))
    print("accuracy (live, from client feedback):", json.dumps(summary.get("accuracy"), default=str))
    champion = summary.get("champion", {})
    print(f"champion: v{champion.get('before')} -> v{champion.get('after')}; {summary.get('outcome')}")
    print(f"total {summary['wall_seconds']:.1f}s, {'OK' if summary['ok'] else 'FAILED'}; report: {path}")
