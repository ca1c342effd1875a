"""Register a trained model as a new version of a registered model (``champion`` first, then
``challenger``). The version carries the figures of what serves it: the run's conversion tags
(``airloop.openvino.*``: the served variant, its accuracy and parity) and offline verdict
(``airloop.eval.*``, scored on that artefact)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airloop.openvino_ir import TAG_PREFIX as OPENVINO_TAG_PREFIX
from airloop.steps.training.requests import RegisterRequest, RegisterResult
from airloop.tracking.artifacts import MODEL_NAME
from airloop.tracking.models import resolve_model
from airloop.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    EVAL_TAG_PREFIX,
    REJECTED_TAG,
    RUN_TAG,
    current_aliases,
    registry_client,
)
from airloop.tracking.session import mlflow_step

if TYPE_CHECKING:
    import mlflow


@mlflow_step
def register(request: RegisterRequest | Mapping[str, Any]) -> RegisterResult:
    """Register the run's model as a new version and give it ``champion`` (first) or ``challenger``.

    -> ``{"version", "alias", "reused"}``; a version from the same run is reused, not duplicated.

    Order of writes: the version is created with its tags in one request, and the alias moves only
    after that. A failure before the create leaves the registry as it was; one after it leaves a
    complete version that no alias points at, which the retry finds by its run and completes. A
    create that the server committed but answered with a 5xx is retried by MLflow's HTTP client and
    can commit twice: the extra versions of the run, which no alias points at, are deleted.
    """
    from mlflow.exceptions import MlflowException

    request = RegisterRequest.parse(request)
    name, run_id = request.model_name, request.run_id
    if not name or not run_id:
        raise ValueError("request needs 'model_name' and 'run_id'")
    client = registry_client(request.tracking_uri)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    versions = _run_versions(client, name, run_id)
    reused = bool(versions)
    if not reused:
        location, model_id = resolve_model(client, request.model_uri or f"runs:/{run_id}/{MODEL_NAME}")
        served = {
            key: value
            for key, value in client.get_run(run_id).data.tags.items()
            if key.startswith((OPENVINO_TAG_PREFIX, EVAL_TAG_PREFIX))
        }
        tags = {**served, **{str(k): str(v) for k, v in request.tags.items()}, RUN_TAG: run_id}
        client.create_model_version(name, location, run_id=run_id, tags=tags, model_id=model_id)
        versions = _run_versions(client, name, run_id)  # read back: the create may have committed twice
    version, *duplicates = versions
    number = str(version.version)
    current = current_aliases(client, name)
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
