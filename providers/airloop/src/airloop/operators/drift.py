"""The drift monitor: compare what the champion is served with what it learned from, and act on it."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowSkipException

from airloop import artefacts
from airloop.hooks.mlflow import MlflowHook
from airloop.links.reports import DriftReportLink
from airloop.operators.base import StepOperator

RETRAIN_REQUESTED_TAG = "airloop.retrain_requested_at"


class DriftDetectRequestsOperator(StepOperator):
    """
    Test the last ``window_minutes`` of requests logged by the serving gateway for drift against the
    reference sample stored with the champion, and write a drift report (JSON + HTML).

    :param model_name: registered model whose ``champion`` is monitored.
    :param deployment: the serving deployment whose request logs are read.
    :param backend: ``"alibi"`` (alibi-detect, in the ``serving`` runtime) or ``"scipy"``.
    :param runtime: where detection runs; alibi-detect needs the ``serving`` runtime.
    """

    template_fields: Sequence[str] = ("model_name", "deployment", "window_minutes", "backend", "p_val",
                                      "correction", "min_rows")
    operator_extra_links = (DriftReportLink(),)

    def __init__(self, *, model_name: str, deployment: str = "airloop", window_minutes: float = 60,
                 backend: str = "alibi", p_val: float = 0.05, correction: str = "bonferroni",
                 min_rows: int = 200, mlflow_conn_id: str = MlflowHook.default_conn_name,
                 runtime: str = "serving", **kwargs: Any) -> None:
        super().__init__(runtime=runtime, **kwargs)
        self.model_name = model_name
        self.deployment = deployment
        self.window_minutes = window_minutes
        self.backend = backend
        self.p_val = p_val
        self.correction = correction
        self.min_rows = min_rows
        self.mlflow_conn_id = mlflow_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        from airloop.steps.registry import aliases
        from airloop.steps.train import download
        from airloop.steps.window import collect

        hook = MlflowHook(mlflow_conn_id=self.mlflow_conn_id)
        champion = aliases(hook.tracking_uri, self.model_name).get("champion")
        if champion is None:
            raise AirflowSkipException(f"{self.model_name} has no champion yet: nothing to monitor")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        prefix = f"drift/{self.model_name}/{stamp}"
        DriftReportLink.persist(context, path=f"{prefix}/report.html")
        run_id = hook.client.get_model_version(self.model_name, champion).run_id
        end = time.time()
        with tempfile.TemporaryDirectory() as tmp, artefacts.staging(prefix) as folder:
            reference = download(hook.tracking_uri, f"runs:/{run_id}/drift/reference.parquet", tmp)
            window = collect({
                "log_dir": str(artefacts.local_path(f"requests/{self.deployment}")),
                "start": end - float(self.window_minutes) * 60, "end": end, "out_path": f"{folder}/window.parquet",
            })
            self.log.info("window: %d requests from %d log files", window["rows"], window["files"])
            result = self.run_step("airloop.steps.drift:detect", {
                "reference_uri": reference, "current_uri": window["path"], "backend": self.backend,
                "p_val": float(self.p_val), "correction": self.correction, "min_rows": int(self.min_rows),
                "report_dir": str(folder),
            }, context)
        hook.client.log_metric(run_id, "drift_share", float(result.get("share_drifted") or 0.0))
        hook.client.log_metric(run_id, "drift_detected", float(result["verdict"] == "drift"))
        self.log.info("drift verdict %s, severity %s, drifted features %s", result["verdict"],
                      result["severity"], result["drifted_features"])
        return {
            "model_name": self.model_name, "champion": str(champion), "verdict": result["verdict"],
            "severity": result["severity"], "drifted_features": result["drifted_features"],
            "share_drifted": result.get("share_drifted"), "n_current": result["n_current"],
            "n_reference": result["n_reference"], "message": result.get("message"),
            "report": f"{prefix}/report.json",
        }


class DriftDecideRetrainOperator(BaseOperator):
    """
    Turn a drift verdict into an action, so one shift does not start ten retrains: severities map to
    ``log`` or ``retrain``, and no retrain is requested within ``cooldown_minutes`` of the last one.
    On ``retrain`` the task succeeds and its outlets (the drift Asset the retraining DAG is scheduled
    on) get an event carrying the report's location and severity; otherwise it is skipped, with the
    reason in the log.

    :param detection: the result of ``DriftDetectRequestsOperator`` (usually its XCom).
    """

    template_fields: Sequence[str] = ("detection", "actions", "cooldown_minutes")

    def __init__(self, *, detection: dict[str, Any], actions: dict[str, str] | None = None,
                 cooldown_minutes: float = 60, mlflow_conn_id: str = MlflowHook.default_conn_name,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.detection = detection
        self.actions = actions
        self.cooldown_minutes = cooldown_minutes
        self.mlflow_conn_id = mlflow_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        detection = self.detection
        actions = {"none": "log", "low": "log", "medium": "retrain", "high": "retrain", **(self.actions or {})}
        if detection["verdict"] != "drift":
            raise AirflowSkipException(f"verdict {detection['verdict']}: no action")
        action = actions.get(detection["severity"], "log")
        if action != "retrain":
            raise AirflowSkipException(f"drift of severity {detection['severity']} maps to {action!r}")
        hook = MlflowHook(mlflow_conn_id=self.mlflow_conn_id)
        model = hook.client.get_registered_model(detection["model_name"])
        last = float(model.tags.get(RETRAIN_REQUESTED_TAG, 0))
        if time.time() - last < float(self.cooldown_minutes) * 60:
            raise AirflowSkipException(
                f"retrain already requested {time.time() - last:.0f}s ago (cooldown {self.cooldown_minutes} min)")
        extra = {key: detection[key] for key in ("model_name", "champion", "severity", "drifted_features",
                                                 "report")}
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = extra
        hook.client.set_registered_model_tag(detection["model_name"], RETRAIN_REQUESTED_TAG, str(time.time()))
        self.log.info("drift of severity %s on %s: retrain requested", detection["severity"],
                      detection["drifted_features"])
        return {"action": "retrain", **extra}
