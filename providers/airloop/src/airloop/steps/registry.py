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
from typing import TYPE_CHECKING, Any

from airloop.steps.tracking import mlflow_step
from airloop.steps.train import resolve_model

if TYPE_CHECKING:
    import mlflow

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"
REJECTED_TAG = "airloop.rejected"
# Ties a version to its source run; only versions carrying it are ever deleted (as duplicates).
RUN_TAG = "airloop.run_id"
AUDIT_PATH = "audit/loop.json"
AUDIT_STAGES = ("trigger", "data", "validation", "training", "evaluation", "conversion", "rollout", "drift")
# The audit record is read whole by the UI; a stage stores a summary, not a report.
MAX_AUDIT_RECORD_BYTES = 16_384


def _client(tracking_uri: str) -> mlflow.MlflowClient:
    import mlflow

    if not tracking_uri:
        raise ValueError("request is missing 'tracking_uri'")
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _version(request: dict[str, Any]) -> str:
    if not request.get("model_name") or not request.get("version"):
        raise ValueError("request needs 'model_name' and 'version'")
    return str(request["version"])


def aliases(tracking_uri: str, model_name: str) -> dict[str, str]:
    """``{alias: version}`` of a registered model; empty when the model is not registered."""
    from mlflow.exceptions import MlflowException

    try:
        return _aliases(_client(tracking_uri), model_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise


def _aliases(client: mlflow.MlflowClient, model_name: str) -> dict[str, str]:
    # MLflow returns version numbers here as ints and everywhere else as strings.
    return {alias: str(version) for alias, version in client.get_registered_model(model_name).aliases.items()}


@mlflow_step
def register(request: dict[str, Any]) -> dict[str, Any]:
    """Register the run's model as a new version and give it ``champion`` (first) or ``challenger``.

    Request ``{"tracking_uri", "model_name", "run_id", "model_uri", "tags", "http"}`` ->
    ``{"version", "alias", "reused"}``; a version from the same run is reused, not duplicated.

    Order of writes: the version is created with its tags in one request, and the alias moves only
    after that. A failure before the create leaves the registry as it was; one after it leaves a
    complete version that no alias points at, which the retry finds by its run and completes. A
    create that the server committed but answered with a 5xx is retried by MLflow's HTTP client and
    can commit twice: the extra versions of the run, which no alias points at, are deleted.
    """
    from mlflow.exceptions import MlflowException

    name, run_id = request.get("model_name"), request.get("run_id")
    if not name or not run_id:
        raise ValueError("request needs 'model_name' and 'run_id'")
    client = _client(request.get("tracking_uri", ""))
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    versions = _run_versions(client, name, run_id)
    reused = bool(versions)
    if not reused:
        location, model_id = resolve_model(client, request.get("model_uri") or f"runs:/{run_id}/model")
        tags = {**{str(k): str(v) for k, v in (request.get("tags") or {}).items()}, RUN_TAG: run_id}
        client.create_model_version(name, location, run_id=run_id, tags=tags, model_id=model_id)
        versions = _run_versions(client, name, run_id)  # read back: the create may have committed twice
    version, *duplicates = versions
    number = str(version.version)
    current = _aliases(client, name)
    for duplicate in duplicates:
        if duplicate.tags.get(RUN_TAG) == run_id and str(duplicate.version) not in current.values():
            client.delete_model_version(name, str(duplicate.version))
    held = [alias for alias in (CHAMPION, CHALLENGER) if current.get(alias) == number]
    if held:
        alias: str | None = held[0]
    elif version.tags.get(REJECTED_TAG) == "true":
        alias = None
    else:
        alias = CHALLENGER if CHAMPION in current else CHAMPION
        client.set_registered_model_alias(name, alias, number)
    return {"version": number, "alias": alias, "reused": reused}


def _run_versions(client: mlflow.MlflowClient, name: str, run_id: str) -> list[Any]:
    """The model's versions made from ``run_id``, oldest first."""
    found = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    return sorted(found, key=lambda mv: int(mv.version))


@mlflow_step
def promote(request: dict[str, Any]) -> dict[str, Any]:
    """Make ``version`` the champion; the old champion becomes ``previous``.

    Request ``{"tracking_uri", "model_name", "version"}`` -> ``{"champion", "previous"}``.
    """
    version = _version(request)
    name = request["model_name"]
    client = _client(request.get("tracking_uri", ""))
    client.get_model_version(name, version)  # a clear error for an unknown version
    current = _aliases(client, name)
    old = current.get(CHAMPION)
    if old != version:
        # Set "previous" before moving "champion": a crash in between leaves the rollback target.
        if old is not None:
            client.set_registered_model_alias(name, PREVIOUS, old)
        client.set_registered_model_alias(name, CHAMPION, version)
        current = _aliases(client, name)
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
    client = _client(request.get("tracking_uri", ""))
    current = _aliases(client, name)
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
def append_audit(request: dict[str, Any]) -> dict[str, Any]:
    """Add (or replace) one stage's record in ``audit/loop.json`` of a training run.

    Request ``{"tracking_uri", "model_name", "version", "stage", "record": {...}}``, or ``"run_id"``
    instead of model name and version for the stages before a version exists (trigger, data,
    validation, training). Returns the record as ``read_audit`` does. Read-modify-write: one writer
    per run at a time, which a DAG run's sequential stages give.
    """
    stage = request.get("stage")
    if stage not in AUDIT_STAGES:
        raise ValueError(f"stage must be one of {list(AUDIT_STAGES)}, got {stage!r}")
    record = request.get("record") or {}
    size = len(json.dumps(record, default=str))
    if size > MAX_AUDIT_RECORD_BYTES:
        raise ValueError(
            f"audit record for stage {stage!r} is {size} bytes; the limit is {MAX_AUDIT_RECORD_BYTES}"
        )
    client = _client(request.get("tracking_uri", ""))
    if request.get("run_id"):
        header: dict[str, Any] = {"run_id": request["run_id"]}
    else:
        version = _version(request)
        header = {
            "model_name": request["model_name"],
            "version": version,
            "run_id": _source_run(client, request["model_name"], version),
        }
    entry = {
        "stage": stage,
        "at": datetime.datetime.now(datetime.UTC).isoformat(),
        "record": json.loads(json.dumps(record, default=str)),
    }
    stages = [item for item in _stages(client, header["run_id"]) if item["stage"] != stage] + [entry]
    stages.sort(key=lambda item: AUDIT_STAGES.index(item["stage"]))
    client.log_dict(header["run_id"], {"stages": stages}, AUDIT_PATH)
    return {**header, "stages": stages}


def read_audit(tracking_uri: str, model_name: str, version: str | int) -> dict[str, Any]:
    """``{"model_name", "version", "run_id", "stages": [{"stage", "at", "record"}, ...]}``, loop order."""
    client = _client(tracking_uri)
    run_id = _source_run(client, model_name, str(version))
    stages = _stages(client, run_id)
    return {"model_name": model_name, "version": str(version), "run_id": run_id, "stages": stages}


def _source_run(client: mlflow.MlflowClient, model_name: str, version: str) -> str:
    run_id = client.get_model_version(model_name, version).run_id
    if not run_id:
        raise ValueError(f"version {version} of {model_name!r} has no source run to hold its audit record")
    return run_id


def _stages(client: mlflow.MlflowClient, run_id: str) -> list[dict[str, Any]]:
    names = {info.path for info in client.list_artifacts(run_id, os.path.dirname(AUDIT_PATH))}
    if AUDIT_PATH not in names:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        with open(client.download_artifacts(run_id, AUDIT_PATH, tmp)) as handle:
            return json.load(handle)["stages"]
