"""Champion/challenger rollout as Airflow tasks. The operators template, defer, resume and hold for
approval; the rollout itself (plan, traffic, verdicts, promotion, rollback, surviving a kill) is
``airloop.steps.rollout.rollout``, on whichever serving target the connection names."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, Context, conf
from airflow.sdk.exceptions import AirflowFailException

from airloop.hooks.mlflow import MlflowHook
from airloop.hooks.serving import ServingHook
from airloop.links.reports import RolloutReportLink
from airloop.steps.rollout.requests import RolloutRequest, RolloutResult, WindowEvent
from airloop.triggers.rollout import RolloutTrigger

if TYPE_CHECKING:
    from airloop.steps.rollout.rollout import Rollout, Window


class _RolloutOperator(BaseOperator):
    """What the rollout and the finish of one held for approval share: hooks, the rollout, on_kill."""

    operator_extra_links = (RolloutReportLink(),)

    def __init__(
        self,
        *,
        model_name: str,
        version: str,
        deployment: str = RolloutRequest.deployment,
        mlflow_conn_id: str = MlflowHook.default_conn_name,
        serving_conn_id: str = ServingHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.version = version
        self.deployment = deployment
        self.mlflow_conn_id = mlflow_conn_id
        self.serving_conn_id = serving_conn_id

    @cached_property
    def mlflow(self) -> MlflowHook:
        return MlflowHook(mlflow_conn_id=self.mlflow_conn_id)

    @cached_property
    def serving(self) -> ServingHook:
        return ServingHook(serving_conn_id=self.serving_conn_id)

    def request(self) -> RolloutRequest:
        return RolloutRequest(
            **self.mlflow.step_config(),
            model_name=self.model_name,
            version=self.version,
            deployment=self.deployment,
        )

    @cached_property
    def rollout(self) -> Rollout:
        from airloop import artefacts
        from airloop.steps.rollout.rollout import Rollout

        return Rollout(self.request(), self.serving.target, artefacts.root(), log=self.log)

    @property
    def report_path(self) -> str:
        """The latest attempt's report, under the artefact root."""
        return self.rollout.reports.path()

    def on_kill(self) -> None:
        # Traffic back on the champion, why in the report and the audit (or a decision under way completed).
        try:
            self.rollout.abort(f"task {self.task_id} was killed")
        except Exception:
            self.log.exception("could not put the traffic of %s back on the champion", self.deployment)

    def outcome(self, result: RolloutResult) -> dict[str, Any]:
        """The task's result; a rollback, an abort or a refusal fails the task."""
        if "message" in result:
            raise AirflowFailException(result["message"])
        return dict(result)


class RolloutChallengerOperator(_RolloutOperator):
    """
    Roll a registered model version out next to the champion and let the data decide.

    ``canary``: an analysis window after each of ``steps`` below 100 (errors, p99 latency, accuracy
    from feedback labels); ``shadow``: a window of mirrored requests first. A window that fails rolls
    back and rejects the version; one still short of data (labels that have not come) is
    inconclusive and does what ``on_inconclusive`` says; the last step promotes it, or with
    ``approval`` holds it for ``RolloutFinishOperator``. Windows wait in ``RolloutTrigger``
    (``deferrable``) or in the worker. Killed at any point, a retry or a cleared task continues from
    the rollout report; ``on_kill`` puts all traffic back on the champion. See
    ``airloop.steps.rollout.rollout``.

    :param model_name: registered model name in MLflow.
    :param version: the model version to roll out (the ``challenger``).
    :param deployment: the serving deployment's name.
    :param steps: challenger traffic percentages, ending at 100.
    :param mode: ``canary`` or ``shadow`` (a shadow window before the canary steps).
    :param shadow_percent: the percentage of requests mirrored to the shadow (1-100).
    :param approval: stop before the promotion for a person's approval.
    :param analysis_seconds: minimum length of each analysis window.
    :param max_wait_seconds: how long a window may wait for enough data before rolling back.
    :param criteria: overrides of ``DEFAULT_CRITERIA`` (see ``airloop.steps.rollout.canary.analyse``).
    :param poll_interval: seconds between two reads of the metrics while a window waits for data.
    :param allow_rejected: roll out a version the registry marks rejected (a person's decision).
    :param on_inconclusive: what a window still short of data after ``max_wait_seconds`` (too few
        labelled requests on either predictor: labels that come late) leads to: ``rollback``,
        ``extend`` (wait for the same window again, deferred like the first wait) or ``hold`` (for a
        person's approval, as with ``approval``: ``RolloutFinishOperator`` promotes or rolls back).
    :param max_extensions: how many times ``extend`` waits again before it rolls back.
    :param labels_from: where the accuracy check's labels come from: ``metrics`` (the serving target's
        feedback counters) or ``log`` (the labels log joined to the request log: also labels sent long
        after the prediction, and ground truth from ``LabelsIngestOperator``; the local target). Each
        poll then reads the window's logs: give long windows a ``poll_interval`` of a minute or more.
    """

    template_fields: Sequence[str] = (
        "model_name",
        "version",
        "deployment",
        "steps",
        "mode",
        "shadow_percent",
        "approval",
        "analysis_seconds",
        "max_wait_seconds",
        "criteria",
        "allow_rejected",
        "on_inconclusive",
        "max_extensions",
        "labels_from",
    )

    def __init__(
        self,
        *,
        model_name: str,
        version: str,
        deployment: str = RolloutRequest.deployment,
        steps: Sequence[int] = RolloutRequest.steps,
        mode: str = RolloutRequest.mode,
        shadow_percent: int = RolloutRequest.shadow_percent,
        approval: bool | str = RolloutRequest.approval,
        analysis_seconds: float | str = RolloutRequest.analysis_seconds,
        max_wait_seconds: float | str = RolloutRequest.max_wait_seconds,
        criteria: dict[str, Any] | None = None,
        poll_interval: float = RolloutRequest.poll_interval,
        allow_rejected: bool | str = RolloutRequest.allow_rejected,
        on_inconclusive: str = RolloutRequest.on_inconclusive,
        max_extensions: int | str = RolloutRequest.max_extensions,
        labels_from: str = RolloutRequest.labels_from,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name=model_name, version=version, deployment=deployment, **kwargs)
        self.steps = steps
        self.mode = mode
        self.shadow_percent = shadow_percent
        self.approval = approval
        self.analysis_seconds = analysis_seconds
        self.max_wait_seconds = max_wait_seconds
        self.criteria = criteria
        self.poll_interval = poll_interval
        self.allow_rejected = allow_rejected
        self.on_inconclusive = on_inconclusive
        self.max_extensions = max_extensions
        self.labels_from = labels_from
        self.deferrable = deferrable

    def request(self) -> RolloutRequest:
        return (
            super()
            .request()
            .replace(
                steps=self.steps,
                mode=self.mode,
                shadow_percent=self.shadow_percent,
                approval=self.approval,
                analysis_seconds=self.analysis_seconds,
                max_wait_seconds=self.max_wait_seconds,
                criteria=self.criteria or {},
                poll_interval=self.poll_interval,
                allow_rejected=self.allow_rejected,
                on_inconclusive=self.on_inconclusive,
                max_extensions=self.max_extensions,
                labels_from=self.labels_from,
            )
        )

    def execute(self, context: Context) -> dict[str, Any]:
        self.rollout.estimate = partial(self._estimate, context)
        try:
            step = self.rollout.start()
        finally:
            RolloutReportLink.persist(context, path=self.report_path)  # the attempt that start() chose
        return self._follow(step)

    def execute_complete(self, context: Context, event: WindowEvent, step: int) -> dict[str, Any]:
        self.rollout.estimate = partial(self._estimate, context)
        return self._follow(self.rollout.record_window(step, event))

    def _estimate(self, context: Context, versions: list[str], since: float) -> dict[str, Any]:
        """Each version's CBPE estimate on the answers the gateway logged since ``since``, in the
        ``monitoring`` runtime; empty where the target logs no answers (Seldon, KServe)."""
        from airloop import runtimes
        from airloop.operators.performance import RUNTIME, STEP, measure

        _, result = measure(
            self.mlflow,
            self.model_name,
            self.deployment,
            since,
            lambda request: runtimes.run_step(
                STEP, request, runtime=RUNTIME, context=context, task_id=self.task_id
            ),
            monitored=versions[-1],
        )
        return dict(result["versions"]) if result else {}

    def _follow(self, step: Window | RolloutResult) -> dict[str, Any]:
        """Wait for each window the rollout asks for (deferred, or here), until it has a result."""
        from airloop.steps.rollout.rollout import Window

        while isinstance(step, Window):
            trigger = RolloutTrigger(target_config=self.serving.target_config, **step.trigger_kwargs())
            if self.deferrable:
                self.defer(
                    trigger=trigger,
                    method_name="execute_complete",
                    kwargs={"step": step.step},
                    timeout=timedelta(seconds=step.max_wait_seconds + step.window_seconds + 60),
                )
            step = self.rollout.record_window(step.step, asyncio.run(trigger.wait()))
        return self.outcome(step)


class RolloutFinishOperator(_RolloutOperator):
    """
    Finish a rollout held for approval (``RolloutChallengerOperator(approval=True)``).

    Reads the approval task's result (Airflow's ``ApprovalOperator``): ``Approve`` promotes; anything
    else (rejected, timed out, the approval task failed) rolls back and fails. A rollout that stopped
    before a decision is aborted: all traffic back on the champion. Run it after the approval task
    whatever its outcome (``trigger_rule="all_done_min_one_success"``, the approval task with
    ``fail_on_reject=True``). A retry completes an interrupted promotion or rollback.

    :param model_name: registered model name in MLflow.
    :param version: the model version held for approval.
    :param deployment: the serving deployment's name.
    :param approval_task_id: the task whose return value holds the approval (``chosen_options``).
    """

    template_fields: Sequence[str] = ("model_name", "version", "deployment", "approval_task_id")

    def __init__(
        self,
        *,
        model_name: str,
        version: str,
        deployment: str = RolloutRequest.deployment,
        approval_task_id: str = "approve",
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name=model_name, version=version, deployment=deployment, **kwargs)
        self.approval_task_id = approval_task_id

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow.providers.standard.operators.hitl import ApprovalOperator

        RolloutReportLink.persist(context, path=self.report_path)
        answer = context["ti"].xcom_pull(task_ids=self.approval_task_id) or {}
        approved = list(answer.get("chosen_options") or []) == [ApprovalOperator.APPROVE]
        user = answer.get("responded_by_user") or {}
        who = user.get("name") or user.get("id")
        if answer:
            reason = f"{'approved' if approved else 'rejected'} by {who}"
        else:
            reason = f"task {self.approval_task_id!r} returned no approval (rejected, timed out or failed)"
        return self.outcome(self.rollout.decide(approved=approved, by=who, reason=reason))


_DEPRECATED = {
    "SeldonRolloutChallengerOperator": RolloutChallengerOperator,
    "SeldonFinishRolloutOperator": RolloutFinishOperator,
}


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        new = _DEPRECATED[name].__name__
        warnings.warn(
            f"{name} is deprecated: use {new} (it drives any serving target)",
            DeprecationWarning,
            stacklevel=2,
        )
        return _DEPRECATED[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
