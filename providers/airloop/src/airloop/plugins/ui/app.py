"""The FastAPI app that Airflow's API server mounts under ``/airloop``: Airflow's login, strict headers.

Two faces over the same ``sources``: the data API under ``/api`` (JSON, for scripts and a browser
app; 401/403 when not logged in, 503 ``{"detail", "service"}`` when a backing service does not answer)
and the HTML pages (Airflow's login page when not logged in, a banner when a service is down).
"""

from __future__ import annotations

import mimetypes
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from airloop.plugins.ui import BUNDLE, BUNDLE_ROUTE, FILES_ROUTE, base_path, pages, sources

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
API = "/api"
# Where Airflow's UI sends a browser whose session is missing or expired (its auth manager's login).
LOGIN_PATH = "/api/v2/auth/login"

Endpoint = Callable[[Request], Awaitable[Response]]
_bearer = HTTPBearer(auto_error=False)


async def authenticated(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008 (FastAPI)
) -> None:
    """Same check as Airflow's own API: a bearer token or the UI's session cookie."""
    from airflow.api_fastapi.core_api.security import get_user

    await get_user(request, None, credentials)


def _root(request: Request) -> str:
    """Where this app is mounted (``/airloop`` under Airflow's base path): links are built from it."""
    return str(request.scope.get("root_path", ""))


def _wants_json(request: Request) -> bool:
    """The data API (and so JSON errors), as opposed to a page."""
    return request.url.path.removeprefix(_root(request)).startswith(API + "/")


def login_url(request: Request) -> str:
    """Airflow's login, coming back to the page asked for (a path on this server, as Airflow's UI sends)."""
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return f"{base_path()}{LOGIN_PATH}?{urlencode({'next': target})}"


def _page(
    request: Request, title: str, body: str, problems: Sequence[sources.Problem] = (), status_code: int = 200
) -> HTMLResponse:
    return HTMLResponse(pages.page(_root(request), title, body, problems), status_code=status_code)


def _live() -> list[sources.ServingStatus]:
    """The serving target's view of each rolled-out deployment; none when reports are not on disk
    (the report pages say why)."""
    try:
        root = sources.artefact_dir()
    except ValueError:
        return []
    return sources.serving(sources.rollouts(root))


def _down(live: list[sources.ServingStatus]) -> list[sources.Problem]:
    return [status["problem"] for status in live if status["problem"]]


def _audit_root() -> Path | None:
    try:
        return sources.artefact_dir()
    except ValueError:
        return None  # paths in the record stay text


def _add_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def login_or_error(request: Request, err: HTTPException) -> Response:
        # As Airflow's UI does: no session, an expired one or a token that is not Airflow's -> login.
        expired = err.status_code == 401 or (err.status_code == 403 and err.detail == "Invalid JWT token")
        if expired and not _wants_json(request):
            return RedirectResponse(login_url(request), status_code=303)
        return await http_exception_handler(request, err)

    @app.exception_handler(sources.ServiceError)
    async def service_down(request: Request, err: sources.ServiceError) -> Response:
        if _wants_json(request):
            return JSONResponse(dict(err.problem), status_code=503)
        return _page(request, "Unavailable", "", [err.problem], status_code=503)

    @app.exception_handler(ValueError)
    async def configuration_error(request: Request, err: ValueError) -> Response:
        if _wants_json(request):
            return JSONResponse({"detail": str(err)}, status_code=500)
        return _page(request, "Configuration error", pages.error(err), status_code=500)

    @app.exception_handler(sources.NotFound)
    async def not_found(request: Request, err: sources.NotFound) -> Response:
        if _wants_json(request):
            return JSONResponse({"detail": str(err)}, status_code=404)
        return _page(request, "Not found", pages.error(err), status_code=404)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> Response:
        # The traceback goes to the API server's log (Starlette re-raises after this answer), not the page.
        problem = sources.Problem(service="Airloop", detail=f"{type(err).__name__}: {err}")
        if _wants_json(request):
            return JSONResponse(dict(problem), status_code=500)
        return _page(request, "Error", "", [problem], status_code=500)


def _add_api(app: FastAPI) -> None:
    """The data API: what the pages show, as JSON (raw values, times as sent by their source)."""

    @app.get(API + "/loops")
    def api_loops() -> JSONResponse:
        """The Models app's data: one card per loop."""
        return JSONResponse(sources.loops(sources.mlflow_config()))

    @app.get(API + "/models")
    def api_models() -> JSONResponse:
        return JSONResponse(sources.registry(sources.mlflow_config()))

    @app.get(API + "/models/{name}/versions/{version}")
    def api_version(name: str, version: str) -> JSONResponse:
        config = sources.mlflow_config()
        view: sources.VersionView = {
            "model_name": name,
            "version": sources.model_version(config, name, version),
            "audit": sources.audit(config, name, version, _audit_root()),
        }
        return JSONResponse(view)

    @app.get(API + "/serving")
    def api_serving() -> JSONResponse:
        return JSONResponse(sources.serving(sources.rollouts(sources.artefact_dir())))

    @app.get(API + "/rollouts")
    def api_rollouts() -> JSONResponse:
        return JSONResponse(sources.rollouts(sources.artefact_dir()))

    @app.get(API + "/drift")
    def api_drift() -> JSONResponse:
        return JSONResponse(sources.drift(sources.artefact_dir()))


def _add_pages(app: FastAPI) -> None:
    @app.get(pages.STYLESHEET_PATH)
    def stylesheet() -> Response:
        return Response(pages.STYLESHEET, media_type="text/css")

    @app.get(BUNDLE_ROUTE)
    def bundle() -> FileResponse:
        """The React app (``react_apps``), built from ``ui/app`` by the setup and shipped in the wheel."""
        if not BUNDLE.is_file():
            raise sources.NotFound(f"The Airloop app is not built: {BUNDLE} is missing (run `make setup`)")
        return FileResponse(BUNDLE, media_type="text/javascript", headers={"Cache-Control": "no-cache"})

    @app.get("/models")
    def models_page(request: Request) -> HTMLResponse:
        models = sources.registry(sources.mlflow_config())
        return _page(request, "Models", pages.models(_root(request), models), _down(_live()))

    @app.get("/models/{name}/versions/{version}")
    def version_page(request: Request, name: str, version: str) -> HTMLResponse:
        config = sources.mlflow_config()
        found = sources.model_version(config, name, version)
        audit = sources.audit(config, name, version, _audit_root())
        body = pages.version(_root(request), found, audit)
        return _page(request, f"{name} version {version}", body, _down(_live()))

    @app.get("/rollouts")
    def rollouts_page(request: Request) -> HTMLResponse:
        reports = sources.rollouts(sources.artefact_dir())
        live = sources.serving(reports)
        body = pages.rollouts(_root(request), reports, live)
        return _page(request, "Rollouts", body, _down(live))

    @app.get("/drift")
    def drift_page(request: Request) -> HTMLResponse:
        body = pages.drift(_root(request), sources.drift(sources.artefact_dir()))
        return _page(request, "Drift", body, _down(_live()))

    @app.get(FILES_ROUTE + "/{relative:path}")
    def artefact(relative: str) -> FileResponse:
        """Reports in the artefact store, the target of the provider's extra links."""
        path = sources.artefact_file(sources.artefact_dir(), relative)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers={"Content-Security-Policy": FILE_CSP})


def create_app() -> FastAPI:
    # No OpenAPI or docs pages: they would load scripts from a CDN.
    app = FastAPI(
        title="Airloop",
        dependencies=[Depends(authenticated)],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Endpoint) -> Response:
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        return response

    _add_handlers(app)
    _add_api(app)
    _add_pages(app)
    return app
