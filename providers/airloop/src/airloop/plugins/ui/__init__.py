"""Airloop pages in the Airflow UI: registered models, loop audit records, rollouts and drift reports.

``plugin`` holds the AirflowPlugin, ``app`` the FastAPI app it mounts under ``URL_PREFIX``, ``sources``
what the pages show and ``pages`` the escaped HTML. Every Airflow component imports the plugin, so
only FastAPI and Airflow's configuration load with it; MLflow, the provider's hooks and the API
server's security module are imported inside the request handlers. This module imports nothing, so
the extra links can build their URLs from the same constants.
"""

URL_PREFIX = "/airloop"
# Files under the artefact root (Data Docs, drift and rollout reports): the extra links' target.
FILES_ROUTE = "/files"
