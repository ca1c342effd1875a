"""The Airloop UI plugin against a real MLflow registry (SQLite), real report files and Airflow's auth."""

from __future__ import annotations

import html
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI
from starlette.testclient import TestClient

from airloop.plugins.ui import BUNDLE, URL_PREFIX
from airloop.plugins.ui.app import FILE_CSP, PAGE_CSP, create_app
from airloop.plugins.ui.plugin import AirloopPlugin, base_path
from airloop.plugins.ui.sources import HEADLINE_TAG, UI_HTTP
from airloop.ports import free_port
from tests.fakes.gateway import local_deployment

SCRIPT = "<script>alert(1)</script>"
# The DAG run that registered version 2 (Airflow's tags on the version).
DAG_RUN = {"airflow.dag_id": "airloop_loop", "airflow.run_id": "manual__2026-01-01T00:00:00+00:00"}
LONG_FLOAT = 0.0360234998879605


@pytest.fixture(scope="module")
def token() -> str:
    """A JWT for the admin user, checked by the plugin exactly as the API server checks its own."""
    from airflow.api_fastapi.app import create_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.utils.db import initdb

    initdb()  # token checks look up the revoked-token table
    return create_auth_manager().generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))


@pytest.fixture(scope="module")
def expired_token(token: str) -> str:
    """The admin's session cookie of yesterday."""
    from airflow.api_fastapi.app import create_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    user = SimpleAuthManagerUser(username="admin", role="admin")
    return create_auth_manager().generate_jwt(user, expiration_time_in_seconds=-3600)


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
    for number, accuracy in enumerate((0.91, 0.93, 0.95, 0.89), start=1):
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "accuracy", accuracy)
        if number == 3:
            client.log_metric(run.info.run_id, "log_loss", LONG_FLOAT)
        tags = DAG_RUN if number == 2 else {}
        client.create_model_version(
            "churn", f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags
        )
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
    # Paths the plugin serves (when the files exist), and one it does not.
    append_audit(
        {
            "tracking_uri": uri,
            "model_name": "churn",
            "version": "1",
            "records": {
                "validation": {"docs": "validation/airloop_loop/run/validate/data_docs/index.html"},
                "rollout": {
                    "decision": "promoted",
                    "report": "rollouts/churn/a.json",
                    "started": "2026-01-01T00:00:00+00:00",
                    "earlier": [{"attempt": 1, "report": "rollouts/churn/gone.json", "decision": "aborted"}],
                },
            },
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


def _mlflow_connection(monkeypatch: pytest.MonkeyPatch, host: str, **extra: str) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_DEFAULT", json.dumps({"conn_type": "mlflow", "host": host, "extra": extra})
    )


def _server() -> FastAPI:
    """The app mounted the way the API server mounts plugin apps, so links carry the prefix."""
    server = FastAPI()
    server.mount(URL_PREFIX, create_app())
    return server


@pytest.fixture
def client(token: str, tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    _mlflow_connection(monkeypatch, tracking_uri)
    with TestClient(_server(), cookies={"_token": token}) as test_client:
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
    [app] = plugin.react_apps
    assert app["name"] == "Airloop" and app["url_route"] == "airloop" and app["destination"] == "nav"
    assert app["bundle_url"] == "/airloop/static/airloop.js"
    [view] = plugin.external_views
    assert view["href"] == "/airloop/models"
    assert view["destination"] == "nav"
    assert view["name"] == "Airloop reports" and view["url_route"] != app["url_route"]
    # Its lists are its own: the base class's, shared by every plugin, are left empty.
    assert AirflowPlugin.fastapi_apps == [] and AirflowPlugin.external_views == []
    assert AirflowPlugin.react_apps == []


def test_the_app_bundle_is_served_as_a_script_that_defines_the_plugin(client: TestClient) -> None:
    """The bundle `make setup` builds from ui/app: a UMD script on the host's React and Chakra UI."""
    if not BUNDLE.is_file():
        pytest.skip(f"the app is not built ({BUNDLE}): make setup")
    response = client.get("/airloop/static/airloop.js")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/javascript")
    script = response.text
    assert "AirflowPlugin=" in script and "e.ChakraUI" in script and "e.React," in script
    assert "Rollout in progress" in script  # the Models page
    with TestClient(_server(), follow_redirects=False) as anonymous:
        assert anonymous.get("/airloop/static/airloop.js").status_code == 303  # a login first


def test_hrefs_follow_api_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/team-a/")
    assert base_path() == "/team-a"


LOGIN = "/api/v2/auth/login?next="


@pytest.mark.usefixtures("token")  # the API server's auth manager is up; this client just has no token
def test_pages_send_a_browser_to_airflows_login_and_the_api_answers_json() -> None:
    with TestClient(_server(), follow_redirects=False) as anonymous:
        page = anonymous.get("/airloop/models?sort=name")
        assert page.status_code == 303
        assert page.headers["location"] == LOGIN + quote("/airloop/models?sort=name", safe="")
        forged = anonymous.get("/airloop/models", headers={"Authorization": "Bearer forged"})
        assert forged.status_code == 303 and forged.headers["location"].startswith(LOGIN)
        api = anonymous.get("/airloop/api/models")
        assert api.status_code == 401 and api.json() == {"detail": "Not authenticated"}
        api = anonymous.get("/airloop/api/models", headers={"Authorization": "Bearer forged"})
        assert api.status_code == 403 and api.json() == {"detail": "Invalid JWT token"}


def test_an_expired_session_goes_to_the_login_of_airflow_under_its_base_url(
    expired_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/team-a/")
    with TestClient(_server(), cookies={"_token": expired_token}, follow_redirects=False) as expired:
        page = expired.get("/airloop/models/churn/versions/2")
        assert page.status_code == 303
        assert page.headers["location"] == "/team-a" + LOGIN + quote(
            "/airloop/models/churn/versions/2", safe=""
        )
        api = expired.get("/airloop/api/models")
        assert api.status_code == 401 and api.json() == {"detail": "Token Expired"}


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
    assert "accuracy = 95.0 %" in page  # a rate, as a percentage
    assert "log_loss = 0.0360" in page and str(LONG_FLOAT) not in page  # three significant figures
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
    assert by_version["2"]["dag_run"] == {"dag_id": "airloop_loop", "run_id": DAG_RUN["airflow.run_id"]}
    assert by_version["3"]["dag_run"] is None
    assert by_version["2"]["mlflow_run_url"].startswith("http://127.0.0.1:5000/#/experiments/")
    assert by_version["2"]["mlflow_run_url"].endswith(f"/runs/{by_version['2']['run_id']}")
    assert by_version["2"]["mlflow_version_url"] == "http://127.0.0.1:5000/#/models/churn/versions/2"
    assert isinstance(by_version["2"]["created"], int)


def test_version_page_shows_the_loop_audit_record(client: TestClient) -> None:
    page = client.get("/airloop/models/churn/versions/2").text
    assert "churn version 2" in page
    assert '<span class="alias">champion</span>' in page
    assert "<h3>training <small><time datetime=" in page and "<td>accuracy</td><td>93.0 %</td>" in page
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
    assert "<td>2026-02-01 00:00:00 UTC</td>" not in page  # times are <time> elements, not raw strings
    assert '<time datetime="2026-02-01T00:00:00+00:00">2026-02-01 00:00:00 UTC</time>' in page
    assert "2026-02-01T00:00:00<" not in page
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
    assert "<h2>churn</h2>" in page
    assert 'Features at <time datetime="2026-02-01T00:00:00+00:00">2026-02-01 00:00:00 UTC</time>' in page
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


def test_version_page_links_what_the_plugin_serves_and_the_runs(client: TestClient, artefacts: Path) -> None:
    _write(artefacts / "rollouts/churn/a.json", {"decision": "promoted"})
    _write(artefacts / "validation/airloop_loop/run/validate/data_docs/index.html", "<p>docs</p>")
    page = client.get("/airloop/models/churn/versions/1").text
    assert 'href="/airloop/files/rollouts/churn/a.json"' in page
    assert 'href="/airloop/files/validation/airloop_loop/run/validate/data_docs/index.html"' in page
    # A report that is not on disk stays text.
    assert "rollouts/churn/gone.json" in page and "/airloop/files/rollouts/churn/gone.json" not in page
    assert '<time datetime="2026-01-01T00:00:00+00:00">2026-01-01 00:00:00 UTC</time>' in page
    view = client.get("/airloop/api/models/churn/versions/1").json()
    assert view["audit"]["files"] == {
        "rollouts/churn/a.json": "rollouts/churn/a.json",
        "validation/airloop_loop/run/validate/data_docs/index.html": (
            "validation/airloop_loop/run/validate/data_docs/index.html"
        ),
    }
    assert [stage["stage"] for stage in view["audit"]["stages"]] == ["validation", "rollout"]
    # The MLflow run, in a tab of its own, and the DAG run that registered the version, out of the frame.
    page = client.get("/airloop/models/churn/versions/2").text
    dag_run = quote(DAG_RUN["airflow.run_id"], safe="")
    assert f'<a href="/dags/airloop_loop/runs/{dag_run}" target="_top">DAG run</a>' in page
    assert 'href="http://127.0.0.1:5000/#/experiments/' in page and 'target="_blank"' in page


@pytest.fixture
def refused() -> str:
    """An MLflow that is stopped: nothing listens on its port."""
    return f"http://127.0.0.1:{free_port()}"


def test_mlflow_stopped_is_a_banner_on_the_pages_and_a_503_from_the_api(
    client: TestClient, refused: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _mlflow_connection(monkeypatch, refused)
    for path in ("/airloop/models", "/airloop/models/churn/versions/2"):
        response = client.get(path)
        assert response.status_code == 503, path
        assert response.headers["content-type"].startswith("text/html")
        assert (
            '<div class="banner" role="alert"><strong>MLflow</strong>: MLflow at ' + refused in response.text
        )
        # The UI's own retry settings, not MLflow's default chain of 8 tries.
        assert f"unavailable after {UI_HTTP['max_retries'] + 1} tries" in response.text
        assert "Traceback" not in response.text and 'href="/airloop/rollouts"' in response.text
    api = client.get("/airloop/api/models")
    assert api.status_code == 503
    assert api.json()["service"] == "MLflow" and refused in api.json()["detail"]
    assert client.get("/airloop/api/models/churn/versions/2").json()["service"] == "MLflow"


@pytest.fixture
def silent() -> Iterator[tuple[str, list[socket.socket]]]:
    """An MLflow that accepts connections and never answers (a hung server); the connections it got."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    done.set()
    thread.join()
    for connection in [*accepted, listener]:
        connection.close()


def test_a_hung_mlflow_gets_short_timeouts_and_one_retry(
    client: TestClient, silent: tuple[str, list[socket.socket]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, accepted = silent
    _mlflow_connection(monkeypatch, url, max_retries="8", timeout="120")  # the steps' settings
    response = client.get("/airloop/api/models")
    assert response.status_code == 503
    assert "timed out" in response.json()["detail"]
    # One try and one retry: MLflow's defaults made 8, each waiting 120 s.
    assert len(accepted) == UI_HTTP["max_retries"] + 1


def test_a_name_with_both_quote_characters_is_shown(
    token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    name = """it's "odd\""""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry = MlflowClient(tracking_uri=uri)
    experiment = registry.create_experiment("quotes", artifact_location=(tmp_path / "artefacts").as_uri())
    run = registry.create_run(experiment)
    registry.create_registered_model(name)
    registry.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    _mlflow_connection(monkeypatch, uri)
    with TestClient(_server(), cookies={"_token": token}) as client:
        page = client.get("/airloop/models")
        assert page.status_code == 200
        assert f"<h2>{html.escape(name)}</h2>" in page.text
        link = f"/airloop/models/{quote(name, safe='')}/versions/1"
        assert f'href="{html.escape(link)}"' in page.text
        [model] = client.get("/airloop/api/models").json()
        assert model["name"] == name and [v["version"] for v in model["versions"]] == ["1"]
        assert client.get(link).status_code == 200


def test_an_object_store_that_does_not_answer_is_a_banner_next_to_the_version(
    token: str, tmp_path: Path, refused: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry = MlflowClient(tracking_uri=uri)
    experiment = registry.create_experiment("s3", artifact_location="s3://airloop-ui/mlflow")
    run = registry.create_run(experiment)
    registry.create_registered_model("churn")
    registry.create_model_version("churn", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    # MLflow's artefacts in S3, through an aws connection to an S3 endpoint that is down.
    _mlflow_connection(monkeypatch, uri, aws_conn_id="s3_down")
    aws = {"endpoint_url": refused, "region_name": "us-east-1"}
    connection = {"conn_type": "aws", "login": "key", "password": "secret", "extra": aws}
    monkeypatch.setenv("AIRFLOW_CONN_S3_DOWN", json.dumps(connection))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # boto3's retries of a refused connection: seconds
    with TestClient(_server(), cookies={"_token": token}) as client:
        page = client.get("/airloop/models/churn/versions/1")
        assert page.status_code == 200
        assert "<h2>Loop audit</h2>" in page.text and '<span class="alias">' not in page.text
        assert '<div class="banner" role="alert"><strong>object store</strong>: ' in page.text
        assert refused in page.text and "Traceback" not in page.text
        audit = client.get("/airloop/api/models/churn/versions/1").json()["audit"]
        assert audit["problem"]["service"] == "object store" and audit["stages"] == []


@pytest.fixture
def deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[subprocess.Popen]:
    """Deployment ``churn`` on the local serving target: a real gateway in front of one predictor
    serving version 2; yields the gateway's process."""
    with local_deployment(tmp_path / "serving", "churn", {"2": 100}) as (gateway, connection):
        monkeypatch.setenv("AIRFLOW_CONN_AIRLOOP_SERVING_DEFAULT", json.dumps(connection))
        yield gateway


def test_serving_now_and_a_banner_on_every_page_when_the_gateway_stops(
    client: TestClient, artefacts: Path, deployment: subprocess.Popen
) -> None:
    _write(artefacts / "rollouts/churn/a.json", {"model_name": "churn", "decision": "promoted", "steps": []})
    page = client.get("/airloop/rollouts").text
    assert "<h3>Serving now (local target)</h3>" in page
    healthy = '<span class="good">yes</span>'
    row = f"<td>v2</td><td>2</td><td>100</td><td>live</td><td>{healthy}</td><td>0</td><td>0</td>"
    assert row in page and 'class="banner"' not in page
    [live] = client.get("/airloop/api/serving").json()
    assert live["deployment"] == "churn" and live["model_name"] == "churn" and live["problem"] is None
    assert live["predictors"]["v2"]["weight"] == 100 and live["predictors"]["v2"]["requests"] == 0

    os.killpg(deployment.pid, signal.SIGTERM)
    deployment.wait(timeout=30)
    for path in ("/airloop/rollouts", "/airloop/models", "/airloop/drift"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert '<div class="banner" role="alert"><strong>serving target</strong>: ' in response.text, path
        assert "the gateway of deployment &#x27;churn&#x27; does not answer" in response.text, path
    assert "promoted" in client.get("/airloop/rollouts").text  # the reports still show
    [down] = client.get("/airloop/api/serving").json()
    assert down["problem"]["service"] == "serving target" and down["deployed"] is True


def test_the_data_api_answers_json_for_every_page(client: TestClient, artefacts: Path) -> None:
    _write(artefacts / "rollouts/churn/a.json", {"model_name": "churn", "decision": "promoted"})
    _write(artefacts / "drift/churn/20260101T000000Z/report.json", {"verdict": "no_drift"})
    rollouts = client.get("/airloop/api/rollouts")
    assert rollouts.headers["content-type"] == "application/json"
    assert rollouts.json() == {"churn": [{"model_name": "churn", "decision": "promoted", "file": "a.json"}]}
    assert client.get("/airloop/api/drift").json()["churn"][0]["verdict"] == "no_drift"
    [serving] = client.get("/airloop/api/serving").json()
    assert serving["deployed"] is False and "not deployed" in serving["note"]  # nothing serves it here
    assert "Not served now" in client.get("/airloop/rollouts").text
    version = client.get("/airloop/api/models/churn/versions/2").json()
    assert version["version"]["aliases"] == ["champion"]
    assert version["audit"]["stages"][0]["record"] == {"accuracy": 0.93, "note": SCRIPT}
    assert client.get("/airloop/api/models/churn/versions/99").status_code == 404


def test_the_apps_numbers_and_times() -> None:
    """The app's own tests (``npm test``: node's test runner over ``src/*.test.ts``)."""
    app, npm = BUNDLE.parent.parent / "app", shutil.which("npm")
    if npm is None or not (app / "node_modules").is_dir():
        pytest.skip("npm or the app's packages are missing: make setup")
    done = subprocess.run([npm, "test"], cwd=app, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "# fail 0" in done.stdout and "# pass 0" not in done.stdout


def test_api_loops_has_one_card_per_model_with_its_rollout_and_drift(
    client: TestClient, artefacts: Path
) -> None:
    steps = [
        {"kind": "shadow", "weight": 0, "mirror": 20, "verdict": "pass", "started": "2026-02-01T00:00:00"},
        {"kind": "canary", "weight": 25, "started": "2026-02-01T00:10:00"},  # its window still open
    ]
    under_way = {"model_name": "churn", "champion": "2", "challenger": "3", "phase": "analysing"}
    _write(
        artefacts / "rollouts/churn/b.json",
        {**under_way, "decision": None, "steps": steps, "started": "2026-02-01"},
    )
    _write(
        artefacts / "rollouts/churn/a.json",
        {"model_name": "churn", "decision": "promoted", "started": "2026-01-01"},
    )
    _write(
        artefacts / "drift/churn/20260101T000000Z/report.json", {"verdict": "no_drift", "severity": "none"}
    )
    _write(artefacts / "drift/churn/20260201T000000Z/report.json", {"verdict": "drift", "severity": "high"})
    view = client.get("/airloop/api/loops").json()
    assert view["problems"] == []
    cards = {card["model_name"]: card for card in view["loops"]}
    assert set(cards) == {"churn", "fraud"}
    churn = cards["churn"]
    assert churn["champion"]["version"] == "2" and churn["challenger"]["version"] == "3"
    assert churn["champion"]["mlflow_version_url"].endswith("/models/churn/versions/2")
    # The offline gate's metric, for the versions the aliases name.
    assert churn["headline"] == {"metric": "accuracy", "champion": 0.93, "challenger": 0.95, "previous": 0.91}
    rollout = churn["rollout"]
    assert rollout["file"] == "b.json" and rollout["in_progress"] is True and rollout["phase"] == "analysing"
    assert rollout["steps"] == [
        {"kind": "shadow", "weight": 0, "verdict": "pass"},
        {"kind": "canary", "weight": 25, "verdict": None},
    ]
    assert churn["serving"]["deployment"] == "churn" and "not deployed" in churn["serving"]["note"]
    assert churn["drift"] == {
        "at": "20260201T000000Z",
        "verdict": "drift",
        "severity": "high",
        "has_html": False,
    }
    fraud = cards["fraud"]
    assert fraud["champion"] is None and fraud["headline"] is None
    assert fraud["rollout"] is None and fraud["serving"] is None and fraud["drift"] is None


def test_api_loops_names_the_services_that_do_not_answer(
    client: TestClient, refused: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRLOOP_ARTEFACTS", "s3://bucket/artefacts")
    view = client.get("/airloop/api/loops").json()
    [problem] = view["problems"]
    assert problem["service"] == "artefact store" and "not a local folder" in problem["detail"]
    assert {card["model_name"] for card in view["loops"]} == {"churn", "fraud"}  # MLflow still answers
    _mlflow_connection(monkeypatch, refused)
    down = client.get("/airloop/api/loops")
    assert down.status_code == 503 and down.json()["service"] == "MLflow"


def test_the_headline_metric_follows_the_model_tag(client: TestClient, tracking_uri: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).set_registered_model_tag("churn", HEADLINE_TAG, "log_loss")
    try:
        cards = {card["model_name"]: card for card in client.get("/airloop/api/loops").json()["loops"]}
        # Only version 3 (the challenger) logged log_loss: the others show none, not another metric.
        assert cards["churn"]["headline"] == {
            "metric": "log_loss",
            "champion": None,
            "challenger": LONG_FLOAT,
            "previous": None,
        }
    finally:
        MlflowClient(tracking_uri=tracking_uri).delete_registered_model_tag("churn", HEADLINE_TAG)


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
