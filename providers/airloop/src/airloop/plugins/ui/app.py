"""The FastAPI app that Airflow's API server mounts under ``/airloop``: Airflow's login, strict headers."""

from __future__ import annotations

import mimetypes
from collections.abc import Awaitable, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from airloop.plugins.ui import FILES_ROUTE, pages, sources

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


def _page(request: Request, title: str, body: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(pages.page(_root(request), title, body), status_code=status_code)


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

    @app.exception_handler(ValueError)
    async def configuration_error(request: Request, err: ValueError) -> Response:
        if request.url.path.endswith("/api/models"):
            return JSONResponse({"detail": str(err)}, status_code=500)
        return _page(request, "Configuration error", pages.error(err), status_code=500)

    @app.exception_handler(sources.NotFound)
    async def not_found(request: Request, err: sources.NotFound) -> Response:
        return JSONResponse({"detail": str(err)}, status_code=404)

    @app.get(pages.STYLESHEET_PATH)
    def stylesheet() -> Response:
        return Response(pages.STYLESHEET, media_type="text/css")

    @app.get("/api/models")
    def api_models() -> JSONResponse:
        return JSONResponse(sources.registry(sources.mlflow_config()))

    @app.get("/models")
    def models_page(request: Request) -> HTMLResponse:
        models = sources.registry(sources.mlflow_config())
        return _page(request, "Models", pages.models(_root(request), models))

    @app.get("/models/{name}/versions/{version}")
    def version_page(request: Request, name: str, version: str) -> HTMLResponse:
        config = sources.mlflow_config()
        found = sources.model_version(config, name, version)
        stages, reason = sources.audit(config, name, version)
        return _page(request, f"{name} version {version}", pages.version(found, stages, reason))

    @app.get("/rollouts")
    def rollouts_page(request: Request) -> HTMLResponse:
        reports = sources.rollouts(sources.artefact_dir())
        return _page(request, "Rollouts", pages.rollouts(_root(request), reports))

    @app.get("/drift")
    def drift_page(request: Request) -> HTMLResponse:
        return _page(request, "Drift", pages.drift(_root(request), sources.drift(sources.artefact_dir())))

    @app.get(FILES_ROUTE + "/{relative:path}")
    def artefact(relative: str) -> FileResponse:
        """Reports in the artefact store, the target of the provider's extra links."""
        path = sources.artefact_file(sources.artefact_dir(), relative)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers={"Content-Security-Policy": FILE_CSP})

    return app
