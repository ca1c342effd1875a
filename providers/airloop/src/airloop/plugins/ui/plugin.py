"""The AirflowPlugin: mounts the Airloop app in the API server and adds it to the UI's navigation.

provider.yaml (``plugins:``) and the ``airflow.plugins`` entry point both name this class, so
``pip install`` brings the pages the provider's extra links point to; no plugins folder is needed.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airloop.plugins.ui import BUNDLE_ROUTE, URL_PREFIX, base_path
from airloop.plugins.ui.app import create_app


class AirloopPlugin(AirflowPlugin):
    """Lists of its own, never the base class's: AirflowPlugin's class-level lists are shared."""

    name = "airloop"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Airloop"}]
    # The app, rendered by Airflow's UI in its own look at /plugin/airloop (it imports the bundle).
    react_apps = [
        {
            "name": "Airloop",
            "bundle_url": f"{base_path()}{URL_PREFIX}{BUNDLE_ROUTE}",
            "destination": "nav",
            "category": "browse",
            "url_route": "airloop",
        }
    ]
    # The server-rendered pages (a version's audit record, rollouts, drift) until the app has them.
    external_views = [
        {
            "name": "Airloop reports",
            "href": f"{base_path()}{URL_PREFIX}/models",
            "destination": "nav",
            "category": "browse",
            "url_route": "airloop-reports",
        }
    ]
