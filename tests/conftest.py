"""Test settings: everything under a throw-away AIRLOOP_HOME and AIRFLOW_HOME; no network."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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

SHARED_SCHEMAS = REPO.parent / "shared" / "schemas"
