"""Hooks own their connections; without the default one they fall back to the embedded default."""

from __future__ import annotations

import json
import os

import pytest

from airloop import settings
from airloop.hooks.mlflow import MlflowHook
from airloop.hooks.serving import ServingHook
from airloop.tracking.session import Settings


def test_mlflow_hook_reads_its_connection(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_PROD",
        json.dumps(
            {
                "conn_type": "mlflow",
                "host": "http://mlflow.internal",
                "port": 5000,
                "extra": {"ui_url": "https://mlflow.example.com/", "artifact_root": "s3://models/mlflow"},
            }
        ),
    )
    hook = MlflowHook(mlflow_conn_id="mlflow_prod")
    assert hook.tracking_uri == "http://mlflow.internal:5000"
    assert hook.ui_url == "https://mlflow.example.com"
    # No credentials, retries or AWS connection set: the request carries none.
    assert hook.step_config() == {
        "tracking_uri": "http://mlflow.internal:5000",
        "artifact_root": "s3://models/mlflow",
    }


def test_mlflow_hook_without_default_connection_uses_the_embedded_mlflow():
    hook = MlflowHook()
    assert hook.tracking_uri == settings.mlflow_tracking_uri()
    ok, message = hook.test_connection()
    assert ok, message


def test_a_missing_named_connection_is_an_error():
    from airflow.sdk.exceptions import AirflowNotFoundException

    with pytest.raises(AirflowNotFoundException):
        MlflowHook(mlflow_conn_id="no_such_connection").step_config()


def test_mlflow_connection_without_uri_is_named(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_EMPTY", json.dumps({"conn_type": "mlflow"}))
    with pytest.raises(ValueError, match="mlflow_empty"):
        MlflowHook(mlflow_conn_id="mlflow_empty").step_config()


def test_test_connection_reports_an_unreachable_server_quickly(monkeypatch):
    # The connection's own retry settings are for tasks; the Test button gives up after 2 tries.
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_DOWN",
        json.dumps({"conn_type": "mlflow", "host": "http://127.0.0.1:9", "extra": {"max_retries": 7}}),
    )
    ok, message = MlflowHook(mlflow_conn_id="mlflow_down").test_connection()
    assert not ok
    assert message.startswith("MLflow at http://127.0.0.1:9 is unavailable after 2 tries: "), message


def test_mlflow_hook_gives_steps_credentials_retries_and_the_aws_connection(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_ARTEFACTS",
        json.dumps(
            {
                "conn_type": "aws",
                "login": "AKIDTEST",
                "password": "aws-secret",
                "extra": {"endpoint_url": "http://127.0.0.1:5999", "region_name": "eu-west-1"},
            }
        ),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_AUTH",
        json.dumps(
            {
                "conn_type": "mlflow",
                "host": "https://mlflow.example.com",
                "login": "ada",
                "password": "pw",
                "extra": {"aws_conn_id": "aws_artefacts", "max_retries": "2", "timeout": 5, "ui_url": ""},
            }
        ),
    )
    config = MlflowHook(mlflow_conn_id="mlflow_auth").step_config()
    assert config["auth"] == {"username": "ada", "password": "pw"}
    assert config["http"] == {"max_retries": "2", "timeout": 5}
    assert config["s3"] == {
        "endpoint_url": "http://127.0.0.1:5999",
        "region_name": "eu-west-1",
        "aws_access_key_id": "AKIDTEST",
        "aws_secret_access_key": "aws-secret",
    }
    Settings.from_request(config)  # what the hook builds, the steps accept
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"} & os.environ.keys()


@pytest.mark.parametrize(
    ("fields", "auth"),
    [
        ({"password": "tok-1"}, {"token": "tok-1"}),
        ({"extra": {"token": "tok-2"}}, {"token": "tok-2"}),
    ],
)
def test_a_bearer_token_comes_from_the_password_or_extra(monkeypatch, fields, auth):
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_TOKEN", json.dumps({"conn_type": "mlflow", "host": "http://m", **fields})
    )
    assert MlflowHook(mlflow_conn_id="mlflow_token").step_config()["auth"] == auth


def test_test_connection_names_a_connection_that_cannot_be_used(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_BOTH",
        json.dumps({"conn_type": "mlflow", "host": "http://m", "password": "p", "extra": {"token": "t"}}),
    )
    ok, message = MlflowHook(mlflow_conn_id="mlflow_both").test_connection()
    assert not ok and "'mlflow_both'" in message and "keep one" in message


def test_the_connection_form_shows_the_fields_the_hook_reads():
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    prefix = "extra__mlflow__"
    fields = {
        key.removeprefix(prefix): field
        for key, field in manager.connection_form_widgets.items()
        if key.startswith(prefix)
    }
    assert set(fields) == {
        "token",
        "aws_conn_id",
        "artifact_root",
        "ui_url",
        "max_retries",
        "backoff_factor",
        "timeout",
    }
    assert [name for name, field in fields.items() if field.is_sensitive] == ["token"]
    behaviour = manager.field_behaviours["mlflow"]
    assert behaviour["relabeling"]["host"] == "Tracking URI" and "schema" in behaviour["hidden_fields"]


def test_serving_hook_picks_the_target_from_its_connection(monkeypatch):
    assert ServingHook().target_config == {"target": "local"}
    from airloop.serving.local import LocalServingTarget

    assert isinstance(ServingHook().target, LocalServingTarget)
    monkeypatch.setenv(
        "AIRFLOW_CONN_SERVING_BAD",
        json.dumps({"conn_type": "airloop_serving", "extra": {"target": "nowhere"}}),
    )
    ok, message = ServingHook(serving_conn_id="serving_bad").test_connection()
    assert not ok and "nowhere" in message


def test_the_serving_connections_password_is_the_local_gateways_admin_token(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_SERVING_TOKEN",
        json.dumps({"conn_type": "airloop_serving", "password": "s3cret", "extra": {"target": "local"}}),
    )
    hook = ServingHook(serving_conn_id="serving_token")
    assert hook.target.admin_token == "s3cret"
    # Kept out of the options a rollout trigger serialises into Airflow's database.
    assert "s3cret" not in json.dumps(hook.target_config)


def test_serving_connection_form_fields_left_empty_keep_the_targets_defaults(monkeypatch):
    from airflow.providers_manager import ProvidersManager

    prefix = "extra__airloop_serving__"
    fields = {
        key.removeprefix(prefix)
        for key in ProvidersManager().connection_form_widgets
        if key.startswith(prefix)
    }
    assert fields == {
        "target",
        "server",
        "max_batch_size",
        "max_batch_time",
        "namespace",
        "kubernetes_conn_id",
        "prometheus_url",
    }
    # What the form saves for a Seldon target whose optional fields were left empty.
    monkeypatch.setenv(
        "AIRFLOW_CONN_SERVING_FORM",
        json.dumps(
            {
                "conn_type": "airloop_serving",
                "extra": {
                    "target": "seldon",
                    "server": None,
                    "max_batch_size": None,
                    "max_batch_time": None,
                    "namespace": "models",
                    "kubernetes_conn_id": None,
                    "prometheus_url": None,
                },
            }
        ),
    )
    target = ServingHook(serving_conn_id="serving_form").target
    assert (target.namespace, target.kubernetes_conn_id, target.prometheus_url) == (
        "models",
        "kubernetes_default",
        None,
    )


def test_the_serving_connection_picks_the_local_targets_model_server_and_its_batching(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_SERVING_MLSERVER",
        json.dumps(
            {
                "conn_type": "airloop_serving",
                "extra": {
                    "target": "local",
                    "server": "mlserver",
                    "max_batch_size": 32,
                    "max_batch_time": 0.002,
                },
            }
        ),
    )
    target = ServingHook(serving_conn_id="serving_mlserver").target
    assert (target.server, target.max_batch_size, target.max_batch_time) == ("mlserver", 32, 0.002)
    assert ServingHook().target.server == "seldon"  # the default: Seldon's wrapper
