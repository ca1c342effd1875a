"""Airloop pages in the Airflow UI: registered models, loop audit records, rollouts and drift reports.

``plugin`` holds the AirflowPlugin, ``app`` the FastAPI app it mounts under ``URL_PREFIX`` (the data
API under ``/api`` and the HTML pages), ``sources`` what both show and ``pages`` the escaped HTML.
Every Airflow component imports the plugin, so only FastAPI and Airflow's configuration load with it;
MLflow, the provider's hooks and the API server's security module are imported inside the request
handlers. This module imports only the standard library at its top, so the extra links can build
their URLs from the same constants.
"""

from urllib.parse import urlsplit

URL_PREFIX = "/airloop"
# Files under the artefact root (Data Docs, drift and rollout reports): the extra links' target.
FILES_ROUTE = "/files"


def base_path() -> str:
    """Path part of ``[api] base_url``, without a trailing slash ("" when Airflow is served at the root)."""
    from airflow.configuration import conf

    return urlsplit(conf.get("api", "base_url", fallback="")).path.rstrip("/")
