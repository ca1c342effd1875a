"""Airloop pages in the Airflow UI: registered models, loop audit records, rollouts and drift reports.

A FastAPI app that the API server mounts under ``/airloop``, plus a navigation entry. Every Airflow
component imports this module, so MLflow and the API server's security module are imported inside the
request handlers, never at the top.
"""

from __future__ import annotations

import html
import json
import mimetypes
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from airflow.configuration import conf
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from airloop import artefacts, settings

URL_PREFIX = "/airloop"
# How many past reports each deployment or model shows; older ones stay on disk.
HISTORY = 10

# Our pages load one stylesheet from this app and nothing else; the Airflow UI may frame them.
PAGE_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; frame-ancestors 'self'; "
    "base-uri 'none'; form-action 'none'"
)
# Artefact files (drift reports, Data Docs, rollout JSON) were written by tasks: their styles and
# images load, scripts never run (sandbox without allow-scripts), and nothing leaves the server.
FILE_CSP = (
    "default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; "
    "frame-ancestors 'self'; base-uri 'none'; form-action 'none'; sandbox"
)

STYLESHEET = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1f2933; }
nav a { margin-right: 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #cbd2d9; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f0f4f8; }
.alias { background: #e3f8ff; border-radius: 0.3rem; padding: 0 0.4rem; margin-right: 0.2rem; }
.bad { color: #ab091e; font-weight: bold; }
.good { color: #0e7c3a; font-weight: bold; }
.empty { color: #7b8794; }
pre { background: #f5f7fa; padding: 0.6rem; overflow-x: auto; }
"""


def _base_path() -> str:
    """Path part of ``[api] base_url``, without a trailing slash ("" when Airflow is served at the root)."""
    return urlsplit(conf.get("api", "base_url", fallback="")).path.rstrip("/")


# --------------------------------------------------------------------------------------------- sources


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


def _version_record(client: Any, version: Any, aliases: dict[str, str]) -> dict[str, Any]:
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


def registry(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Every registered model with its versions, newest first, each with aliases, run metrics and tags."""
    from airloop.tracking.session import SessionClient

    client = SessionClient(config)
    models = []
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


def model_version(config: dict[str, Any], name: str, version: str) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    from airloop.tracking.session import SessionClient

    client = SessionClient(config)
    try:
        model = client.get_registered_model(name)
        found = client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code not in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            raise
        raise HTTPException(404, f"No version {version!r} of model {name!r}: {err.message}") from err
    return _version_record(client, found, model.aliases)


def audit(config: dict[str, Any], name: str, version: str) -> tuple[list[dict[str, Any]], str]:
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
        raise HTTPException(404, "Not found")
    return path


# -------------------------------------------------------------------------------------------- rendering


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _root(request: Request) -> str:
    """Where this app is mounted (``/airloop`` under Airflow's base path): links are built from it."""
    return request.scope.get("root_path", "")


def _href(root_path: str, path: str) -> str:
    return _e(root_path + path)


def _rejected(flag: bool) -> str:
    return '<span class="bad">rejected</span>' if flag else ""


def _aliases(names: list[str]) -> str:
    return "".join(f'<span class="alias">{_e(name)}</span>' for name in names)


def _pairs(mapping: dict[str, Any]) -> str:
    if not mapping:
        return '<span class="empty">none</span>'
    return "<br>".join(f"{_e(key)} = {_e(value)}" for key, value in mapping.items())


VERDICT_CSS = {
    **dict.fromkeys(("pass", "promoted", "no_drift"), "good"),
    **dict.fromkeys(("fail", "rolled_back", "drift", "invalid_window"), "bad"),
}


def _verdict(value: Any) -> str:
    return f'<span class="{VERDICT_CSS.get(str(value), "")}">{_e(value)}</span>'


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """A table of already-escaped cells."""
    head = "".join(f"<th>{_e(header)}</th>" for header in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(request: Request, title: str, body: str, status_code: int = 200) -> HTMLResponse:
    root = _root(request)
    nav = " ".join(
        f'<a href="{_href(root, path)}">{_e(label)}</a>'
        for path, label in (("/models", "Models"), ("/rollouts", "Rollouts"), ("/drift", "Drift"))
    )
    document = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Airloop: {_e(title)}</title>"
        f'<link rel="stylesheet" href="{_href(root, "/static/airloop.css")}"></head>'
        f"<body><nav>{nav}</nav><h1>{_e(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(document, status_code=status_code)


def _version_link(root: str, name: str, version: str) -> str:
    path = f"/models/{quote(name, safe='')}/versions/{quote(version, safe='')}"
    return f'<a href="{_href(root, path)}">{_e(version)}</a>'


def _models_html(root: str, models: list[dict[str, Any]]) -> str:
    if not models:
        return '<p class="empty">No registered models.</p>'
    sections = []
    for model in models:
        rows = [
            [
                _version_link(root, model["name"], v["version"]),
                _aliases(v["aliases"]),
                _e(v["status"]),
                _rejected(v["rejected"]),
                _pairs(v["metrics"]),
                _pairs(v["tags"]),
            ]
            for v in model["versions"]
        ]
        sections.append(
            f"<h2>{_e(model['name'])}</h2><p>{_e(model['description'])}</p>"
            f"<p>Aliases: {_pairs(model['aliases'])}</p><p>Tags: {_pairs(model['tags'])}</p>"
            + _table(["Version", "Aliases", "Status", "Rejected", "Metrics", "Tags"], rows)
        )
    return "".join(sections)


def _audit_html(stages: list[dict[str, Any]], reason: str) -> str:
    if not stages:
        return f'<p class="empty">No audit record{": " + _e(reason) if reason else "."}</p>'
    return "".join(
        f"<h3>{_e(stage.get('stage', ''))} <small>{_e(stage.get('at', ''))}</small></h3>"
        f"<pre>{_e(json.dumps(stage.get('record'), indent=2, sort_keys=True, default=str))}</pre>"
        for stage in stages
    )


def _file_link(root: str, relative: str, label: str) -> str:
    return f'<a href="{_href(root, "/files/" + quote(relative))}">{_e(label)}</a>'


def _rollouts_html(root: str, reports: dict[str, list[dict[str, Any]]]) -> str:
    if not reports:
        return '<p class="empty">No rollout reports.</p>'
    sections = []
    for deployment, items in reports.items():
        sections.append(f"<h2>{_e(deployment)}</h2>")
        for report in items:
            if "error" in report:
                sections.append(f'<p class="bad">{_e(report["error"])}</p>')
                continue
            steps = [
                [
                    _e(step.get("kind", "canary")),
                    _e(step.get("weight", "")),
                    # A shadow step mirrors a share of requests to the challenger; its answers are dropped.
                    _e(step.get("mirror", "")),
                    _verdict(step.get("verdict", "")),
                    "<br>".join(_e(reason) for reason in step.get("reasons", [])),
                    _e(step.get("started", "")),
                    _e(step.get("ended", "")),
                ]
                for step in report.get("steps", [])
            ]
            # A rollout under way has a phase and no decision yet.
            outcome = report.get("decision") or report.get("phase", "")
            sections.append(
                f"<p>Model {_e(report.get('model_name', ''))}: champion {_e(report.get('champion', ''))}, "
                f"challenger {_e(report.get('challenger', ''))}; {_verdict(outcome)}"
                f" ({_e(report.get('started', ''))} to {_e(report.get('ended', ''))}) "
                + _file_link(root, f"rollouts/{deployment}/{report['file']}", "JSON")
                + "</p>"
                + _table(["Step", "Traffic %", "Mirrored %", "Verdict", "Reasons", "Started", "Ended"], steps)
            )
    return "".join(sections)


def _drift_html(root: str, reports: dict[str, list[dict[str, Any]]]) -> str:
    if not reports:
        return '<p class="empty">No drift reports.</p>'
    sections = []
    for model, items in reports.items():
        sections.append(f"<h2>{_e(model)}</h2>")
        rows = []
        for report in items:
            link = ""
            if report["has_html"]:
                link = _file_link(root, f"drift/{model}/{report['at']}/report.html", "report")
            rows.append(
                [
                    _e(report["at"]),
                    _verdict(report.get("verdict", report.get("error", ""))),
                    _e(report.get("severity", "")),
                    _e(report.get("n_reference", "")),
                    _e(report.get("n_current", "")),
                    link,
                ]
            )
        sections.append(_table(["At", "Verdict", "Severity", "Reference rows", "Current rows", ""], rows))
        latest = items[0] if items else {}
        features = [
            [
                _e(feature),
                _e(stats.get("statistic", "")),
                _e(stats.get("p_value", "")),
                '<span class="bad">drift</span>' if stats.get("drift") else "",
            ]
            for feature, stats in latest.get("features", {}).items()
        ]
        if features:
            sections.append(
                f"<h3>Features at {_e(latest['at'])}</h3>"
                + _table(["Feature", "Statistic", "p-value", "Drift"], features)
            )
    return "".join(sections)


# ----------------------------------------------------------------------------------------------- the app

_bearer = HTTPBearer(auto_error=False)


async def _authenticated(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008 (FastAPI)
) -> None:
    """Same check as Airflow's own API: a bearer token or the UI's session cookie."""
    from airflow.api_fastapi.core_api.security import get_user

    await get_user(request, None, credentials)


def create_app() -> FastAPI:
    app = FastAPI(
        title="Airloop",
        dependencies=[Depends(_authenticated)],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Any]) -> Response:
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        return response

    @app.exception_handler(ValueError)
    async def configuration_error(request: Request, err: ValueError) -> Response:
        if request.url.path.endswith("/api/models"):
            return JSONResponse({"detail": str(err)}, status_code=500)
        return _page(request, "Configuration error", f'<p class="bad">{_e(err)}</p>', status_code=500)

    @app.get("/static/airloop.css")
    def stylesheet() -> Response:
        return Response(STYLESHEET, media_type="text/css")

    @app.get("/api/models")
    def api_models() -> JSONResponse:
        return JSONResponse(registry(mlflow_config()))

    @app.get("/models")
    def models_page(request: Request) -> HTMLResponse:
        return _page(request, "Models", _models_html(_root(request), registry(mlflow_config())))

    @app.get("/models/{name}/versions/{version}")
    def version_page(request: Request, name: str, version: str) -> HTMLResponse:
        config = mlflow_config()
        found = model_version(config, name, version)
        details = _table(
            ["Aliases", "Status", "Rejected", "Run", "Source", "Metrics", "Tags"],
            [
                [
                    _aliases(found["aliases"]),
                    _e(found["status"]),
                    _rejected(found["rejected"]),
                    _e(found["run_id"] or ""),
                    _e(found["source"] or ""),
                    _pairs(found["metrics"]),
                    _pairs(found["tags"]),
                ]
            ],
        )
        stages, reason = audit(config, name, version)
        body = details + "<h2>Loop audit</h2>" + _audit_html(stages, reason)
        return _page(request, f"{name} version {version}", body)

    @app.get("/rollouts")
    def rollouts_page(request: Request) -> HTMLResponse:
        return _page(request, "Rollouts", _rollouts_html(_root(request), rollouts(artefact_dir())))

    @app.get("/drift")
    def drift_page(request: Request) -> HTMLResponse:
        return _page(request, "Drift", _drift_html(_root(request), drift(artefact_dir())))

    @app.get("/files/{relative:path}")
    def artefact(relative: str) -> FileResponse:
        """Reports in the artefact store, the target of the provider's extra links."""
        path = artefact_file(artefact_dir(), relative)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers={"Content-Security-Policy": FILE_CSP})

    return app


app = create_app()


class AirloopPlugin(AirflowPlugin):
    """Mounts the Airloop app in the API server and adds it to the UI's navigation."""

    name = "airloop"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "Airloop"}]
    external_views = [
        {
            "name": "Airloop",
            "href": f"{_base_path()}{URL_PREFIX}/models",
            "destination": "nav",
            "category": "browse",
            "url_route": "airloop",
        }
    ]
