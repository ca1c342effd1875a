"""The drift monitor: compare what the champion is served with what it learned from, and act on it."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowSkipException

from airloop import artefacts, runtimes
from airloop.hooks.mlflow import MlflowHook
from airloop.links.reports import DriftReportLink
from airloop.operators.base import StepOperator
from airloop.steps.drift.requests import (
    CollectRequest,
    DecideRequest,
    Decision,
    Detection,
    DetectRequest,
    DriftResult,
)

RETRAIN_REQUESTED_TAG = "airloop.retrain_requested_at"
# The severity of the drift that last requested a retrain: a more severe one within the cooldown escalates.
RETRAIN_SEVERITY_TAG = "airloop.retrain_requested_severity"
# The times of the latest retrain requests (a JSON list of epoch seconds), which the circuit breaker counts.
RETRAIN_HISTORY_TAG = "airloop.retrain_requests"
RETRAIN_HISTORY = 50
# Drift decisions kept in the champion's audit record (hourly monitoring: about a day's worth).
AUDIT_DECISIONS = 24


def monitored(hook: MlflowHook, model_name: str, kind: str) -> tuple[str, str]:
    """The champion a monitor checks, and its report's prefix ``<kind>/<model>/<time>``; the task is
    skipped while the model has no champion."""
    from airloop.tracking.registry import aliases

    with hook.session():
        champion = aliases(hook.tracking_uri, model_name).get("champion")
    if champion is None:
        raise AirflowSkipException(f"{model_name} has no champion yet: nothing to monitor")
    return str(champion), f"{kind}/{model_name}/{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"


class _DriftDetectOperator(StepOperator):
    """
    Test a window of data for drift against the reference sample stored with the champion (its
    training run's ``drift/reference.parquet``), write a drift report (JSON + HTML) to the artefact
    store, log ``drift_share`` / ``drift_detected`` to the champion's run and link the report from the
    task. Subclasses say where the window comes from (``_window``).

    :param model_name: registered model whose ``champion`` is monitored.
    :param backend: ``"scipy"`` (runs in the worker) or ``"alibi"`` (alibi-detect, in the ``serving``
        runtime, or ``torch`` for mmd: set ``runtime`` to match).
    :param method: ``"ks"`` or ``"cvm"`` (a Kolmogorov-Smirnov or Cramer-von Mises test per numeric
        feature, chi-squared per categorical one) or ``"mmd"`` (one test of all the features, alibi
        backend in the ``torch`` runtime); see docs/drift.md for these and ``p_val``, ``correction``
        and ``min_rows``.
    """

    template_fields: Sequence[str] = ("model_name", "backend", "method", "p_val", "correction", "min_rows")
    operator_extra_links = (DriftReportLink(),)

    def __init__(
        self,
        *,
        model_name: str,
        backend: str = DetectRequest.backend,
        method: str = DetectRequest.method,
        p_val: float = DetectRequest.p_val,
        correction: str = DetectRequest.correction,
        min_rows: int = DetectRequest.min_rows,
        mlflow_conn_id: str = MlflowHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.backend = backend
        self.method = method
        self.p_val = p_val
        self.correction = correction
        self.min_rows = min_rows
        self.mlflow_conn_id = mlflow_conn_id

    def _window(self, folder: Path, scratch: Path) -> tuple[str, dict[str, Any]]:
        """The window as a file the step reads: ``(path, what to say about it)``.

        ``folder`` is published with the report; ``scratch`` is removed when the task ends.
        """
        raise NotImplementedError

    def execute(self, context: Context) -> Detection:
        from airloop.tracking.artifacts import download

        hook = MlflowHook(mlflow_conn_id=self.mlflow_conn_id)
        champion, prefix = monitored(hook, self.model_name, "drift")
        DriftReportLink.persist(context, path=f"{prefix}/report.html")
        run_id = hook.client.get_model_version(self.model_name, champion).run_id
        with tempfile.TemporaryDirectory() as tmp, artefacts.staging(prefix) as folder:
            with hook.session():
                reference = download(hook.tracking_uri, f"runs:/{run_id}/drift/reference.parquet", tmp)
            window, source = self._window(Path(folder), Path(tmp))
            self.log.info("window: %s", source)
            request = DetectRequest(
                reference_uri=reference,
                current_uri=window,
                backend=self.backend,
                method=self.method,
                p_val=float(self.p_val),
                correction=self.correction,
                min_rows=int(self.min_rows),
                report_dir=str(folder),
            )
            result: DriftResult = self.run_step(
                "airloop.steps.drift.detect:detect", request.to_dict(), context
            )
        hook.client.log_metric(run_id, "drift_share", float(result.get("share_drifted") or 0.0))
        hook.client.log_metric(run_id, "drift_detected", float(result["verdict"] == "drift"))
        self.log.info(
            "drift verdict %s, severity %s, drifted features %s",
            result["verdict"],
            result["severity"],
            result["drifted_features"],
        )
        return {
            "model_name": self.model_name,
            "champion": str(champion),
            "verdict": result["verdict"],
            "severity": result["severity"],
            "drifted_features": result["drifted_features"],
            "share_drifted": result.get("share_drifted"),
            "n_current": result["n_current"],
            "n_effective": result["n_effective"],
            "n_reference": result["n_reference"],
            "message": result.get("message"),
            "report": f"{prefix}/report.json",
            "window": source,
        }


class DriftDetectRequestsOperator(_DriftDetectOperator):
    """
    Test the last ``window_minutes`` of requests logged by the serving gateway for drift (see
    ``_DriftDetectOperator`` for what is tested, written and logged; the window is kept with the report).

    :param deployment: the serving deployment whose request logs are read.
    :param window_minutes: how far back to read.
    """

    template_fields: Sequence[str] = (*_DriftDetectOperator.template_fields, "deployment", "window_minutes")

    def __init__(self, *, deployment: str = "airloop", window_minutes: float = 60, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.deployment = deployment
        self.window_minutes = window_minutes

    def _window(self, folder: Path, scratch: Path) -> tuple[str, dict[str, Any]]:
        from airloop.steps.drift.window import collect

        end = time.time()
        window = collect(
            CollectRequest(
                log_dir=str(artefacts.local_path(f"requests/{self.deployment}")),
                start=end - float(self.window_minutes) * 60,
                end=end,
                out_path=f"{folder}/window.parquet",
            )
        )
        return window["path"], {
            "deployment": self.deployment,
            "requests": window["rows"],
            "log_files": window["files"],
        }


class DriftDetectDataOperator(_DriftDetectOperator):
    """
    Test a window of data for drift (see ``_DriftDetectOperator`` for what is tested, written and
    logged): a table at ``window_uri``, or the result of ``window_sql``. Exactly one of the two.

    :param window_uri: a parquet or CSV file, or a folder of parquet files (a Feast training set
        written to parquet, a partitioned export): a local path or any URI Airflow's ObjectStoragePath
        opens (``s3://bucket/key.parquet``), read with ``window_conn_id`` (an ``aws`` connection for S3).
    :param window_sql: a query run through ``window_conn_id``, a database connection whose hook is a
        ``DbApiHook`` (postgres, sqlite, snowflake...); one column per feature.
    :param window_conn_id: the connection to read the window with; optional for ``window_uri``.
    """

    template_fields: Sequence[str] = (
        *_DriftDetectOperator.template_fields,
        "window_uri",
        "window_sql",
        "window_conn_id",
    )
    template_ext: Sequence[str] = (".sql",)

    def __init__(
        self,
        *,
        window_uri: str | None = None,
        window_sql: str | None = None,
        window_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.window_uri = window_uri
        self.window_sql = window_sql
        self.window_conn_id = window_conn_id

    def _window(self, folder: Path, scratch: Path) -> tuple[str, dict[str, Any]]:
        from airloop.staging import Arguments, stage

        staged = stage(
            scratch,
            uri=self.window_uri,
            sql=self.window_sql,
            conn_id=self.window_conn_id,
            arguments=Arguments("data window", "window_uri", "window_sql", "window_conn_id"),
            pod=self.runtime == runtimes.POD,
        )
        given = {"sql": self.window_sql} if self.window_sql else {"uri": self.window_uri}
        return staged.path, {**given, "conn_id": self.window_conn_id}


class DriftDecideRetrainOperator(BaseOperator):
    """
    Turn a drift verdict into an action with the retraining policy (``airloop.steps.drift.policy.decide``), so
    one shift does not start ten retrains: severities map to ``log``, ``retrain`` or
    ``retrain_with_approval``; nothing is requested on a window of fewer than ``min_window_rows`` effective
    rows, while a run of ``retrain_dag_id`` is queued or running, or within ``cooldown_minutes`` of the
    last request (the registered model's ``airloop.retrain_requested_at`` tag) unless the drift is more
    severe than the one that request was for (``airloop.retrain_requested_severity``): then it escalates.
    With ``max_retrains`` (the circuit breaker) no more than that many retrains are requested in any
    ``retrain_period_hours`` (the model's ``airloop.retrain_requests`` tag keeps their times), escalations
    included. With ``mode="suggest"`` no retrain is ever requested: the retrain the policy would request
    is recorded (``code="suggested"``), logged as a warning and the task is skipped with it as the reason,
    which a notifier on ``on_skipped_callback`` sends on.

    Every decision other than "no drift" / "too little data" is appended, with its reason, to the
    ``drift`` stage of the champion's audit record; every decision goes to the task log. On a retrain the
    task succeeds and its outlets (the drift Asset the retraining DAG is scheduled on) get an event
    carrying the report's location and severity (plus ``approval_required: true`` when approval is
    required); otherwise the task is skipped with the reason.

    :param detection: the result of ``DriftDetectRequestsOperator`` or ``DriftDetectDataOperator``
        (usually its XCom).
    :param performance: optionally, the result of ``PerformanceMonitorOperator``: the policy judges the
        more severe of the two (data drift on a tie), and the event and the audit say which
        (``trigger``: ``data_drift`` or ``performance``) and why (``reason``).
    :param actions: ``{severity: action}`` over ``airloop.steps.drift.policy.DEFAULT_ACTIONS``.
    :param cooldown_minutes: no retrain is requested within this long after the last request, unless
        the drift is more severe than the last request's.
    :param min_window_rows: fewest effective rows in the window (repeated requests counted once) to act
        on a drift verdict.
    :param retrain_dag_id: the DAG that retrains (scheduled on the outlets); while a run of it is queued
        or running no other retrain is requested. ``None`` leaves deduplication to the cooldown.
    :param mode: ``"act"`` (request retrains) or ``"suggest"`` (record and notify them, never request).
    :param max_retrains: at most this many retrain requests per ``retrain_period_hours``; ``None``: no
        limit.
    :param retrain_period_hours: the circuit breaker's period.
    """

    template_fields: Sequence[str] = (
        "detection",
        "performance",
        "actions",
        "cooldown_minutes",
        "min_window_rows",
        "retrain_dag_id",
        "mode",
        "max_retrains",
        "retrain_period_hours",
    )

    def __init__(
        self,
        *,
        detection: Detection,
        performance: Detection | None = None,
        actions: dict[str, str] | None = DecideRequest.actions,
        cooldown_minutes: float = DecideRequest.cooldown_minutes,
        min_window_rows: int = DecideRequest.min_window_rows,
        retrain_dag_id: str | None = None,
        mode: str = DecideRequest.mode,
        max_retrains: int | str | None = DecideRequest.max_retrains,
        retrain_period_hours: float | str = DecideRequest.retrain_period_hours,
        mlflow_conn_id: str = MlflowHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.detection = detection
        self.performance = performance
        self.actions = actions
        self.cooldown_minutes = cooldown_minutes
        self.min_window_rows = min_window_rows
        self.retrain_dag_id = retrain_dag_id
        self.mode = mode
        self.max_retrains = max_retrains
        self.retrain_period_hours = retrain_period_hours
        self.mlflow_conn_id = mlflow_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        from airloop.steps.drift.policy import SEVERITIES, decide

        detection, trigger = self.detection, "data_drift"
        performance = self.performance
        if performance and SEVERITIES.index(performance.get("severity") or "none") > SEVERITIES.index(
            detection.get("severity") or "none"
        ):
            detection, trigger = performance, "performance"
        model_name = detection.get("model_name")
        if not model_name:
            raise ValueError("'detection' has no 'model_name': pass a DriftDetect*Operator's result")
        hook = MlflowHook(mlflow_conn_id=self.mlflow_conn_id)
        tags = hook.client.get_registered_model(model_name).tags
        last = tags.get(RETRAIN_REQUESTED_TAG)
        history = json.loads(tags.get(RETRAIN_HISTORY_TAG, "[]"))
        now = time.time()
        decision = decide(
            DecideRequest(
                detection=detection,
                actions=self.actions,
                cooldown_minutes=self.cooldown_minutes,
                min_window_rows=self.min_window_rows,
                last_requested_at=None if last is None else float(last),
                last_requested_severity=tags.get(RETRAIN_SEVERITY_TAG) if last is not None else None,
                retrain_running=self._retrain_running(context),
                now=now,
                mode=self.mode,
                max_retrains=None if self.max_retrains is None else int(self.max_retrains),
                retrain_period_hours=float(self.retrain_period_hours),
                recent_retrains=history,
            )
        )
        self.log.info(
            "drift decision for %s: %s (%s) - %s",
            model_name,
            decision["action"],
            decision["code"],
            decision["reason"],
        )
        if decision["action"] != "none":
            self._audit(hook, detection, decision, trigger, context)
        if decision["code"] == "suggested":
            self.log.warning("retrain suggested for %s: %s", model_name, decision["reason"])
        if decision["action"] not in ("retrain", "retrain_with_approval"):
            raise AirflowSkipException(decision["reason"])
        # Last, so a task that failed before this point and is retried is not held back by its own cooldown.
        hook.client.set_registered_model_tag(model_name, RETRAIN_SEVERITY_TAG, decision["severity"])
        hook.client.set_registered_model_tag(model_name, RETRAIN_REQUESTED_TAG, str(now))
        hook.client.set_registered_model_tag(
            model_name, RETRAIN_HISTORY_TAG, json.dumps([*history, now][-RETRAIN_HISTORY:])
        )
        extra: dict[str, Any] = {
            "model_name": detection["model_name"],
            "champion": detection["champion"],
            "severity": detection["severity"],
            "drifted_features": detection["drifted_features"],
            "report": detection["report"],
            "trigger": trigger,
            "reason": decision["reason"],
            "message": detection.get("message"),
        }
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

    def _audit(
        self, hook: MlflowHook, detection: Detection, decision: Decision, trigger: str, context: Context
    ) -> None:
        """Append the decision to the ``drift`` stage of the champion's audit record, in one call that
        keeps the newest ``AUDIT_DECISIONS`` (a stage's record has a size limit: long reasons, a window
        naming many columns, push out old ones)."""
        from airloop.tracking.registry import append_audit

        entry = {
            "decided_at": decision["decided_at"],
            "action": decision["action"],
            "code": decision["code"],
            "severity": decision["severity"],
            "wanted": decision["wanted"],
            "escalated_from": decision["escalated_from"],
            "cooldown_until": decision["cooldown_until"],
            "mode": self.mode,
            "trigger": trigger,
            "n_effective": detection.get("n_effective", detection.get("n_current")),
            "reason": decision["reason"][:1000],
            "report": detection.get("report"),
            "dag_run_id": context["run_id"],
        }
        append_audit(
            {
                **hook.step_config(),
                "model_name": detection["model_name"],
                "version": detection["champion"],
                "stage": "drift",
                "record": {"decisions": [entry]},
                "append": {"decisions": AUDIT_DECISIONS},
            }
        )
