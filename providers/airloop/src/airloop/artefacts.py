"""The artefact store seen from Airflow: where tasks put data sets, reports and request logs.

Its root is ``AIRLOOP_ARTEFACTS`` (a local folder by default, ``s3://bucket/prefix`` in production),
opened with Airflow's ObjectStoragePath so any fsspec filesystem with an Airflow connection works
(``AIRLOOP_ARTEFACTS_CONN_ID``, e.g. an ``aws`` connection for S3). Steps work on local folders;
``staging`` hands them one and publishes its content when the root is remote.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from airloop import settings


def root():
    from airflow.sdk import ObjectStoragePath

    return ObjectStoragePath(settings.artefact_root(), conn_id=os.environ.get("AIRLOOP_ARTEFACTS_CONN_ID"))


def is_local() -> bool:
    return settings.artefact_root().startswith("file://")


def local_path(relative: str) -> Path:
    """The local folder behind ``relative`` when the store is local."""
    return Path(settings.artefact_root().removeprefix("file://")) / relative


def task_prefix(context: Any, kind: str) -> str:
    """``<kind>/<dag_id>/<run_id>/<task_id>[-<map_index>]``: one folder per task instance."""
    ti = context["ti"]
    suffix = f"-{ti.map_index}" if getattr(ti, "map_index", -1) >= 0 else ""
    run_id = ti.run_id.replace(":", "_").replace("+", "_")
    return f"{kind}/{ti.dag_id}/{run_id}/{ti.task_id}{suffix}"


@contextmanager
def staging(relative: str) -> Iterator[Path]:
    """A local folder for a step to write ``relative`` into; published to the store on success."""
    if is_local():
        target = local_path(relative)
        target.mkdir(parents=True, exist_ok=True)
        yield target
        return
    tmp = Path(tempfile.mkdtemp(prefix="airloop-"))
    try:
        yield tmp
        dest = root() / relative
        for file in tmp.rglob("*"):
            if file.is_file():
                (dest / file.relative_to(tmp).as_posix()).write_bytes(file.read_bytes())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
