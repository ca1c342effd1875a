"""The embedded default's private Airflow keeps its login: ``airloop loop --keep-running`` leaves it up
for anyone on the machine, so no visitor is an admin without the generated password."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from airloop.embedded.standalone import USERNAME, Standalone, airflow_env
from airloop.ports import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Standalone]:
    home, dags = tmp_path_factory.mktemp("standalone"), tmp_path_factory.mktemp("dags")
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith("AIRFLOW")]:
            patch.delenv(key)  # the test session's Airflow settings are not the runner's
        env = airflow_env(home / "airflow", dags, free_port())
    standalone = Standalone(env, home / "airflow.log")
    try:
        standalone.start()
        yield standalone
    finally:
        standalone.stop()


def test_the_runner_logs_in_with_the_generated_password(airflow: Standalone) -> None:
    password = airflow.password
    assert password and Path(airflow.passwords_file).is_file()
    assert airflow.http.get("/dags").status_code == 200  # the runner's client carries a token
    refused = httpx.post(f"{airflow.url}/auth/token", json={"username": USERNAME, "password": "admin"})
    assert refused.status_code == 401


def test_visitors_without_a_login_are_refused(airflow: Standalone) -> None:
    assert httpx.get(f"{airflow.url}/api/v2/dags").status_code == 401
    assert httpx.post(f"{airflow.url}/api/v2/connections", json={"connection_id": "x"}).status_code == 401
    # The Airloop pages send a browser to Airflow's login page, which answers.
    page = httpx.get(f"{airflow.url}/airloop/models")
    assert page.status_code == 303
    assert page.headers["location"] == f"/api/v2/auth/login?next={quote('/airloop/models', safe='')}"
    login = httpx.get(f"{airflow.url}{page.headers['location']}", follow_redirects=True)
    assert login.status_code == 200 and login.url.path.startswith("/auth/login")
    # Their data API answers JSON.
    api = httpx.get(f"{airflow.url}/airloop/api/models")
    assert api.status_code == 401 and api.json() == {"detail": "Not authenticated"}
