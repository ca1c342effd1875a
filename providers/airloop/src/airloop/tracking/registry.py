"""The MLflow model registry as the system of record: versions, aliases and the loop's audit record.

Aliases only, never stages: ``champion`` serves, ``challenger`` is under evaluation or rollout,
``previous`` is the champion before the last promotion (the rollback target). Every function is
idempotent, so a retried Airflow task lands in the same state.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

from airloop.tracking.session import mlflow_step

if TYPE_CHECKING:
    import mlflow

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"
REJECTED_TAG = "airloop.rejected"
# Ties a version to its source run; only versions carrying it are ever deleted (as duplicates).
RUN_TAG = "airloop.run_id"
# The offline verdict on a challenger run (``verdict``, ``rule``, ``accuracy``, ``artefact``: what was
# scored); registration copies them to the model version.
EVAL_TAG_PREFIX = "airloop.eval."
AUDIT_PATH = "audit/loop.json"
# Loop order: the offline evaluation scores the artefact the conversion made.
AUDIT_STAGES = ("trigger", "data", "validation", "training", "conversion", "evaluation", "rollout", "drift")
# The audit record is read whole by the UI; a stage stores a summary, not a report.
MAX_AUDIT_RECORD_BYTES = 16_384


class AuditEntry(TypedDict):
    """One stage of a loop turn: when it was recorded and its summary."""

    stage: str
    at: str
    record: dict[str, Any]


class AuditRecord(TypedDict):
    """The audit record of one training run (a model version's, once registered), in loop order."""

    run_id: str
    model_name: NotRequired[str]
    version: NotRequired[str]
    stages: list[AuditEntry]


def registry_client(tracking_uri: str) -> mlflow.MlflowClient:
    import mlflow

    if not tracking_uri:
        raise ValueError("request is missing 'tracking_uri'")
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _version(request: Mapping[str, Any]) -> str:
    if not request.get("model_name") or not request.get("version"):
        raise ValueError("request needs 'model_name' and 'version'")
    return str(request["version"])


def aliases(tracking_uri: str, model_name: str) -> dict[str, str]:
    """``{alias: version}`` of a registered model; empty when the model is not registered."""
    from mlflow.exceptions import MlflowException

    try:
        return current_aliases(registry_client(tracking_uri), model_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise


def current_aliases(client: mlflow.MlflowClient, model_name: str) -> dict[str, str]:
    # MLflow returns version numbers here as ints and everywhere else as strings.
    return {alias: str(version) for alias, version in client.get_registered_model(model_name).aliases.items()}


@mlflow_step
def promote(request: dict[str, Any]) -> dict[str, Any]:
    """Make ``version`` the champion; the old champion becomes ``previous``.

    Request ``{"tracking_uri", "model_name", "version"}`` -> ``{"champion", "previous"}``.
    """
    version = _version(request)
    name = request["model_name"]
    client = registry_client(request.get("tracking_uri", ""))
    client.get_model_version(name, version)  # a clear error for an unknown version
    current = current_aliases(client, name)
    old = current.get(CHAMPION)
    if old != version:
        # Set "previous" before moving "champion": a crash in between leaves the rollback target.
        if old is not None:
            client.set_registered_model_alias(name, PREVIOUS, old)
        client.set_registered_model_alias(name, CHAMPION, version)
        current = current_aliases(client, name)
    if current.get(CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    return {"champion": version, "previous": current.get(PREVIOUS)}


@mlflow_step
def reject(request: dict[str, Any]) -> dict[str, Any]:
    """Mark ``version`` rejected and take ``challenger`` off it.

    Request ``{"tracking_uri", "model_name", "version", "reason": {...}}`` ->
    ``{"version", "rejected": True, "challenger_removed": bool}``.
    """
    version = _version(request)
    name = request["model_name"]
    client = registry_client(request.get("tracking_uri", ""))
    current = current_aliases(client, name)
    if current.get(CHAMPION) == version:
        raise ValueError(f"version {version} of {name!r} is the champion; promote another version instead")
    removed = current.get(CHALLENGER) == version
    if removed:
        client.delete_registered_model_alias(name, CHALLENGER)
    client.set_model_version_tag(name, version, REJECTED_TAG, "true")
    reason = json.dumps(request.get("reason") or {}, sort_keys=True, default=str)
    client.set_model_version_tag(name, version, "airloop.rejected.reason", reason[:5000])
    return {"version": version, "rejected": True, "challenger_removed": removed}


@mlflow_step
def append_audit(request: Mapping[str, Any]) -> AuditRecord:
    """Add (or replace) stage records in ``audit/loop.json`` of a training run, in one read-modify-write.

    Request ``{"tracking_uri", "model_name", "version", "stage", "record": {...}}``, or ``"records":
    {stage: record, ...}`` instead of ``stage`` and ``record`` for the stages one task records together;
    ``"run_id"`` instead of model name and version for the stages before a version exists (trigger,
    data, validation, training). ``"append": {key: n}`` grows the lists under ``key`` of a stage's
    stored record (the newest ``n`` entries kept, fewer if the record would pass its size limit).
    Returns the record as ``read_audit`` does. One writer per run at a time, which a DAG run's
    sequential stages give.
    """
    records = _records(request)
    client = registry_client(request.get("tracking_uri", ""))
    header: AuditRecord
    if request.get("run_id"):
        header = {"run_id": request["run_id"], "stages": []}
    else:
        version = _version(request)
        header = {
            "model_name": request["model_name"],
            "version": version,
            "run_id": _source_run(client, request["model_name"], version),
            "stages": [],
        }
    stored = _stages(client, header["run_id"])
    for key, keep in (request.get("append") or {}).items():
        records = {stage: _appended(record, stored, stage, key, keep) for stage, record in records.items()}
    at = datetime.datetime.now(datetime.UTC).isoformat()
    entries: list[AuditEntry] = [
        {"stage": stage, "at": at, "record": json.loads(json.dumps(record, default=str))}
        for stage, record in records.items()
    ]
    stages = [item for item in stored if item["stage"] not in records] + entries
    stages.sort(key=lambda item: AUDIT_STAGES.index(item["stage"]))
    client.log_dict(header["run_id"], {"stages": stages}, AUDIT_PATH)
    return {**header, "stages": stages}


def _records(request: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{stage: record}`` from the request's ``records``, or from its ``stage`` and ``record``; checked."""
    if "records" in request:
        if "stage" in request or "record" in request:
            raise ValueError("give either 'records' or 'stage' and 'record', not both")
        records = dict(request["records"] or {})
        if not records:
            raise ValueError("'records' names no stage")
    else:
        records = {request.get("stage"): request.get("record") or {}}
    for stage, record in records.items():
        if stage not in AUDIT_STAGES:
            raise ValueError(f"stage must be one of {list(AUDIT_STAGES)}, got {stage!r}")
        size = len(json.dumps(record, default=str))
        if size > MAX_AUDIT_RECORD_BYTES:
            raise ValueError(
                f"audit record for stage {stage!r} is {size} bytes; the limit is {MAX_AUDIT_RECORD_BYTES}"
            )
    return records


def _appended(
    record: dict[str, Any], stored: list[AuditEntry], stage: str, key: str, keep: int
) -> dict[str, Any]:
    """``record`` with its ``key`` list after the stored one's: the newest ``keep``, within the size limit."""
    earlier = next((item["record"].get(key) or [] for item in stored if item["stage"] == stage), [])
    items = [*earlier, *(record.get(key) or [])][-keep:]
    while len(items) > 1 and len(json.dumps({**record, key: items}, default=str)) > MAX_AUDIT_RECORD_BYTES:
        items.pop(0)
    return {**record, key: items}


def read_audit(tracking_uri: str, model_name: str, version: str | int) -> AuditRecord:
    """``{"model_name", "version", "run_id", "stages": [{"stage", "at", "record"}, ...]}``, loop order."""
    client = registry_client(tracking_uri)
    run_id = _source_run(client, model_name, str(version))
    stages = _stages(client, run_id)
    return {"model_name": model_name, "version": str(version), "run_id": run_id, "stages": stages}


def _source_run(client: mlflow.MlflowClient, model_name: str, version: str) -> str:
    run_id = client.get_model_version(model_name, version).run_id
    if not run_id:
        raise ValueError(f"version {version} of {model_name!r} has no source run to hold its audit record")
    return run_id


def _stages(client: mlflow.MlflowClient, run_id: str) -> list[AuditEntry]:
    names = {info.path for info in client.list_artifacts(run_id, os.path.dirname(AUDIT_PATH))}
    if AUDIT_PATH not in names:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        with open(client.download_artifacts(run_id, AUDIT_PATH, tmp)) as handle:
            return json.load(handle)["stages"]
