"""The provider as a user gets it: the wheel in a fresh virtualenv brings the UI plugin its links open.

Builds the wheel with uv, installs it (base dependencies, pinned to the development environment's
versions, so uv's cache serves them) into a new virtualenv, and asks that environment's Airflow, with
no plugins folder, which plugins it loads and whether the plugin's app answers every extra link that
points into the Airflow UI, and whether the wheel ships the React app's bundle (built, not its source).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

# Runs inside the new virtualenv: what a user's Airflow sees after `pip install`.
PROBE = """
import json, sys
from pathlib import Path
from importlib import import_module

import airloop
from airflow import plugins_manager
from airflow.api_fastapi.app import create_auth_manager
from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
from airflow.utils.db import initdb
from fastapi import FastAPI
from starlette.testclient import TestClient

from airloop.get_provider_info import get_provider_info
from airloop.links.base import ui_base_url

artefacts = Path(sys.argv[1])
plugins = {info["name"]: info for info in plugins_manager.get_plugin_info()}
# Mounted as the API server mounts plugin apps.
server = FastAPI()
apps, _ = plugins_manager.get_fastapi_plugins()
for app in apps:
    server.mount(app["url_prefix"], app["app"])
initdb()  # token checks look up the revoked-token table
token = create_auth_manager().generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))
values = {"ui_url": "http://mlflow.example:5000", "experiment_id": "1", "run_id": "abc",
          "model_name": "churn", "version": "3"}
served, elsewhere = {}, {}
with TestClient(server, cookies={"_token": token}) as client:
    for path in get_provider_info()["extra-links"]:
        module, _, name = path.rpartition(".")
        link = getattr(import_module(module), name)()
        relative = f"reports/{link.key}.html"
        (artefacts / relative).parent.mkdir(parents=True, exist_ok=True)
        (artefacts / relative).write_text(f"<p>{link.name}</p>")
        url = link.format_link(path=relative, **values)
        if url.startswith(ui_base_url() + "/"):
            answer = client.get(url.removeprefix(ui_base_url()))
            served[link.name] = [answer.status_code, answer.text]
        else:
            elsewhere[link.name] = url
    # The React app's bundle, where Airflow's UI imports it from.
    [react_app] = plugins["airloop"]["react_apps"]
    answer = client.get(react_app["bundle_url"])
    bundle = [answer.status_code, answer.headers.get("content-type"), "AirflowPlugin=" in answer.text]
print(json.dumps({
    "bundle": bundle,
    "airloop": airloop.__file__,
    "prefix": sys.prefix,
    "plugin": plugins.get("airloop"),
    "import_errors": plugins_manager.get_import_errors(),
    "served": served,
    "elsewhere": elsewhere,
}, default=str))  # plugin info holds objects: their str(), as `airflow plugins` prints
"""


def _uv() -> str:
    for candidate in (Path(sys.executable).parent / "uv", REPO / ".tools" / "bin" / "uv"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("uv")
    if not found:
        pytest.skip("uv is not installed (make setup installs it)")
    return found


def _run(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The probe's findings in a virtualenv that holds the wheel and its base dependencies only."""
    uv, tmp = _uv(), tmp_path_factory.mktemp("wheel")
    _run(uv, "build", "--wheel", "--out-dir", str(tmp / "dist"), str(REPO / "providers" / "airloop"))
    (wheel,) = (tmp / "dist").glob("airflow_provider_airloop-*.whl")
    freeze = _run(uv, "pip", "freeze", "--python", sys.executable).stdout.splitlines()
    # The development environment holds airloop as an editable install: everything but that is pinned.
    pins = [line for line in freeze if not line.startswith("-e ") and "airflow-provider-airloop" not in line]
    (tmp / "constraints.txt").write_text("\n".join(pins) + "\n")
    venv = tmp / "venv"
    _run(uv, "venv", "--quiet", "--python", sys.executable, str(venv))
    python = str(venv / "bin" / "python")
    _run(uv, "pip", "install", "--quiet", "--python", python, "-c", str(tmp / "constraints.txt"), str(wheel))
    ours = ("AIRFLOW", "AIRLOOP", "PYTHON", "VIRTUAL_ENV")  # the test session's settings stay here
    env = {key: value for key, value in os.environ.items() if not key.startswith(ours)}
    artefacts = tmp / "artefacts"
    env |= {
        "AIRFLOW_HOME": str(tmp / "airflow"),  # no plugins folder there: the entry point must do it
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRLOOP_HOME": str(tmp / "airloop"),
        "AIRLOOP_ARTEFACTS": artefacts.as_uri(),
    }
    artefacts.mkdir()
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    # From a folder outside the repository, so nothing but the new environment can supply airloop.
    probe = _run(python, "-c", PROBE, str(artefacts), env=env, cwd=tmp)
    return {**json.loads(probe.stdout.strip().splitlines()[-1]), "files": names}


def test_airloop_comes_from_the_wheel(installed: dict[str, Any]) -> None:
    assert Path(installed["airloop"]).is_relative_to(installed["prefix"])
    assert "site-packages" in Path(installed["airloop"]).parts
    assert not Path(installed["airloop"]).is_relative_to(REPO / "providers")


def test_airflow_loads_the_plugin_without_a_plugins_folder(installed: dict[str, Any]) -> None:
    plugin = installed["plugin"]
    assert plugin is not None, installed["import_errors"]
    assert plugin["source"].startswith("airflow-provider-airloop==")
    assert [app["url_prefix"] for app in plugin["fastapi_apps"]] == ["/airloop"]
    assert installed["import_errors"] == {}


def test_every_extra_link_into_the_ui_is_served_by_the_plugin(installed: dict[str, Any]) -> None:
    assert set(installed["served"]) == {"Data Docs", "Drift report", "Rollout report"}
    for name, (status, body) in installed["served"].items():
        assert (status, body) == (200, f"<p>{name}</p>"), name
    # The MLflow links open MLflow's own UI.
    assert all(url.startswith("http://mlflow.example:5000/") for url in installed["elsewhere"].values())
    assert set(installed["elsewhere"]) == {"MLflow run", "MLflow model version"}


def test_the_wheel_ships_the_app_bundle_and_not_its_source(installed: dict[str, Any]) -> None:
    assert "airloop/plugins/ui/static/airloop.js" in installed["files"]
    assert not [name for name in installed["files"] if name.startswith("airloop/plugins/ui/app/")]
    status, content_type, defines_plugin = installed["bundle"]
    assert status == 200 and content_type.startswith("text/javascript") and defines_plugin
