"""The drift monitor: compare what the champion is served with what it learned from, and act on it."""

from __future__ import annotations

import json
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
# Drift decisions kept in the champion's audit record (hourly monitoring: about a day's worth).
AUDIT_DECISIONS = 24


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
    Turn a drift verdict into an action with the retraining policy (``airloop.steps.policy.decide``), so
    one shift does not start ten retrains: severities map to ``log``, ``retrain`` or
    ``retrain_with_approval``; nothing is requested on a window smaller than ``min_window_rows``, while a
    run of ``retrain_dag_id`` is queued or running, or within ``cooldown_minutes`` of the last request
    (the registered model's ``airloop.retrain_requested_at`` tag).

    Every decision other than "no drift" / "too little data" is appended, with its reason, to the
    ``drift`` stage of the champion's audit record; every decision goes to the task log. On a retrain the
    task succeeds and its outlets (the drift Asset the retraining DAG is scheduled on) get an event
    carrying the report's location and severity (plus ``approval_required: true`` when approval is
    required); otherwise the task is skipped with the reason.

    :param detection: the result of ``DriftDetectRequestsOperator`` (usually its XCom).
    :param actions: ``{severity: action}`` over ``airloop.steps.policy.DEFAULT_ACTIONS``.
    :param cooldown_minutes: no retrain is requested within this long after the last request.
    :param min_window_rows: fewest requests in the window to act on a drift verdict.
    :param retrain_dag_id: the DAG that retrains (scheduled on the outlets); while a run of it is queued
        or running no other retrain is requested. ``None`` leaves deduplication to the cooldown.
    """

    template_fields: Sequence[str] = ("detection", "actions", "cooldown_minutes", "min_window_rows",
                                      "retrain_dag_id")

    def __init__(self, *, detection: dict[str, Any], actions: dict[str, str] | None = None,
                 cooldown_minutes: float = 60, min_window_rows: int = 200, retrain_dag_id: str | None = None,
                 mlflow_conn_id: str = MlflowHook.default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.detection = detection
        self.actions = actions
        self.cooldown_minutes = cooldown_minutes
        self.min_window_rows = min_window_rows
        self.retrain_dag_id = retrain_dag_id
        self.mlflow_conn_id = mlflow_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        from airloop.steps.policy import decide

        detection = self.detection
        model_name = detection.get("model_name")
        if not model_name:
            raise ValueError("'detection' has no 'model_name': pass DriftDetectRequestsOperator's result")
        hook = MlflowHook(mlflow_conn_id=self.mlflow_conn_id)
        last = hook.client.get_registered_model(model_name).tags.get(RETRAIN_REQUESTED_TAG)
        now = time.time()
        decision = decide({
            "detection": detection, "actions": self.actions, "cooldown_minutes": self.cooldown_minutes,
            "min_window_rows": self.min_window_rows,
            "last_requested_at": None if last is None else float(last),
            "retrain_running": self._retrain_running(context), "now": now,
        })
        self.log.info("drift decision for %s: %s (%s) - %s", model_name, decision["action"], decision["code"],
                      decision["reason"])
        if decision["action"] != "none":
            self._audit(hook, detection, decision, context)
        if decision["action"] not in ("retrain", "retrain_with_approval"):
            raise AirflowSkipException(decision["reason"])
        # Last, so a task that failed before this point and is retried is not held back by its own cooldown.
        hook.client.set_registered_model_tag(model_name, RETRAIN_REQUESTED_TAG, str(now))
        extra = {key: detection[key] for key in ("model_name", "champion", "severity", "drifted_features",
                                                 "report")}
        if decision["action"] == "retrain_with_approval":
            extra["approval_required"] = True
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = extra
        return {"action": decision["action"], "reason": decision["reason"], **extra}

    def _retrain_running(self, context: Context) -> bool:
        """Ask Airflow (through the Task SDK, no REST call) whether the retraining DAG has a live run."""
        if not self.retrain_dag_id:
            return False
        return context["ti"].get_dr_count(dag_id=self.retrain_dag_id, states=["queued", "running"]) > 0

    def _audit(self, hook: MlflowHook, detection: dict[str, Any], decision: dict[str, Any],
               context: Context) -> None:
        """Append the decision to the ``drift`` stage of the champion's audit record (the newest kept)."""
        from airloop.steps.registry import MAX_AUDIT_RECORD_BYTES, append_audit, read_audit

        keys = ("decided_at", "action", "code", "severity", "wanted")
        entry = {**{key: decision[key] for key in keys}, "reason": decision["reason"][:1000],
                 "report": detection.get("report"), "dag_run_id": context["run_id"]}
        stages = read_audit(hook.tracking_uri, detection["model_name"], detection["champion"])["stages"]
        earlier = next((s["record"]["decisions"] for s in stages if s["stage"] == "drift"), [])
        decisions = [*earlier, entry][-AUDIT_DECISIONS:]
        # A stage's record has a size limit: long reasons (a window naming many columns) push out old ones.
        while len(decisions) > 1 and len(json.dumps({"decisions": decisions})) > MAX_AUDIT_RECORD_BYTES:
            decisions.pop(0)
        append_audit({"tracking_uri": hook.tracking_uri, "model_name": detection["model_name"],
                      "version": detection["champion"], "stage": "drift", "record": {"decisions": decisions}})
