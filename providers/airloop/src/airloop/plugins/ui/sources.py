"""What the Airloop pages show: the MLflow registry, loop audit records and report files on disk."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

from airloop import artefacts, settings

# How many past reports each deployment or model shows; older ones stay on disk.
HISTORY = 10


class NotFound(LookupError):
    """The requested model version or file does not exist (the app answers 404)."""


class VersionRecord(TypedDict):
    version: str
    aliases: list[str]
    status: str
    run_id: str | None
    source: str | None
    created: int | None  # MLflow's timestamp, milliseconds
    metrics: dict[str, float]
    tags: dict[str, str]
    rejected: bool


class ModelRecord(TypedDict):
    name: str
    description: str
    aliases: dict[str, str]
    tags: dict[str, str]
    versions: list[VersionRecord]


def mlflow_config() -> dict[str, Any]:
    """How to reach the ``mlflow_default`` connection's server (credentials included), or the embedded
    MLflow when it is not defined."""
    from airloop.hooks.mlflow import MlflowHook

    return MlflowHook().step_config()


def artefact_dir() -> Path:
    """The artefact root as a local folder; the UI reads reports from disk."""
    if not artefacts.is_local():
        raise ValueError(
            f"Artefact root {settings.artefact_root()!r} is not a local folder: "
            "the Airloop UI reads reports from file:// roots only"
        )
    return artefacts.local_path("")


def _pages(search: Callable[..., Any], **kwargs: Any) -> Iterator[Any]:
    """Every item of a paged MLflow search."""
    token = None
    while True:
        page = search(page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


def _name_filter(name: str) -> str:
    quote_char = '"' if "'" in name else "'"
    return f"name = {quote_char}{name}{quote_char}"


def _version_record(client: Any, version: Any, aliases: Mapping[str, Any]) -> VersionRecord:
    from mlflow.exceptions import MlflowException

    from airloop.tracking.registry import REJECTED_TAG

    metrics: dict[str, float] = {}
    if version.run_id:
        try:
            metrics = dict(sorted(client.get_run(version.run_id).data.metrics.items()))
        except MlflowException:
            pass  # the run was deleted; the version still deserves a row
    return {
        "version": str(version.version),
        "aliases": sorted(alias for alias, number in aliases.items() if str(number) == str(version.version)),
        "status": version.status,
        "run_id": version.run_id,
        "source": version.source,
        "created": version.creation_timestamp,
        "metrics": metrics,
        "tags": dict(sorted(version.tags.items())),
        "rejected": version.tags.get(REJECTED_TAG, "").lower() == "true",
    }


def registry(config: dict[str, Any]) -> list[ModelRecord]:
    """Every registered model with its versions, newest first, each with aliases, run metrics and tags."""
    from airloop.tracking.session import SessionClient

    client = SessionClient(config)
    models: list[ModelRecord] = []
    for model in _pages(client.search_registered_models, order_by=["name ASC"]):
        versions = _pages(
            client.search_model_versions,
            filter_string=_name_filter(model.name),
            order_by=["version_number DESC"],
        )
        models.append(
            {
                "name": model.name,
                "description": model.description or "",
                "aliases": {alias: str(number) for alias, number in sorted(model.aliases.items())},
                "tags": dict(sorted(model.tags.items())),
                "versions": [_version_record(client, version, model.aliases) for version in versions],
            }
        )
    return models


def model_version(config: dict[str, Any], name: str, version: str) -> VersionRecord:
    from mlflow.exceptions import MlflowException

    from airloop.tracking.session import SessionClient

    client = SessionClient(config)
    try:
        model = client.get_registered_model(name)
        found = client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code not in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            raise
        raise NotFound(f"No version {version!r} of model {name!r}: {err.message}") from err
    return _version_record(client, found, model.aliases)


def audit(config: dict[str, Any], name: str, version: str) -> tuple[Sequence[Mapping[str, Any]], str]:
    """The stages of a version's loop audit record, or none and the reason."""
    from airloop.tracking.registry import read_audit
    from airloop.tracking.session import mlflow_calls

    try:
        with mlflow_calls(config):
            return read_audit(config["tracking_uri"], name, version)["stages"], ""
    except Exception as err:  # an unreadable optional record is shown on the page, not raised
        return [], f"{type(err).__name__}: {err}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {"error": f"unreadable report {path.name}: {err}"}
    return data if isinstance(data, dict) else {"error": f"report {path.name} is not a JSON object"}


def rollouts(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Latest rollout reports per deployment, newest first: ``rollouts/<deployment>/*.json``."""
    result = {}
    for folder in sorted(p for p in (root / "rollouts").glob("*") if p.is_dir()):
        reports = [{**_read_json(path), "file": path.name} for path in folder.glob("*.json")]
        reports.sort(key=lambda report: str(report.get("started", "")), reverse=True)
        result[folder.name] = reports[:HISTORY]
    return result


def drift(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Latest drift reports per model, newest first: ``drift/<model>/<timestamp>/report.json``."""
    result = {}
    for folder in sorted(p for p in (root / "drift").glob("*") if p.is_dir()):
        runs = sorted((p for p in folder.glob("*/report.json")), key=lambda p: p.parent.name, reverse=True)
        result[folder.name] = [
            {**_read_json(path), "at": path.parent.name, "has_html": (path.parent / "report.html").is_file()}
            for path in runs[:HISTORY]
        ]
    return result


def artefact_file(root: Path, relative: str) -> Path:
    """A file under the artefact root; anything that resolves outside it (``..``, links) is refused."""
    base = root.resolve()
    path = None if "\0" in relative else (base / relative).resolve()
    if path is None or not path.is_relative_to(base) or not path.is_file():
        raise NotFound("Not found")
    return path
