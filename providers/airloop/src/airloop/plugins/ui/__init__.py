"""Airloop pages in the Airflow UI: registered models, loop audit records, rollouts and drift reports.

``plugin`` holds the AirflowPlugin, ``app`` the FastAPI app it mounts under ``URL_PREFIX`` (the data
API under ``/api``, the HTML pages and the React app's bundle), ``sources`` what they show and ``pages``
the escaped HTML. ``app/`` is the React app's source (TypeScript, built by ``make setup``).
Every Airflow component imports the plugin, so only FastAPI and Airflow's configuration load with it;
MLflow, the provider's hooks and the API server's security module are imported inside the request
handlers. This module imports only the standard library at its top, so the extra links can build
their URLs from the same constants.
"""

from pathlib import Path
from urllib.parse import urlsplit

URL_PREFIX = "/airloop"
# Files under the artefact root (Data Docs, drift and rollout reports): the extra links' target.
FILES_ROUTE = "/files"
# The React app's bundle: built from ``app/`` into ``static/`` (ignored by git, included in the wheel).
BUNDLE = Path(__file__).parent / "static" / "airloop.js"
BUNDLE_ROUTE = "/static/airloop.js"


def base_path() -> str:
    """Path part of ``[api] base_url``, without a trailing slash ("" when Airflow is served at the root)."""
    from airflow.configuration import conf

    return urlsplit(conf.get("api", "base_url", fallback="")).path.rstrip("/")
