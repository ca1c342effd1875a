"""The reference loop on the production topology, run for real: ``airloop loop --production``.

PostgreSQL and Redis from Debian's packages (``make system``), moto's S3 server, an MLflow server on
PostgreSQL with its artefacts on S3, Airflow with the CeleryExecutor and two workers, each worker with its
own working directory and AIRLOOP_HOME. Skipped, naming what is missing, where a binary is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airloop import runtimes
from airloop.embedded import production

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.loop


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    missing = production.missing_binaries()
    if missing:
        pytest.skip(f"the production topology needs: {', '.join(missing)} (make system)")
    try:
        runtimes.python("serving")
    except runtimes.RuntimeMissingError as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("production")
    report = root / "report.json"
    env = {**os.environ, "AIRLOOP_HOME": str(root / "airloop")}
    for key in [k for k in env if k.startswith("AIRFLOW")]:
        del env[key]  # the harness configures its own Airflow
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "airloop"),
            "loop",
            "--production",
            "--dags",
            str(REPO / "dags"),
            "--rows",
            "3000",
            "--report",
            str(report),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    print(done.stdout[-6000:], done.stderr[-6000:])
    assert report.exists(), done.stderr[-3000:]
    return json.loads(report.read_text()), done.stdout, root / "airloop" / "production"


def test_loop_ends_with_a_new_champion(loop):
    report, stdout, _ = loop
    assert report["ok"], report
    assert report["topology"] == "production topology"
    assert "=== Airloop: reference loop on the production topology ===" in stdout
    assert report["champion"] == {"before": "1", "after": "2"}
    assert report["runs"]["retrain_turn"]["run_type"] == "asset_triggered"
    verdicts = report["verdicts"]
    assert verdicts["drift_control"]["verdict"] == "no_drift"
    assert verdicts["drift_after_shift"]["verdict"] == "drift"
    assert verdicts["retrain_turn"]["rollout"]["decision"] == "promoted"


def test_tasks_ran_on_both_celery_workers(loop):
    _, _, home = loop
    scheduler = (home / "services" / "airflow-scheduler.log").read_text()
    assert "CeleryExecutor" in scheduler
    for n in (1, 2):
        # Each worker keeps the logs of the tasks it ran under its own AIRFLOW_HOME.
        logs = list((home / "services" / f"worker-{n}" / "airflow" / "logs").rglob("*.log"))
        assert any("dag_id=airloop_" in str(path) for path in logs), f"worker-{n} ran no reference task"


def test_models_went_to_s3_through_the_mlflow_server(loop):
    _, _, home = loop
    mlflow = (home / "services" / "mlflow.log").read_text()
    s3 = (home / "services" / "s3.log").read_text()
    assert "/api/2.0/mlflow-artifacts/artifacts/" in mlflow  # clients upload through the server
    assert '"PUT /mlflow/' in s3  # which writes the objects to the mlflow bucket


def test_every_service_stopped(loop):
    _, _, home = loop
    left = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = (proc / "cwd").resolve()
        except OSError:
            continue
        if cwd.is_relative_to(home):
            left.append((proc.name, (proc / "cmdline").read_bytes().replace(b"\0", b" ")[:200]))
    assert not left, left
