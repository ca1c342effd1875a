"""Hooks own their connections; without the default one they fall back to the embedded default."""

from __future__ import annotations

import json

import pytest

from airloop import settings
from airloop.hooks.mlflow import MlflowHook
from airloop.hooks.serving import ServingHook


def test_mlflow_hook_reads_its_connection(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_PROD", json.dumps({
        "conn_type": "mlflow", "host": "http://mlflow.internal", "port": 5000,
        "extra": {"ui_url": "https://mlflow.example.com/", "artifact_root": "s3://models/mlflow"},
    }))
    hook = MlflowHook(mlflow_conn_id="mlflow_prod")
    assert hook.tracking_uri == "http://mlflow.internal:5000"
    assert hook.ui_url == "https://mlflow.example.com"
    assert hook.step_config() == {"tracking_uri": "http://mlflow.internal:5000", "artifact_root": "s3://models/mlflow"}


def test_mlflow_hook_without_default_connection_uses_the_embedded_mlflow():
    hook = MlflowHook()
    assert hook.tracking_uri == settings.mlflow_tracking_uri()
    ok, message = hook.test_connection()
    assert ok, message


def test_a_missing_named_connection_is_an_error():
    from airflow.sdk.exceptions import AirflowNotFoundException

    with pytest.raises(AirflowNotFoundException):
        MlflowHook(mlflow_conn_id="no_such_connection").tracking_uri


def test_mlflow_connection_without_uri_is_named(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_EMPTY", json.dumps({"conn_type": "mlflow"}))
    with pytest.raises(ValueError, match="mlflow_empty"):
        MlflowHook(mlflow_conn_id="mlflow_empty").tracking_uri


def test_test_connection_reports_an_unreachable_server(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DOWN", json.dumps({"conn_type": "mlflow", "host": "http://127.0.0.1:9"}))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    ok, message = MlflowHook(mlflow_conn_id="mlflow_down").test_connection()
    assert not ok and "127.0.0.1:9" in message


def test_serving_hook_picks_the_target_from_its_connection(monkeypatch):
    assert ServingHook().target_config == {"target": "local"}
    from airloop.serving.local import LocalServingTarget

    assert isinstance(ServingHook().target, LocalServingTarget)
    monkeypatch.setenv("AIRFLOW_CONN_SERVING_BAD", json.dumps({"conn_type": "airloop_serving",
                                                               "extra": {"target": "nowhere"}}))
    ok, message = ServingHook(serving_conn_id="serving_bad").test_connection()
    assert not ok and "nowhere" in message
