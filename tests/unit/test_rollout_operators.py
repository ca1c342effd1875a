"""The rollout operators as Airflow sees them: names, arguments that are the request's fields, and the
checks that run before anything is deployed. The rollout itself runs in tests/integration/test_rollout.py."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import sys
from pathlib import Path

import pytest

from airloop.operators.rollout import RolloutChallengerOperator, RolloutFinishOperator
from airloop.serving.base import get_target
from airloop.steps.rollout.requests import RolloutRequest
from airloop.steps.rollout.rollout import Rollout
from airloop.triggers.rollout import RolloutTrigger

# The MLflow connection's settings come from the hook, not from operator arguments.
MLFLOW_FIELDS = {"tracking_uri", "artifact_root", "auth", "http", "s3"}
CONNECTIONS = {"mlflow_conn_id", "serving_conn_id", "deferrable", "kwargs"}


@pytest.mark.parametrize(
    ("module", "old", "new"),
    [
        ("airloop.operators.rollout", "SeldonRolloutChallengerOperator", RolloutChallengerOperator),
        ("airloop.operators.rollout", "SeldonFinishRolloutOperator", RolloutFinishOperator),
        ("airloop.triggers.rollout", "SeldonCanaryAnalysisTrigger", RolloutTrigger),
    ],
)
def test_the_seldon_names_are_deprecated_aliases(module, old, new):
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated: use {new.__name__}"):
        assert getattr(importlib.import_module(module), old) is new


@pytest.mark.parametrize(
    ("module", "names"),
    [
        ("airloop.operators.seldon", {"SeldonRolloutChallengerOperator": RolloutChallengerOperator}),
        ("airloop.triggers.seldon", {"SeldonCanaryAnalysisTrigger": RolloutTrigger}),
    ],
)
def test_the_old_modules_import_with_a_deprecation_warning(module, names):
    sys.modules.pop(module, None)
    with pytest.warns(DeprecationWarning, match=f"{module} is deprecated"):
        imported = importlib.import_module(module)
    assert {name: getattr(imported, name) for name in names} == names


def test_the_operator_takes_the_request_fields_under_their_names_and_defaults():
    fields = {f.name: f for f in dataclasses.fields(RolloutRequest) if f.name not in MLFLOW_FIELDS}
    parameters = inspect.signature(RolloutChallengerOperator.__init__).parameters
    arguments = {name: p for name, p in parameters.items() if name != "self" and name not in CONNECTIONS}
    assert set(arguments) == set(fields)
    for name, field in fields.items():
        if field.default is not dataclasses.MISSING:
            assert arguments[name].default == field.default, name
        elif field.default_factory is not dataclasses.MISSING:
            assert arguments[name].default is None, name  # None stands for the factory's value
        else:
            assert arguments[name].default is inspect.Parameter.empty, name
    assert set(RolloutChallengerOperator.template_fields) <= set(arguments)


def test_the_request_holds_what_templates_render():
    operator = RolloutChallengerOperator(
        task_id="rollout",
        model_name="m",
        version=3,
        approval="True",
        analysis_seconds="2.5",
        allow_rejected="false",
        steps=[25, 100],
    )
    request = operator.request()
    assert (request.version, request.approval, request.allow_rejected) == ("3", True, False)
    assert (request.analysis_seconds, request.steps, request.criteria) == (2.5, (25, 100), {})
    assert RolloutRequest.parse(json.loads(json.dumps(request.to_dict()))) == request  # a runtime hop
    with pytest.raises(ValueError, match="approval must be true or false, got 'yes'"):
        RolloutRequest(tracking_uri="sqlite://", model_name="m", version="3", approval="yes")


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"steps": (50, 25, 100)}, "steps must rise from above 0 to 100 with at least one step below 100"),
        ({"steps": (100,)}, "with at least one step below 100"),
        ({"steps": (10, 50)}, "steps must rise from above 0 to 100"),
        ({"mode": "blue-green"}, "mode must be one of"),
        ({"mode": "shadow", "shadow_percent": 0}, "mirrored percentage"),
        ({"criteria": {"min_reqests": 5}}, "unknown canary criteria"),
    ],
)
def test_a_bad_plan_fails_before_anything_is_deployed(tmp_path: Path, changes, error):
    request = RolloutRequest(tracking_uri="sqlite://", model_name="m", version="3", deployment="d", **changes)
    # No registry, no deployment: the checks come first.
    with pytest.raises(ValueError, match=error):
        Rollout(request, get_target("local", home=str(tmp_path / "serving")), tmp_path).start()
    assert not (tmp_path / "rollouts").exists()


def test_each_attempt_has_its_own_report(tmp_path: Path):
    rollout = Rollout(
        RolloutRequest(tracking_uri="sqlite://", model_name="churn-v2", version="3", deployment="d"),
        get_target("local", home=str(tmp_path / "serving")),
        tmp_path,
    )
    assert rollout.reports.path() == "rollouts/d/churn-v2-v3.json"  # the first, before any exists
    folder = tmp_path / "rollouts" / "d"
    folder.mkdir(parents=True)
    for name in (
        "churn-v2-v3.json",
        "churn-v2-v3-attempt-2.json",
        "churn-v2-v31.json",
        "churn-v2-v3.json.tmp",
    ):
        (folder / name).write_text(json.dumps({"attempt": 0, "name": name}))
    assert rollout.reports.path() == "rollouts/d/churn-v2-v3-attempt-2.json"
    assert rollout.reports.load(1) == {"attempt": 0, "name": "churn-v2-v3.json"}
    assert rollout.reports.load() == {"attempt": 0, "name": "churn-v2-v3-attempt-2.json"}


def test_the_finish_operator_names_the_missing_report(tmp_path: Path):
    rollout = Rollout(
        RolloutRequest(tracking_uri="sqlite://", model_name="m", version="3", deployment="d"),
        get_target("local", home=str(tmp_path / "serving")),
        tmp_path,
    )
    with pytest.raises(ValueError, match="no rollout report at rollouts/d/m-v3.json: nothing to finish"):
        rollout.decide(approved=True, by="ops", reason="approved by ops")
    assert RolloutFinishOperator.template_fields == (
        "model_name",
        "version",
        "deployment",
        "approval_task_id",
    )
