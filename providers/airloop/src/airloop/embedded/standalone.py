"""A private Airflow for the embedded default: ``airflow standalone`` on SQLite, driven over its REST API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"success", "failed"}


def airflow_env(home: Path, dags: Path, port: int) -> dict[str, str]:
    """Settings for a laptop: SQLite, LocalExecutor with few workers, loopback only, no login.

    No plugins folder: the Airloop pages come with the installed provider.
    """
    return {
        **os.environ,
        # standalone starts its components as `airflow ...` from the PATH: this environment's.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # The default (32) forks 32 workers; 2 cores gain nothing past a few.
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        # Bound to loopback for one user: the runner and the browser need no password.
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


class Standalone:
    """``airflow standalone`` in its own process group; stopped with SIGINT (SIGTERM orphans children)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.url = env["AIRFLOW__API__BASE_URL"]
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.http = httpx.Client(base_url=f"{self.url}/api/v2", timeout=30.0)

    def start(self, timeout: float = 240.0) -> None:
        airflow = str(Path(sys.executable).parent / "airflow")
        subprocess.run([airflow, "db", "migrate"], env=self.env, check=True, capture_output=True)
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [airflow, "standalone"],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"airflow standalone exited ({self.process.returncode}); see {self.log_path}"
                )
            try:
                health = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=2.0).json()
                if all(health.get(c, {}).get("status") == "healthy" for c in ("metadatabase", "scheduler")):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"Airflow did not become healthy in {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.http.close()

    # -- REST API ------------------------------------------------------------------------------

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        answer = self.http.request(method, path, **kwargs)
        answer.raise_for_status()
        return answer.json()

    def wait_for_dags(self, dag_ids: list[str], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            errors = self._json("GET", "/importErrors")["import_errors"]
            if errors:
                raise RuntimeError(
                    "DAG import errors:\n" + "\n".join(f"{e['filename']}: {e['stack_trace']}" for e in errors)
                )
            if all(self.http.get(f"/dags/{dag_id}").status_code == 200 for dag_id in dag_ids):
                return
            time.sleep(1.0)
        raise TimeoutError(f"DAGs {dag_ids} were not parsed in {timeout:.0f}s")

    def unpause(self, dag_id: str) -> None:
        self._json("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        run = self._json("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/dags/{dag_id}/dagRuns", params={"order_by": "-run_after"})["dag_runs"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self._json("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in TERMINAL:
                return run
            time.sleep(1.0)
        raise TimeoutError(f"{dag_id} run {run_id} did not finish in {timeout:.0f}s")

    def wait_for_new_run(self, dag_id: str, run_type: str, known: set[str], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for run in self.runs(dag_id):
                if run["run_type"] == run_type and run["dag_run_id"] not in known:
                    return run
            time.sleep(1.0)
        raise TimeoutError(f"no new {run_type} run of {dag_id} within {timeout:.0f}s")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> Any:
        answer = self.http.get(
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
            params={"deserialize": True},
        )
        return answer.json().get("value") if answer.status_code == 200 else None
