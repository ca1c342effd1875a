"""The AirflowPlugin: mounts the Airloop app in the API server and adds it to the UI's navigation.

provider.yaml (``plugins:``) and the ``airflow.plugins`` entry point both name this class, so
``pip install`` brings the pages the provider's extra links point to; no plugins folder is needed.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airloop.plugins.ui import URL_PREFIX, base_path
from airloop.plugins.ui.app import create_app


class AirloopPlugin(AirflowPlugin):
    """Lists of its own, never the base class's: AirflowPlugin's class-level lists are shared."""

    name = "airloop"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Airloop"}]
    external_views = [
        {
            "name": "Airloop",
            "href": f"{base_path()}{URL_PREFIX}/models",
            "destination": "nav",
            "category": "browse",
            "url_route": "airloop",
        }
    ]
