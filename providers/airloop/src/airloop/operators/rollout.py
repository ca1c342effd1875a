"""Champion/challenger rollout: a shadow and canary traffic steps with automated analysis, an optional
human approval, then promote or roll back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

from airflow.sdk import BaseOperator, Context, conf
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airloop import artefacts, settings
from airloop.hooks.mlflow import MlflowHook
from airloop.hooks.serving import ServingHook
from airloop.links.reports import RolloutReportLink
from airloop.steps.rollout.canary import DEFAULT_CRITERIA, MODES
from airloop.triggers.rollout import SeldonCanaryAnalysisTrigger


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def predictor_name(version: str | int) -> str:
    return f"v{version}"


def _flag(name: str, value: Any) -> bool:
    """A boolean argument, also as the string a template renders (``"{{ params.approval }}"``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{name} must be true or false, got {value!r}")


class _RolloutOperator(BaseOperator):
    """What a rollout and the finish of one held for approval share: hooks, the report, promote/roll back."""

    operator_extra_links = (RolloutReportLink(),)

    def __init__(
        self,
        *,
        model_name: str,
        version: str,
        deployment: str = "airloop",
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

    @property
    def report_path(self) -> str:
        return f"rollouts/{self.deployment}/{self.model_name}-v{self.version}.json"

    def _save(self, report: dict[str, Any]) -> None:
        path = artefacts.root() / self.report_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str))

    def _load(self) -> dict[str, Any] | None:
        path = artefacts.root() / self.report_path
        return json.loads(path.read_text()) if path.exists() else None

    def _audit(self, report: dict[str, Any]) -> None:
        from airloop.tracking.registry import append_audit

        run_id = self.mlflow.client.get_model_version(self.model_name, str(self.version)).run_id
        summary = {
            key: report.get(key) for key in ("decision", "mode", "champion", "challenger", "started", "ended")
        }
        summary["steps"] = _audit_steps(report)
        summary["report"] = self.report_path
        append_audit({**self.mlflow.step_config(), "run_id": run_id, "stage": "rollout", "record": summary})

    def _finish(self, report: dict[str, Any]) -> dict[str, Any]:
        """Promote or roll back. Each write is idempotent, so a retry can redo the whole sequence."""
        from airloop.tracking.registry import promote, reject

        self._save(report)  # the phase is on record before the first write
        target = self.serving.target
        champ, chal = predictor_name(report["champion"]), predictor_name(self.version)
        request = {**self.mlflow.step_config(), "model_name": self.model_name, "version": str(self.version)}
        if report["phase"] == "promoting":
            target.set_traffic(self.deployment, {champ: 0, chal: 100})
            promote(request)
            target.remove(self.deployment, champ)
            report["decision"] = "promoted"
        else:
            # A shadow named here becomes live at 0%: the same sequence rolls back both modes.
            target.set_traffic(self.deployment, {champ: 100, chal: 0})
            reject({**request, "reason": {"steps": _audit_steps(report)}})
            target.remove(self.deployment, chal)
            report["decision"] = "rolled_back"
        report.update(phase="done", ended=_now())
        self._save(report)
        self._audit(report)
        return self._conclude(report)

    def _conclude(self, report: dict[str, Any]) -> dict[str, Any]:
        """The task's result for a finished rollout; a rollback fails the task."""
        if report["decision"] == "rolled_back":
            last = report["steps"][-1] if report["steps"] else {}
            raise AirflowFailException(
                f"v{self.version} rolled back at {last.get('kind', 'canary')} {last.get('weight')}% "
                f"({last.get('verdict')}): " + "; ".join(last.get("reasons", []))
            )
        self.log.info("v%s promoted: champion of %s with 100%% of traffic", self.version, self.model_name)
        return {
            "decision": "promoted",
            "champion": str(self.version),
            "previous": str(report["champion"]),
            "steps": _result_steps(report),
            "report": self.report_path,
        }


class SeldonRolloutChallengerOperator(_RolloutOperator):
    """
    Roll a registered model version out next to the champion and let the data decide.

    ``mode="canary"``: traffic moves through ``steps`` (percent to the challenger); after each step
    below 100 an analysis window compares challenger and champion on error rate, p99 latency and
    accuracy from feedback labels. ``mode="shadow"``: first the challenger gets ``shadow_percent`` of
    the requests mirrored (its answers never reach a client) and a window compares the two answers to
    the same traffic: errors, p99 latency, agreement rate and the distribution of predicted classes;
    then the canary ``steps`` below 100, if any (``steps=[100]``: the shadow alone decides).

    A failed or inconclusive window rolls back: the champion takes 100% and the version is marked
    rejected. When every window passed, the last step (100) promotes the challenger: it takes 100%,
    the MLflow alias ``champion`` moves to it and the old champion keeps ``previous``. With
    ``approval=True`` the rollout stops before that step instead, with the traffic of the last window
    and the aliases unchanged (phase ``awaiting_approval``), for ``SeldonFinishRolloutOperator`` to
    promote or roll back after a person's decision. The first model of a registered model (it is
    already ``champion``) is simply deployed at 100%.

    Writes happen in a fixed order and the rollout report records the phase before each one, so a
    retried task finishes an interrupted promotion or rollback instead of starting over.

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
    )

    def __init__(
        self,
        *,
        model_name: str,
        version: str,
        deployment: str = "airloop",
        steps: Sequence[int] = (10, 25, 50, 100),
        mode: str = "canary",
        shadow_percent: int = 100,
        approval: bool = False,
        analysis_seconds: float = 30.0,
        max_wait_seconds: float = 300.0,
        criteria: dict[str, Any] | None = None,
        poll_interval: float = 1.0,
        mlflow_conn_id: str = MlflowHook.default_conn_name,
        serving_conn_id: str = ServingHook.default_conn_name,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model_name=model_name,
            version=version,
            deployment=deployment,
            mlflow_conn_id=mlflow_conn_id,
            serving_conn_id=serving_conn_id,
            **kwargs,
        )
        self.steps = steps
        self.mode = mode
        self.shadow_percent = shadow_percent
        self.approval = approval
        self.analysis_seconds = analysis_seconds
        self.max_wait_seconds = max_wait_seconds
        self.criteria = criteria
        self.poll_interval = poll_interval
        self.deferrable = deferrable

    # -- helpers -------------------------------------------------------------------------------

    def _plan(self) -> list[dict[str, Any]]:
        """The analysed stages, in order: the shadow (shadow mode), then the canary steps below 100."""
        from airloop.serving.base import check_mirror

        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        steps = [int(s) for s in self.steps]
        below = 0 if self.mode == "shadow" else 1
        if len(steps) < 1 + below or steps[-1] != 100 or steps[0] <= 0 or steps != sorted(set(steps)):
            needs = " with at least one step below 100" * below
            raise ValueError(
                f"steps must rise from above 0 to 100{needs} (the analysed canary steps), "
                f"got {list(self.steps)}"
            )
        plan = []
        if self.mode == "shadow":
            percent = int(self.shadow_percent)
            check_mirror("shadow_percent", percent)
            plan.append({"kind": "shadow", "weight": 0, "mirror": percent})
        return plan + [{"kind": "canary", "weight": weight} for weight in steps[:-1]]

    def _predictor(self, version: str) -> dict[str, Any]:
        """Fetch the version's OpenVINO IR (checksums verified) into the serving folder."""
        from airloop.openvino_ir import fetch_ir

        client = self.mlflow.client
        run_id = client.get_model_version(self.model_name, str(version)).run_id
        dst_dir = settings.serving_dir() / "models" / self.model_name / str(version)
        fetched = fetch_ir(
            {**self.mlflow.step_config(), "ir_uri": f"runs:/{run_id}/openvino", "dst_dir": str(dst_dir)}
        )
        # model_dir serves a target on this machine; model_uri one that downloads it (Seldon on Kubernetes).
        artifact_uri = client.get_run(run_id).info.artifact_uri
        return {
            "name": predictor_name(version),
            "model_version": str(version),
            "model_dir": fetched["model_dir"],
            "model_uri": f"{artifact_uri}/openvino",
        }

    def _criteria(self) -> dict[str, Any]:
        return {**DEFAULT_CRITERIA, **(self.criteria or {})}

    # -- the rollout ---------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:
        RolloutReportLink.persist(context, path=self.report_path)
        plan = self._plan()
        approval = _flag("approval", self.approval)
        previous = self._load()
        if previous and previous.get("phase") in ("promoting", "rolling_back"):
            self.log.info("resuming the interrupted %s of v%s", previous["phase"], self.version)
            return self._finish(previous)

        from airloop.tracking.registry import aliases

        with self.mlflow.session():
            current = aliases(self.mlflow.tracking_uri, self.model_name)
        champion = current.get("champion")
        if champion is None:
            raise AirflowFailException(f"{self.model_name} has no champion alias: register a version first")
        target = self.serving.target
        report: dict[str, Any] = {
            "deployment": self.deployment,
            "model_name": self.model_name,
            "champion": champion,
            "challenger": str(self.version),
            "mode": self.mode,
            "approval": approval,
            "started": _now(),
            "ended": None,
            "phase": "analysing",
            "decision": None,
            "plan": plan,
            "steps": [],
            "criteria": self._criteria(),
        }
        if str(champion) == str(self.version):
            # The first model of this registered model: nothing to compare with.
            target.deploy(self.deployment, [{**self._predictor(self.version), "weight": 100}])
            self._drop_others(target, keep={predictor_name(self.version)})
            report.update(decision="deployed", phase="done", ended=_now(), champion=None)
            self._save(report)
            self._audit(report)
            self.log.info(
                "v%s is the first champion of %s: serving 100%% of traffic", self.version, self.model_name
            )
            return {"decision": "deployed", "champion": str(self.version), "report": self.report_path}

        if current.get("challenger") not in (None, str(self.version)):
            self.log.warning(
                "alias challenger points to v%s, rolling out v%s", current["challenger"], self.version
            )
        champ = predictor_name(champion)
        state = target.state(self.deployment)
        predictors = [] if champ in state.get("predictors", {}) else [self._predictor(champion)]
        predictors.append(self._predictor(self.version))
        # Start what is missing with no traffic, then move traffic in one change.
        target.deploy(self.deployment, [{**p, "weight": 0} for p in predictors])
        self._apply(report, 0)
        self._drop_others(target, keep={champ, predictor_name(self.version)})
        return self._analyse_step(context, report, 0)

    def _apply(self, report: dict[str, Any], index: int) -> None:
        """Route the traffic of stage ``index`` of the plan."""
        stage = report["plan"][index]
        champ, chal = predictor_name(report["champion"]), predictor_name(self.version)
        if stage["kind"] == "shadow":
            self.serving.target.set_traffic(self.deployment, {champ: 100}, shadow={chal: stage["mirror"]})
        else:
            weight = stage["weight"]
            self.serving.target.set_traffic(self.deployment, {champ: 100 - weight, chal: weight})

    def _drop_others(self, target: Any, *, keep: set[str]) -> None:
        for name in set(target.state(self.deployment).get("predictors", {})) - keep:
            target.remove(self.deployment, name)

    def _analyse_step(self, context: Context, report: dict[str, Any], index: int) -> dict[str, Any]:
        stage = report["plan"][index]
        before = self.serving.target.metrics(self.deployment)
        report["steps"].append({**stage, "started": _now(), "before": before})
        self._save(report)
        if stage["kind"] == "shadow":
            self.log.info(
                "challenger v%s as shadow, %d%% of requests mirrored: analysing",
                self.version,
                stage["mirror"],
            )
        else:
            self.log.info("challenger v%s at %d%% of traffic: analysing", self.version, stage["weight"])
        trigger = SeldonCanaryAnalysisTrigger(
            target_config=self.serving.target_config,
            deployment=self.deployment,
            champion=predictor_name(report["champion"]),
            challenger=predictor_name(self.version),
            before=before,
            criteria=report["criteria"],
            window_seconds=float(self.analysis_seconds),
            max_wait_seconds=float(self.max_wait_seconds),
            poll_interval=float(self.poll_interval),
            mode=stage["kind"],
        )
        kwargs = {"report": report, "index": index}
        if self.deferrable:
            wait = float(self.max_wait_seconds) + float(self.analysis_seconds) + 60
            self.defer(
                trigger=trigger,
                method_name="execute_complete",
                kwargs=kwargs,
                timeout=timedelta(seconds=wait),
            )
        return self.execute_complete(context, asyncio.run(_first_event(trigger)), **kwargs)

    def execute_complete(
        self, context: Context, event: dict[str, Any], report: dict[str, Any], index: int
    ) -> dict[str, Any]:
        from airloop.steps.rollout.canary import analyse

        step = report["steps"][index]
        step["ended"] = _now()
        if event["status"] == "error":
            step.update(verdict="error", reasons=[event["message"]])
            return self._finish({**report, "phase": "rolling_back"})
        verdict = analyse(
            {
                "mode": step["kind"],
                "before": step.pop("before"),
                "after": event["after"],
                "champion": predictor_name(report["champion"]),
                "challenger": predictor_name(self.version),
                "criteria": report["criteria"],
            }
        )
        step.update(
            verdict=verdict["verdict"],
            reasons=verdict["reasons"],
            champion_stats=verdict["champion"],
            challenger_stats=verdict["challenger"],
            tests=verdict["tests"],
        )
        if event["status"] == "timeout":
            step.update(verdict="inconclusive", reasons=[event["message"]])
        self.log.info(
            "%s step %d%%: %s %s",
            step["kind"],
            step.get("mirror", step["weight"]),
            step["verdict"],
            "; ".join(step["reasons"]),
        )
        if step["verdict"] != "pass":
            return self._finish({**report, "phase": "rolling_back"})
        if index + 1 < len(report["plan"]):
            self._apply(report, index + 1)
            return self._analyse_step(context, report, index + 1)
        if report["approval"]:
            return self._await_approval(report)
        # The last step, 100%, is the promotion itself.
        report["steps"].append(
            {"kind": "promotion", "weight": 100, "started": _now(), "verdict": "promoted", "reasons": []}
        )
        return self._finish({**report, "phase": "promoting"})

    def _await_approval(self, report: dict[str, Any]) -> dict[str, Any]:
        """Stop with every window passed: traffic and aliases stay as they are until a person decides."""
        last = report["steps"][-1]
        report["steps"].append(
            {
                "kind": "approval",
                "weight": last["weight"],
                "started": _now(),
                "verdict": "awaiting",
                "reasons": ["every analysis window passed: waiting for a person to approve the promotion"],
            }
        )
        report["phase"] = "awaiting_approval"
        self._save(report)
        self._audit({**report, "decision": "awaiting_approval"})
        self.log.info(
            "v%s passed every window; held at %s %d%% for approval",
            self.version,
            last["kind"],
            last.get("mirror", last["weight"]),
        )
        return {
            "decision": "awaiting_approval",
            "champion": str(report["champion"]),
            "challenger": str(self.version),
            "steps": _result_steps(report),
            "report": self.report_path,
        }


class SeldonFinishRolloutOperator(_RolloutOperator):
    """
    Finish a rollout held for approval (``SeldonRolloutChallengerOperator(approval=True)``).

    Reads the approval task's result (Airflow's ``ApprovalOperator``): ``Approve`` promotes the
    challenger (100% of traffic, MLflow alias ``champion``); anything else rolls it back (champion at
    100%, version marked rejected) and fails, whether the person rejected it, the wait timed out or
    the approval task failed. Run it after the approval task whatever that task's outcome (e.g.
    ``trigger_rule="all_done_min_one_success"`` with the rollout upstream too, and the approval task
    with ``fail_on_reject=True`` so that a rejection cannot skip this task). A retry finishes an
    interrupted promotion or rollback; a finished rollout gives the same result again.

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
        deployment: str = "airloop",
        approval_task_id: str = "approve",
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name=model_name, version=version, deployment=deployment, **kwargs)
        self.approval_task_id = approval_task_id

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow.providers.standard.operators.hitl import ApprovalOperator

        RolloutReportLink.persist(context, path=self.report_path)
        report = self._load()
        if report is None:
            raise AirflowFailException(
                f"no rollout report at {self.report_path}: nothing to finish (run "
                "SeldonRolloutChallengerOperator with approval=True first)"
            )
        phase = report.get("phase")
        if phase in ("promoting", "rolling_back"):
            self.log.info("resuming the interrupted %s of v%s", phase, self.version)
            return self._finish(report)
        if phase == "done" and report.get("decision") in ("promoted", "rolled_back"):
            return self._conclude(report)
        if phase != "awaiting_approval":
            raise AirflowFailException(
                f"the rollout of v{self.version} is in phase {phase!r}, not awaiting approval"
            )
        answer = context["ti"].xcom_pull(task_ids=self.approval_task_id) or {}
        approved = list(answer.get("chosen_options") or []) == [ApprovalOperator.APPROVE]
        user = answer.get("responded_by_user") or {}
        who = user.get("name") or user.get("id")
        step = report["steps"][-1]
        step.update(ended=_now(), verdict="approved" if approved else "rejected", by=who)
        if approved:
            step["reasons"] = [f"approved by {who}"]
            report["steps"].append(
                {"kind": "promotion", "weight": 100, "started": _now(), "verdict": "promoted", "reasons": []}
            )
            return self._finish({**report, "phase": "promoting"})
        step["reasons"] = [
            f"rejected by {who}"
            if answer
            else f"task {self.approval_task_id!r} returned no approval (rejected, timed out or failed)"
        ]
        return self._finish({**report, "phase": "rolling_back"})


def _audit_step(step: dict[str, Any]) -> dict[str, Any]:
    """A step of the report as the audit record keeps it: what was decided and on which figures."""
    keys = ("kind", "weight", "mirror", "verdict", "reasons", "by")
    entry = {key: step[key] for key in keys if key in step}
    tests = step.get("tests") or {}
    if step.get("kind") == "shadow" and tests:
        challenger = step.get("challenger_stats") or {}
        entry["diff"] = {
            "agreement": challenger.get("agreement"),
            "pairs": challenger.get("pairs"),
            "distribution_distance": tests.get("distribution", {}).get("distance"),
            "p99_ms": {
                "champion": (step.get("champion_stats") or {}).get("p99_ms"),
                "challenger": challenger.get("p99_ms"),
            },
        }
    return entry


def _audit_steps(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [_audit_step(step) for step in report.get("steps", [])]


def _result_steps(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: s.get(k) for k in ("kind", "weight", "verdict")} for s in report["steps"]]


async def _first_event(trigger: SeldonCanaryAnalysisTrigger) -> dict[str, Any]:
    """Run the trigger in the worker (deferrable=False): the same wait, in a worker slot."""
    async for event in trigger.run():
        return event.payload
    raise AirflowException("the canary analysis trigger ended without an event")
