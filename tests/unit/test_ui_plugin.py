"""The Airloop UI plugin against a real MLflow registry (SQLite), real report files and Airflow's auth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI
from starlette.testclient import TestClient

from airloop.plugins.ui import URL_PREFIX
from airloop.plugins.ui.app import FILE_CSP, PAGE_CSP, create_app
from airloop.plugins.ui.plugin import AirloopPlugin, base_path

SCRIPT = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def token() -> str:
    """A JWT for the admin user, checked by the plugin exactly as the API server checks its own."""
    from airflow.api_fastapi.app import create_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.utils.db import initdb

    initdb()  # token checks look up the revoked-token table
    return create_auth_manager().generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A registry with two models: aliases champion/challenger/previous, a rejected version, a hostile tag."""
    from mlflow import MlflowClient

    from airloop.tracking.registry import append_audit

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("airloop", artifact_location=(folder / "artefacts").as_uri())
    client.create_registered_model("churn", tags={"owner": SCRIPT}, description="Churn classifier")
    for accuracy in (0.91, 0.93, 0.95, 0.89):
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "accuracy", accuracy)
        client.create_model_version("churn", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_model_version_tag("churn", "4", "airloop.rejected", "true")
    append_audit(
        {
            "tracking_uri": uri,
            "model_name": "churn",
            "version": "2",
            "stage": "training",
            "record": {"accuracy": 0.93, "note": SCRIPT},
        }
    )
    client.set_registered_model_alias("churn", "previous", "1")
    client.set_registered_model_alias("churn", "champion", "2")
    client.set_registered_model_alias("churn", "challenger", "3")
    client.create_registered_model("fraud")
    return uri


@pytest.fixture
def artefacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AIRLOOP_ARTEFACTS", tmp_path.as_uri())
    return tmp_path


@pytest.fixture
def client(token: str, tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_DEFAULT",
        json.dumps({"conn_type": "mlflow", "host": tracking_uri}),
    )
    # Mounted the way the API server mounts plugin apps, so links carry the prefix.
    server = FastAPI()
    server.mount(URL_PREFIX, create_app())
    with TestClient(server, cookies={"_token": token}) as test_client:
        yield test_client


def _write(path: Path, data: dict | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def test_plugin_declares_app_and_nav_entry() -> None:
    plugin = AirloopPlugin
    assert plugin.name == "airloop"
    [mounted] = plugin.fastapi_apps
    assert isinstance(mounted["app"], FastAPI)
    assert mounted["url_prefix"] == "/airloop" and mounted["name"] == "Airloop"
    [view] = plugin.external_views
    assert view["href"] == "/airloop/models"
    assert view["destination"] == "nav"
    assert view["name"] == "Airloop"
    # Its lists are its own: the base class's, shared by every plugin, are left empty.
    assert AirflowPlugin.fastapi_apps == [] and AirflowPlugin.external_views == []


def test_hrefs_follow_api_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/team-a/")
    assert base_path() == "/team-a"


@pytest.mark.usefixtures("token")  # the API server's auth manager is up; this client just has no token
def test_pages_require_an_airflow_login() -> None:
    server = FastAPI()
    server.mount(URL_PREFIX, create_app())
    with TestClient(server) as anonymous:
        assert anonymous.get("/airloop/models").status_code == 401
        assert anonymous.get("/airloop/api/models").status_code == 401
        assert anonymous.get("/airloop/models", headers={"Authorization": "Bearer forged"}).status_code == 403


def test_models_page_lists_versions_aliases_metrics_and_escapes(client: TestClient) -> None:
    response = client.get("/airloop/models")
    assert response.status_code == 200
    assert response.headers["content-security-policy"] == PAGE_CSP
    assert response.headers["x-content-type-options"] == "nosniff"
    page = response.text
    assert "<h2>churn</h2>" in page and "<h2>fraud</h2>" in page
    for alias in ("champion", "challenger", "previous"):
        assert f'<span class="alias">{alias}</span>' in page
    assert 'href="/airloop/models/churn/versions/3"' in page
    assert "accuracy = 0.95" in page
    assert '<span class="bad">rejected</span>' in page
    assert SCRIPT not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'href="/airloop/static/airloop.css"' in page
    assert client.get("/airloop/static/airloop.css").headers["content-type"].startswith("text/css")


def test_api_models_returns_the_registry(client: TestClient) -> None:
    models = {model["name"]: model for model in client.get("/airloop/api/models").json()}
    assert set(models) == {"churn", "fraud"}
    churn = models["churn"]
    assert churn["aliases"] == {"challenger": "3", "champion": "2", "previous": "1"}
    assert [v["version"] for v in churn["versions"]] == ["4", "3", "2", "1"]
    by_version = {v["version"]: v for v in churn["versions"]}
    assert by_version["2"]["aliases"] == ["champion"]
    assert by_version["2"]["metrics"] == {"accuracy": 0.93}
    assert by_version["4"]["rejected"] is True and by_version["3"]["rejected"] is False
    assert churn["tags"] == {"owner": SCRIPT}  # JSON carries raw values; escaping is the HTML's job
    assert models["fraud"]["versions"] == []


def test_version_page_shows_the_loop_audit_record(client: TestClient) -> None:
    page = client.get("/airloop/models/churn/versions/2").text
    assert "churn version 2" in page
    assert '<span class="alias">champion</span>' in page
    assert "<h3>training <small>" in page and "&quot;accuracy&quot;: 0.93" in page
    assert SCRIPT not in page
    assert "No audit record" in client.get("/airloop/models/churn/versions/3").text
    assert client.get("/airloop/models/churn/versions/99").status_code == 404


def test_rollouts_page_shows_latest_reports_first(client: TestClient, artefacts: Path) -> None:
    def report(started: str, decision: str, reasons: list[str]) -> dict:
        shadow = {
            "kind": "shadow",
            "weight": 0,
            "mirror": 37,
            "verdict": "pass",
            "reasons": [],
            "started": started,
            "ended": started,
        }
        step = {
            "kind": "canary",
            "weight": 10,
            "verdict": "fail" if reasons else "pass",
            "reasons": reasons,
            "started": started,
            "ended": started,
        }
        return {
            "deployment": "churn",
            "model_name": "churn",
            "champion": "2",
            "challenger": "3",
            "decision": decision,
            "steps": [shadow, step],
            "started": started,
            "ended": started,
        }

    _write(artefacts / "rollouts/churn/a.json", report("2026-01-01T00:00:00", "promoted", []))
    _write(artefacts / "rollouts/churn/b.json", report("2026-02-01T00:00:00", "rolled_back", [SCRIPT]))
    _write(artefacts / "rollouts/churn/broken.json", "{not json")
    page = client.get("/airloop/rollouts").text
    assert "<h2>churn</h2>" in page
    assert page.index("rolled_back") < page.index("promoted")  # newest first
    assert "unreadable report broken.json" in page
    assert "<td>shadow</td><td>0</td><td>37</td>" in page and "<td>canary</td><td>10</td><td></td>" in page
    assert 'href="/airloop/files/rollouts/churn/b.json"' in page
    served = client.get("/airloop/files/rollouts/churn/b.json")
    assert served.json()["decision"] == "rolled_back"
    assert served.headers["content-security-policy"] == FILE_CSP
    assert SCRIPT not in page and "&lt;script&gt;" in page


def test_drift_page_and_report(client: TestClient, artefacts: Path) -> None:
    features = {
        "tenure": {"statistic": 0.31, "p_value": 0.0001, "drift": True},
        "charges": {"statistic": 0.02, "p_value": 0.6, "drift": False},
    }
    _write(artefacts / "drift/churn/20260101T000000/report.json", {"verdict": "no_drift", "severity": "none"})
    latest = {
        "verdict": "drift",
        "severity": "high",
        "features": features,
        "n_reference": 1000,
        "n_current": 500,
    }
    _write(artefacts / "drift/churn/20260201T000000/report.json", latest)
    _write(artefacts / "drift/churn/20260201T000000/report.html", "<html><body>drift report</body></html>")
    page = client.get("/airloop/drift").text
    assert "<h2>churn</h2>" in page and "Features at 20260201T000000" in page
    assert "tenure" in page and "500" in page
    link = "/airloop/files/drift/churn/20260201T000000/report.html"
    assert f'href="{link}"' in page
    assert "/airloop/files/drift/churn/20260101T000000/report.html" not in page  # no html next to that one
    served = client.get(link)
    assert served.status_code == 200 and "drift report" in served.text
    assert served.headers["content-type"].startswith("text/html")
    assert served.headers["content-security-policy"] == FILE_CSP


def test_files_outside_the_artefact_root_are_refused(client: TestClient, artefacts: Path) -> None:
    outside = artefacts.parent / f"{artefacts.name}-outside"
    _write(outside / "report.html", "secret")
    (artefacts / "drift").mkdir()
    (artefacts / "drift/link").symlink_to(outside)
    for path in (
        f"/airloop/files/%2E%2E/{outside.name}/report.html",
        f"/airloop/files/drift/..%2F..%2F{outside.name}/report.html",
        f"/airloop/files//{outside}/report.html",
        "/airloop/files/drift/link/report.html",
        "/airloop/files/drift/missing.html",
        "/airloop/files/drift/%00.html",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "secret" not in response.text


def test_remote_artefact_root_is_a_clear_error(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRLOOP_ARTEFACTS", "s3://airloop/artefacts")
    response = client.get("/airloop/drift")
    assert response.status_code == 500
    assert "file:// roots only" in response.text


# Runs the `airflow plugins` command, then reports whether loading the plugins imported MLflow.
LIST_PLUGINS = """
import runpy, sys
sys.argv = ["airflow", "plugins", "--output", "json"]
try:
    runpy.run_module("airflow", run_name="__main__")
finally:
    print("mlflow imported:", "mlflow" in sys.modules, file=sys.stderr)
"""


def test_airflow_loads_the_installed_plugin_without_importing_mlflow(tmp_path: Path) -> None:
    # No plugins folder: the provider's entry point brings the plugin.
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path)}
    env.pop("AIRFLOW__CORE__PLUGINS_FOLDER", None)
    listed = subprocess.run(
        [sys.executable, "-c", LIST_PLUGINS], env=env, capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    plugins = {plugin["name"]: plugin for plugin in json.loads(listed.stdout[listed.stdout.index("[") :])}
    assert plugins["airloop"]["external_views"][0]["href"] == "/airloop/models"
    assert "airflow-provider-airloop" in plugins["airloop"]["source"]
    assert "mlflow imported: False" in listed.stderr


# A task whose links have a good value, a value missing a field, a value of the wrong type, or none.
LINKS_DAG = """
from airflow.sdk import DAG, BaseOperator

from airloop.links.mlflow import MlflowModelVersionLink, MlflowRunLink
from airloop.links.reports import DataDocsLink, DriftReportLink, RolloutReportLink


class ProbeOperator(BaseOperator):
    operator_extra_links = (
        MlflowRunLink(), MlflowModelVersionLink(), DataDocsLink(), DriftReportLink(), RolloutReportLink()
    )

    def execute(self, context):
        DataDocsLink.persist(context, path="validation/docs/index.html")
        MlflowRunLink.persist(context, ui_url="http://mlflow:5000")  # no experiment or run id
        context["ti"].xcom_push(key=DriftReportLink.key, value="not a mapping")


with DAG("links_probe", schedule=None):
    ProbeOperator(task_id="probe")
"""

# Runs the task with dag.test(), then prints its state and the link URLs the UI would be given.
RUN_LINKS_DAG = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
from airflow.models.xcom import XComModel
from airflow.utils.db import initdb
from airflow.utils.session import create_session
from sqlalchemy import select

initdb()
run = DagBag(dag_folder=sys.argv[1]).get_dag("links_probe").test()
with create_session() as session:
    links = dict(session.execute(
        select(XComModel.key, XComModel.value).where(XComModel.key.like("_link_%"))
    ).all())
print(json.dumps({"state": str(run.state), "links": links}))
"""


def test_links_without_a_usable_value_are_hidden_not_errors(tmp_path: Path) -> None:
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "links_probe.py").write_text(LINKS_DAG)
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__API__BASE_URL": "http://airflow.example",
    }
    done = subprocess.run(
        [sys.executable, "-c", RUN_LINKS_DAG, str(dags)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["state"] == "success"
    # Airflow pushes each link's URL when the task ends; "" is shown as no link at all.
    assert result["links"] == {
        "_link_DataDocsLink": "http://airflow.example/airloop/files/validation/docs/index.html",
        "_link_MlflowRunLink": "",
        "_link_MlflowModelVersionLink": "",
        "_link_DriftReportLink": "",
        "_link_RolloutReportLink": "",
    }
    assert "Failed to push an xcom for task operator extra link" not in done.stdout + done.stderr
