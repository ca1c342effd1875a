"""Where the embedded default keeps its state. No Airflow import: steps and runtimes use this too.

Everything lives under one folder, ``AIRLOOP_HOME`` (default ``.airloop`` in the working directory),
so a laptop run is self-contained and removable with one ``rm -rf``.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("AIRLOOP_HOME", ".airloop")).resolve()


def artefact_root() -> str:
    """Base URI of the artefact store: a local folder by default, ``s3://bucket/prefix`` in production."""
    return os.environ.get("AIRLOOP_ARTEFACTS", (home() / "artefacts").as_uri())


def mlflow_tracking_uri() -> str:
    """The embedded MLflow: SQLite backend store, artefacts next to it."""
    return f"sqlite:///{home() / 'mlflow.db'}"


def mlflow_artifact_root() -> str:
    return (home() / "mlartifacts").as_uri()


def runtimes_dir() -> Path:
    return Path(os.environ.get("AIRLOOP_RUNTIMES", home() / "runtimes")).resolve()


def serving_dir() -> Path:
    return home() / "serving"


def feast_dir() -> Path:
    """The embedded Feast store: registry, SQLite online store and the reference feature data."""
    return home() / "feast"
