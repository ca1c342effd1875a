"""Test settings: everything under a throw-away AIRLOOP_HOME and AIRFLOW_HOME; no network."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Set before Airflow, MLflow or OpenVINO is imported anywhere in the test session.
_HOME = Path(tempfile.mkdtemp(prefix="airloop-tests-"))
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("AIRLOOP_HOME", str(_HOME / "airloop"))
# Tests reuse the runtimes the setup built instead of building their own (minutes each).
os.environ.setdefault("AIRLOOP_RUNTIMES", str(REPO / ".airloop" / "runtimes"))
os.environ["AIRFLOW_HOME"] = str(_HOME / "airflow")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["CI"] = "true"  # OpenVINO telemetry off
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An S3 API on 127.0.0.1 (moto's server) for the whole session: ``endpoint`` and a boto3 ``client``.

    The client has its own credentials, never set in the test process's environment; each test module
    makes its own bucket.
    """
    import boto3
    import httpx

    from airloop.ports import free_port

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "ab") as out:
        # A process group of its own, stopped as a whole.
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{endpoint}/moto-api/", timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.3)
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        yield {"endpoint": endpoint, "client": client}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
