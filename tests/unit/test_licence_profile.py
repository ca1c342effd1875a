"""The licence-clean profile (``AIRLOOP_PROFILE=licence-clean``): every Business-Source-licensed backend
is refused by name, and the defaults move to MLServer and SciPy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from airloop import settings
from airloop.serving.base import get_target
from airloop.serving.local import LocalServingTarget
from airloop.steps.drift import base as detectors

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean(monkeypatch):
    monkeypatch.setenv(settings.PROFILE_ENV, settings.LICENCE_CLEAN)


def test_the_default_profile_keeps_every_backend(monkeypatch):
    monkeypatch.delenv(settings.PROFILE_ENV, raising=False)
    assert settings.profile() == "default" and not settings.licence_clean()
    assert detectors.get("alibi").__name__ == "AlibiDetector"
    assert LocalServingTarget().server == "seldon"


def test_an_unknown_profile_is_named(monkeypatch):
    monkeypatch.setenv(settings.PROFILE_ENV, "clean")
    with pytest.raises(
        ValueError, match=r"AIRLOOP_PROFILE='clean' is not a profile: choose one of \['default'"
    ):
        settings.profile()


def test_business_source_backends_are_refused_by_name(clean, tmp_path):
    with pytest.raises(ValueError, match=r"drift backend 'alibi' is published under the Business Source"):
        detectors.get("alibi")
    assert detectors.get("scipy").__name__ == "ScipyDetector"
    with pytest.raises(ValueError, match=r"serving target 'seldon' .* choose one of \['kserve', 'local'"):
        get_target("seldon")
    with pytest.raises(ValueError, match=r"server 'seldon' \(Seldon's wrapper\) .* use 'mlserver'"):
        LocalServingTarget(str(tmp_path), server="seldon").deploy("clean", [])
    assert LocalServingTarget().server == "mlserver"


def test_a_spec_naming_alibi_fails_at_parse_time(clean):
    from airloop.loops.spec import SpecError, parse

    raw = {
        "name": "churn",
        "data": {"uri": "s3://lake/churn/"},
        "label": "churned",
        "model": {"estimator": "sklearn.ensemble.RandomForestClassifier"},
        "suite": "churn.suite.json",
        "drift": {"backend": "alibi"},
    }
    with pytest.raises(SpecError) as caught:
        parse(raw, base="/specs")
    assert caught.value.problems == [
        "drift.backend: 'alibi' (alibi-detect) is published under the Business Source License, which the "
        "licence-clean profile (AIRLOOP_PROFILE) leaves out: use 'scipy'"
    ]


@pytest.mark.parametrize(
    ("profile", "backend", "runtime"), [("", "alibi", "serving"), ("licence-clean", "scipy", "worker")]
)
def test_the_reference_drift_monitor_tests_with_scipy_in_the_profile(profile, backend, runtime):
    code = (
        "import runpy; dag = runpy.run_path('dags/airloop_drift_monitor.py')['airloop_drift_monitor'](); "
        "task = dag.get_task('detect'); print(task.backend, task.runtime)"
    )
    env_line = f"import os; os.environ['AIRLOOP_PROFILE'] = {profile!r}; "
    done = subprocess.run(
        [sys.executable, "-c", env_line + code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.split()[-2:] == [backend, runtime]
