"""What the Airloop pages and the data API show: the MLflow registry, loop audit records, the serving
target's live state and report files on disk.

Every function returns JSON-able records: the data API sends them as they are and the pages render
them. A backing service that does not answer (MLflow, the object store behind MLflow's artefacts, the
serving target) raises ``ServiceError`` naming it, or is reported as a ``Problem`` next to what could
be read; the app shows either as a banner or a JSON error, never a stack trace.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from airloop import artefacts, settings

if TYPE_CHECKING:
    from airloop.serving.base import ServingTarget
    from airloop.tracking.registry import AuditEntry

# How many past reports each deployment or model shows; older ones stay on disk.
HISTORY = 10
# The UI's own MLflow settings, whatever the connection gives the steps: a page must answer while MLflow
# is down, and MLflow's defaults (7 retries with backoff, 120 s timeouts) held one for 272 s.
UI_HTTP = {"max_retries": 1, "backoff_factor": 0, "backoff_jitter": 0, "timeout": 5}
MLFLOW, OBJECT_STORE, SERVING = "MLflow", "object store", "serving target"
ARTEFACT_STORE = "artefact store"
# A model tag naming the metric its card leads with; without it "accuracy" (the offline gate's) or, when
# the champion did not log that, the champion's first metric.
HEADLINE_TAG = "airloop.headline_metric"
HEADLINE_DEFAULT = "accuracy"
# Rollout phases after which nothing moves any more.
FINISHED_PHASE = "done"


class NotFound(LookupError):
    """The requested model version or file does not exist (the app answers 404)."""


class Problem(TypedDict):
    """A backing service that did not answer, or answered with an error."""

    service: str
    detail: str


class ServiceError(RuntimeError):
    """``problem`` kept a page or an API answer from being built (the app answers 503)."""

    def __init__(self, service: str, detail: str) -> None:
        super().__init__(f"{service}: {detail}")
        self.problem = Problem(service=service, detail=detail)


class DagRun(TypedDict):
    dag_id: str
    run_id: str


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
    # Where people open it: MLflow's UI (absolute URLs) and the Airflow DAG run that registered it.
    mlflow_run_url: str | None
    mlflow_version_url: str
    dag_run: DagRun | None


class ModelRecord(TypedDict):
    name: str
    description: str
    aliases: dict[str, str]
    tags: dict[str, str]
    versions: list[VersionRecord]


class AuditView(TypedDict):
    """A version's loop audit record as the UI shows it."""

    stages: list[AuditEntry]
    # A string in the record that names a file the app serves -> that file, relative to the artefact root.
    files: dict[str, str]
    # Why there is no record (e.g. the version has no source run), or None.
    note: str | None
    # The object store (or MLflow) did not answer: the record could not be read.
    problem: Problem | None


class VersionView(TypedDict):
    """``GET /api/models/<name>/versions/<version>``."""

    model_name: str
    version: VersionRecord
    audit: AuditView


class PredictorStatus(TypedDict):
    model_version: str
    weight: int
    shadow: bool
    healthy: bool
    # Cumulative counts since the target started serving the deployment (None: not reported).
    requests: int | None
    errors: int | None
    # Live accuracy from client feedback (None without feedback).
    accuracy: float | None


class ServingStatus(TypedDict):
    """A deployment Airloop rolled out, as its serving target sees it now."""

    deployment: str
    model_name: str | None
    target: str
    deployed: bool
    note: str | None
    predictors: dict[str, PredictorStatus]
    problem: Problem | None


class Headline(TypedDict):
    """The metric a loop's card leads with, for the versions the aliases name (None: not logged)."""

    metric: str
    champion: float | None
    challenger: float | None
    previous: float | None


class RolloutStepSummary(TypedDict):
    kind: str
    weight: int | None
    verdict: str | None  # None: the window is still open


class RolloutSummary(TypedDict):
    """The latest rollout report of a model: under way (``in_progress``) or how it ended."""

    deployment: str
    file: str
    champion: str | None
    challenger: str | None
    phase: str | None
    decision: str | None
    in_progress: bool
    started: str | None
    ended: str | None
    steps: list[RolloutStepSummary]


class DriftSummary(TypedDict):
    """The latest drift report of a model: ``at`` is its folder (a UTC timestamp)."""

    at: str
    verdict: str | None
    severity: str | None
    has_html: bool


class LoopCard(TypedDict):
    """One loop (a registered model) as the Models app shows it."""

    model_name: str
    description: str
    champion: VersionRecord | None
    challenger: VersionRecord | None
    headline: Headline | None
    serving: ServingStatus | None
    rollout: RolloutSummary | None
    drift: DriftSummary | None


class LoopsView(TypedDict):
    """``GET /api/loops``: the cards, and the backing services that did not answer (banners)."""

    loops: list[LoopCard]
    problems: list[Problem]


def mlflow_config() -> dict[str, Any]:
    """How the UI reaches the ``mlflow_default`` connection's server (the embedded MLflow without
    one): the connection's credentials with the UI's HTTP settings, and ``ui_url`` for links."""
    from airloop.hooks.mlflow import MlflowHook

    hook = MlflowHook()
    return {**hook.step_config(), "http": UI_HTTP, "ui_url": hook.ui_url}


def artefact_dir() -> Path:
    """The artefact root as a local folder; the UI reads reports from disk."""
    if not artefacts.is_local():
        raise ValueError(
            f"Artefact root {settings.artefact_root()!r} is not a local folder: "
            "the Airloop UI reads reports from file:// roots only"
        )
    return artefacts.local_path("")


def _object_store_errors() -> tuple[type[Exception], ...]:
    """What boto3 raises when S3 does not answer or refuses (botocore comes with the s3 extra)."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return ()
    return BotoCoreError, ClientError


@contextlib.contextmanager
def _mlflow(config: Mapping[str, Any]) -> Iterator[Any]:
    """A registry client whose calls use the UI's settings; MLflow's and the object store's failures
    become ``ServiceError`` (a missing model or version stays ``NotFound``)."""
    from mlflow.exceptions import MlflowException

    from airloop.tracking.registry import registry_client
    from airloop.tracking.session import MlflowUnavailableError, mlflow_calls

    uri = config["tracking_uri"]
    try:
        with mlflow_calls(config):
            yield registry_client(uri)
    except MlflowUnavailableError as err:
        raise ServiceError(MLFLOW, str(err)) from err
    except MlflowException as err:
        raise ServiceError(MLFLOW, f"MLflow at {uri} answered with an error: {err.message}") from err
    except _object_store_errors() as err:
        raise ServiceError(OBJECT_STORE, f"MLflow's artefact store did not answer: {err}") from err


def _pages(search: Callable[..., Any], **kwargs: Any) -> Iterator[Any]:
    """Every item of a paged MLflow search."""
    token = None
    while True:
        page = search(page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


def _version_record(client: Any, version: Any, aliases: Mapping[str, Any], ui_url: str) -> VersionRecord:
    from mlflow.exceptions import MlflowException

    from airloop.links.mlflow import model_version_url, run_url
    from airloop.tracking.registry import REJECTED_TAG

    metrics: dict[str, float] = {}
    run_link, tags = None, dict(version.tags)
    if version.run_id:
        try:
            run = client.get_run(version.run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        else:  # a deleted run leaves the version without metrics; it still deserves a row
            metrics = dict(sorted(run.data.metrics.items()))
            run_link = run_url(ui_url, run.info.experiment_id, version.run_id)
            tags = {**run.data.tags, **tags}
    # The Airflow tags of the task that registered the version (or trained its run).
    dag_run: DagRun | None = None
    if tags.get("airflow.dag_id") and tags.get("airflow.run_id"):
        dag_run = {"dag_id": tags["airflow.dag_id"], "run_id": tags["airflow.run_id"]}
    number = str(version.version)
    return {
        "version": number,
        "aliases": sorted(alias for alias, value in aliases.items() if str(value) == number),
        "status": version.status,
        "run_id": version.run_id,
        "source": version.source,
        "created": version.creation_timestamp,
        "metrics": metrics,
        "tags": dict(sorted(version.tags.items())),
        "rejected": version.tags.get(REJECTED_TAG, "").lower() == "true",
        "mlflow_run_url": run_link,
        "mlflow_version_url": model_version_url(ui_url, version.name, number),
        "dag_run": dag_run,
    }


def registry(config: Mapping[str, Any], *, aliased_only: bool = False) -> list[ModelRecord]:
    """Every registered model with its versions, newest first, each with aliases, run metrics and tags;
    with ``aliased_only`` only the versions an alias names (one run read per alias, not per version)."""
    with _mlflow(config) as client:
        models = list(_pages(client.search_registered_models, order_by=["name ASC"]))
        # One search for every version, without a filter: MLflow's filter grammar has no escapes, so a
        # name holding both quote characters cannot be searched for by name.
        versions: dict[str, list[Any]] = {model.name: [] for model in models}
        for version in _pages(client.search_model_versions):
            # Others are prompts (MLflow keeps them as registered models, which its search leaves out)
            # or were registered after the model search: the next page load shows them.
            if version.name in versions:
                versions[version.name].append(version)
        return [
            {
                "name": model.name,
                "description": model.description or "",
                "aliases": {alias: str(number) for alias, number in sorted(model.aliases.items())},
                "tags": dict(sorted(model.tags.items())),
                "versions": [
                    _version_record(client, version, model.aliases, config["ui_url"])
                    for version in sorted(versions[model.name], key=lambda v: int(v.version), reverse=True)
                    if not aliased_only or str(version.version) in {str(n) for n in model.aliases.values()}
                ],
            }
            for model in models
        ]


def model_version(config: Mapping[str, Any], name: str, version: str) -> VersionRecord:
    from mlflow.exceptions import MlflowException

    with _mlflow(config) as client:
        try:
            model = client.get_registered_model(name)
            found = client.get_model_version(name, version)
        except MlflowException as err:
            if err.error_code not in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
                raise
            raise NotFound(f"No version {version!r} of model {name!r}: {err.message}") from err
        return _version_record(client, found, model.aliases, config["ui_url"])


def audit(config: Mapping[str, Any], name: str, version: str, root: Path | None) -> AuditView:
    """A version's loop audit record (``airloop.tracking.registry.read_audit``), with the files under
    the artefact ``root`` that its values name; a store that does not answer is the view's problem."""
    from airloop.tracking.registry import read_audit

    view: AuditView = {"stages": [], "files": {}, "note": None, "problem": None}
    try:
        with _mlflow(config):
            view["stages"] = read_audit(config["tracking_uri"], name, version)["stages"]
    except ServiceError as err:
        view["problem"] = err.problem
    except ValueError as err:  # no source run to hold a record
        view["note"] = str(err)
    if root is not None:
        view["files"] = {value: path for value in _strings(view["stages"]) if (path := served(root, value))}
    return view


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def served(root: Path, value: str) -> str | None:
    """The path under the artefact ``root`` that ``/files`` serves for ``value`` (relative to the root,
    absolute, or a ``file://`` URI; a folder with an ``index.html`` stands for that page), or None."""
    if not value or len(value) > 1024 or "\0" in value or "://" in value.removeprefix("file://"):
        return None
    base = root.resolve()
    try:
        path = (base / value.removeprefix("file://")).resolve()
        if path.is_dir():
            path = path / "index.html"
        if not path.is_relative_to(base) or not path.is_file():
            return None
    except OSError:  # e.g. a reason string longer than a file name may be
        return None
    return path.relative_to(base).as_posix()


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


def serving(reports: Mapping[str, list[dict[str, Any]]]) -> list[ServingStatus]:
    """What the serving target (the ``airloop_serving_default`` connection's, the local one without
    it) serves now for each deployment of ``rollouts()``: traffic split, health, counts."""
    from airloop.hooks.serving import ServingHook

    hook = ServingHook()
    target, problem = None, None
    try:
        target = hook.target
    except Exception as err:  # a connection naming an unknown target, a missing extra: on the page
        problem = Problem(service=SERVING, detail=f"{type(err).__name__}: {err}")
    statuses = []
    for deployment, items in reports.items():
        status: ServingStatus = {
            "deployment": deployment,
            "model_name": next((r["model_name"] for r in items if r.get("model_name")), None),
            "target": str(hook.target_config["target"]),
            "deployed": False,
            "note": None,
            "predictors": {},
            "problem": problem,
        }
        if target is not None:
            try:
                _live(target, status)
            except ValueError as err:  # the target answered: it serves no such deployment
                status["note"] = str(err)
            except Exception as err:  # any target, any client library: shown on the page, not raised
                status["problem"] = Problem(service=SERVING, detail=f"{type(err).__name__}: {err}")
        statuses.append(status)
    return statuses


def _live(target: ServingTarget, status: ServingStatus) -> None:
    """Fill ``status`` from the target: state first (which predictors, with a health check), then
    metrics (the gateway's or Prometheus' counts); when the second fails, the first is kept."""
    deployment = status["deployment"]
    state = target.state(deployment)
    status["deployed"] = True
    for name, predictor in state["predictors"].items():
        status["predictors"][name] = {
            "model_version": str(predictor.get("model_version", "")),
            "weight": int(predictor.get("weight", 0)),
            "shadow": bool(predictor.get("shadow")),
            "healthy": bool(predictor.get("healthy")),
            "requests": None,
            "errors": None,
            "accuracy": None,
        }
    sick = sorted(name for name, p in status["predictors"].items() if not p["healthy"])
    if sick:
        status["problem"] = Problem(
            service=SERVING,
            detail=f"predictors {sick} of deployment {deployment!r} do not answer their health check",
        )
    for name, counts in target.metrics(deployment).items():
        if name in status["predictors"]:
            predictor, feedback = status["predictors"][name], counts.get("feedback") or 0
            predictor["requests"], predictor["errors"] = counts.get("requests"), counts.get("errors")
            predictor["accuracy"] = counts.get("feedback_correct", 0) / feedback if feedback else None


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


def _by_alias(model: ModelRecord, alias: str) -> VersionRecord | None:
    number = model["aliases"].get(alias)
    return next((v for v in model["versions"] if v["version"] == number), None)


def headline(model: ModelRecord) -> Headline | None:
    """The card's metric for the champion, challenger and previous champion; None without a champion."""
    from airloop.tracking.registry import CHALLENGER, CHAMPION, PREVIOUS

    versions = {alias: _by_alias(model, alias) for alias in (CHAMPION, CHALLENGER, PREVIOUS)}
    champion = versions[CHAMPION]
    if champion is None:
        return None
    name = model["tags"].get(HEADLINE_TAG)
    if not name:
        name = HEADLINE_DEFAULT
        if name not in champion["metrics"] and champion["metrics"]:
            name = next(iter(champion["metrics"]))  # sorted: the same one on every load

    def value(alias: str) -> float | None:
        found = versions[alias]
        return found["metrics"].get(name) if found else None

    return {
        "metric": name,
        "champion": value(CHAMPION),
        "challenger": value(CHALLENGER),
        "previous": value(PREVIOUS),
    }


def _rollout_summary(deployment: str, report: Mapping[str, Any]) -> RolloutSummary:
    phase, decision = report.get("phase"), report.get("decision")
    return {
        "deployment": deployment,
        "file": str(report["file"]),
        "champion": report.get("champion"),
        "challenger": report.get("challenger"),
        "phase": phase,
        "decision": decision,
        # Reports written before phases existed carry only the decision.
        "in_progress": decision is None and phase not in (None, FINISHED_PHASE),
        "started": report.get("started"),
        "ended": report.get("ended"),
        "steps": [
            {"kind": str(step.get("kind", "")), "weight": step.get("weight"), "verdict": step.get("verdict")}
            for step in report.get("steps", [])
            if isinstance(step, Mapping)
        ],
    }


def loops(config: Mapping[str, Any]) -> LoopsView:
    """One card per registered model: its champion and challenger, the headline metric, the live traffic
    split and the latest rollout of its deployment, its latest drift verdict. MLflow not answering raises
    ``ServiceError``; the serving target or a remote artefact root are the view's problems."""
    from airloop.tracking.registry import CHALLENGER, CHAMPION

    models = registry(config, aliased_only=True)
    problems: list[Problem] = []
    reports: dict[str, list[dict[str, Any]]] = {}
    drifts: dict[str, list[dict[str, Any]]] = {}
    try:
        root = artefact_dir()
    except ValueError as err:
        problems.append(Problem(service=ARTEFACT_STORE, detail=str(err)))
    else:
        reports, drifts = rollouts(root), drift(root)
    live = {status["deployment"]: status for status in serving(reports)}
    for status in live.values():
        if status["problem"] and status["problem"] not in problems:
            problems.append(status["problem"])
    # The newest readable report naming each model, across its deployments.
    latest: dict[str, tuple[str, dict[str, Any]]] = {}
    for deployment, items in reports.items():
        for report in items:
            name = report.get("model_name")
            if isinstance(name, str) and "error" not in report:
                if name not in latest or str(report.get("started", "")) > str(
                    latest[name][1].get("started", "")
                ):
                    latest[name] = (deployment, report)
    cards: list[LoopCard] = []
    for model in models:
        found = latest.get(model["name"])
        recent = next((r for r in drifts.get(model["name"], []) if "error" not in r), None)
        cards.append(
            {
                "model_name": model["name"],
                "description": model["description"],
                "champion": _by_alias(model, CHAMPION),
                "challenger": _by_alias(model, CHALLENGER),
                "headline": headline(model),
                "serving": live.get(found[0]) if found else None,
                "rollout": _rollout_summary(*found) if found else None,
                "drift": None
                if recent is None
                else {
                    "at": recent["at"],
                    "verdict": recent.get("verdict"),
                    "severity": recent.get("severity"),
                    "has_html": recent["has_html"],
                },
            }
        )
    return {"loops": cards, "problems": problems}
