"""Where the embedded default keeps its state. No Airflow import: steps and runtimes use this too.

Everything lives under one folder, ``AIRLOOP_HOME`` (default ``.airloop`` in the working directory),
so a laptop run is self-contained and removable with one ``rm -rf``.
"""

from __future__ import annotations

import os
from pathlib import Path

PROFILE_ENV = "AIRLOOP_PROFILE"
LICENCE_CLEAN = "licence-clean"
PROFILES = ("default", LICENCE_CLEAN)


def profile() -> str:
    """``AIRLOOP_PROFILE``: ``default``, or ``licence-clean`` (no Business-Source-licensed backend:
    MLServer or KServe for serving, SciPy for drift; docs/licences.md)."""
    name = os.environ.get(PROFILE_ENV) or "default"
    if name not in PROFILES:
        raise ValueError(f"{PROFILE_ENV}={name!r} is not a profile: choose one of {list(PROFILES)}")
    return name


def licence_clean() -> bool:
    return profile() == LICENCE_CLEAN


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
