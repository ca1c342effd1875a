"""The Airloop app in a real browser: the embedded default's Airflow, Debian's Chromium driven by
Playwright. A user logs in, opens the Models app in Airflow's UI and sees each loop's champion, its
headline metric, the live traffic split of a real gateway, the rollout under way and the drift verdict.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airloop.embedded.standalone import USERNAME, Standalone, airflow_env
from airloop.plugins.ui import BUNDLE
from airloop.ports import free_port
from tests.fakes.gateway import local_deployment

pytestmark = pytest.mark.integration

CHROMIUM = "chromium"  # Debian's package (make system); Playwright's own browsers are never downloaded


def _registry(folder: Path) -> str:
    """Model ``churn``: versions 1-3 (accuracy 0.91, 0.93, 0.95), champion 2, challenger 3, previous 1."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("airloop", artifact_location=(folder / "artefacts").as_uri())
    client.create_registered_model("churn", description="Churn classifier")
    for accuracy in (0.91, 0.93, 0.95):
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "accuracy", accuracy)
        client.create_model_version("churn", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    for alias, version in (("previous", "1"), ("champion", "2"), ("challenger", "3")):
        client.set_registered_model_alias("churn", alias, version)
    return uri


def _reports(artefacts: Path) -> None:
    """A rollout of version 3 at its 10 % canary window, and the model's latest drift report."""
    rollout = {
        "deployment": "churn",
        "model_name": "churn",
        "champion": "2",
        "challenger": "3",
        "phase": "analysing",
        "decision": None,
        "started": "2026-02-01T00:00:00+00:00",
        "steps": [
            {
                "kind": "shadow",
                "weight": 0,
                "mirror": 20,
                "verdict": "pass",
                "started": "2026-02-01T00:00:00",
            },
            {"kind": "canary", "weight": 10, "started": "2026-02-01T00:10:00"},
        ],
    }
    drift = {"verdict": "no_drift", "severity": "none", "n_reference": 2000, "n_current": 500}
    for path, data in (
        ("rollouts/churn/churn-v3.json", rollout),
        ("drift/churn/20260201T000000Z/report.json", drift),
    ):
        (artefacts / path).parent.mkdir(parents=True, exist_ok=True)
        (artefacts / path).write_text(json.dumps(data))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Standalone, subprocess.Popen]]:
    """The embedded Airflow over the registry, the reports and deployment ``churn``; and its gateway."""
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} is not installed (make system installs Debian's)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not BUNDLE.is_file():
        pytest.skip(f"the Airloop app is not built ({BUNDLE}): make setup")
    home = tmp_path_factory.mktemp("browser")
    (home / "dags").mkdir()
    (home / "artefacts").mkdir()
    _reports(home / "artefacts")
    with contextlib.ExitStack() as stack:
        gateway, serving = stack.enter_context(
            local_deployment(home / "serving", "churn", {"2": 90, "3": 10})
        )
        with pytest.MonkeyPatch.context() as patch:
            for key in [k for k in os.environ if k.startswith("AIRFLOW")]:
                patch.delenv(key)  # the test session's Airflow settings are not this Airflow's
            env = airflow_env(home / "airflow", home / "dags", free_port())
        env |= {
            "AIRFLOW_CONN_MLFLOW_DEFAULT": json.dumps({"conn_type": "mlflow", "host": _registry(home)}),
            "AIRFLOW_CONN_AIRLOOP_SERVING_DEFAULT": json.dumps(serving),
            "AIRLOOP_ARTEFACTS": (home / "artefacts").as_uri(),
        }
        standalone = Standalone(env, home / "airflow.log")
        stack.callback(standalone.stop)
        standalone.start()
        yield standalone, gateway


@pytest.fixture(scope="module")
def airflow(world: tuple[Standalone, subprocess.Popen]) -> Standalone:
    return world[0]


@pytest.fixture(scope="module")
def session(airflow: Standalone) -> Iterator[Any]:
    """A browser that logged in through Airflow's login page, as a user does."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox needs user namespaces, which containers running as root lack.
        browser = playwright.chromium.launch(executable_path=shutil.which(CHROMIUM), args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        page = context.new_page()
        page.goto(f"{airflow.url}/plugin/airloop")
        # Not logged in: Airflow's login page, which comes back to the app.
        page.get_by_label("Username").fill(USERNAME)
        page.get_by_label("Password").fill(airflow.password)
        page.get_by_role("button", name="Sign in").click()
        expect(page).to_have_url(f"{airflow.url}/plugin/airloop", timeout=60_000)
        page.close()
        yield context
        browser.close()


def test_a_user_sees_each_loop_in_the_models_app(airflow: Standalone, session: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page = session.new_page()
    page.goto(f"{airflow.url}/plugin/airloop")
    card = page.get_by_test_id("airloop-card").filter(has_text="churn")
    try:
        champion = card.get_by_test_id("airloop-champion")
        expect(champion).to_contain_text("version 2", timeout=60_000)
        expect(champion).to_contain_text("accuracy 93.0 %")
        expect(champion).to_contain_text("+2.00 pp vs the previous champion")
        expect(card.get_by_test_id("airloop-challenger")).to_contain_text("version 3")
        expect(card.get_by_test_id("airloop-challenger")).to_contain_text(
            "accuracy 95.0 % (+2.00 pp vs champion)"
        )
        # The live split, as the gateway routes it.
        traffic = card.get_by_test_id("airloop-traffic")
        expect(traffic).to_have_attribute(
            "aria-label", "Traffic split: version 2 champion 90 %, version 3 challenger 10 %"
        )
        expect(traffic).to_contain_text("v2 90 %")
        rollout = card.get_by_test_id("airloop-rollout")
        expect(rollout).to_contain_text("Rollout in progress")
        expect(rollout).to_contain_text("analysing, canary 10 %")
        expect(card.get_by_test_id("airloop-drift")).to_contain_text("no_drift")
        expect(page.get_by_test_id("airloop-banner")).to_have_count(0)
        expect(card).not_to_contain_text("does not answer now")
    finally:
        page.screenshot(path=str(tmp_path / "models.png"), full_page=True)
        page.close()
    assert (tmp_path / "models.png").stat().st_size > 0


def test_a_serving_target_that_stops_is_a_banner_above_the_cards(
    world: tuple[Standalone, subprocess.Popen], session: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    airflow, gateway = world
    os.killpg(gateway.pid, signal.SIGTERM)
    gateway.wait(timeout=30)
    page = session.new_page()
    page.goto(f"{airflow.url}/plugin/airloop")
    try:
        banner = page.get_by_test_id("airloop-banner")
        expect(banner).to_contain_text("serving target does not answer", timeout=60_000)
        expect(banner).to_contain_text("churn")
        # The registry still answers: the card stays; the split is the target's last word, and says so.
        card = page.get_by_test_id("airloop-card").filter(has_text="churn")
        expect(card.get_by_test_id("airloop-champion")).to_contain_text("version 2")
        expect(card).to_contain_text("as it last reported: it does not answer now")
    finally:
        page.screenshot(path=str(tmp_path / "serving-down.png"), full_page=True)
        page.close()
