"""Champion/challenger rollout: traffic steps with automated analysis, then promote or roll back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from functools import cached_property
from typing import Any

from airflow.sdk import BaseOperator, Context, conf
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airloop import artefacts, settings
from airloop.hooks.mlflow import MlflowHook
from airloop.hooks.serving import ServingHook
from airloop.links.reports import RolloutReportLink
from airloop.steps.canary import DEFAULT_CRITERIA
from airloop.triggers.seldon import SeldonCanaryAnalysisTrigger

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def predictor_name(version: str | int) -> str:
    return f"v{version}"


class SeldonRolloutChallengerOperator(BaseOperator):
    """
    Roll a registered model version out next to the champion and let the data decide.

    Traffic moves through ``steps`` (percent to the challenger); after each step below 100 an analysis
    window compares challenger and champion on error rate, p99 latency and accuracy from feedback labels.
    A failed or inconclusive window rolls back: the champion takes 100% and the version is marked
    rejected. When every window passed, the last step (100) promotes the challenger: it takes 100%, the MLflow alias
    ``champion`` moves to it and the old champion keeps ``previous``. The first model of a registered
    model (it is already ``champion``) is simply deployed at 100%.

    Writes happen in a fixed order and the rollout report records the phase before each one, so a
    retried task finishes an interrupted promotion or rollback instead of starting over.

    :param model_name: registered model name in MLflow.
    :param version: the model version to roll out (the ``challenger``).
    :param deployment: the serving deployment's name.
    :param steps: challenger traffic percentages, ending at 100.
    :param analysis_seconds: minimum length of each analysis window.
    :param max_wait_seconds: how long a window may wait for enough data before rolling back.
    :param criteria: overrides of ``DEFAULT_CRITERIA`` (see ``airloop.steps.canary.analyse``).
    """

    template_fields: Sequence[str] = ("model_name", "version", "deployment", "steps", "analysis_seconds",
                                      "max_wait_seconds", "criteria")
    operator_extra_links = (RolloutReportLink(),)

    def __init__(
        self,
        *,
        model_name: str,
        version: str,
        deployment: str = "airloop",
        steps: Sequence[int] = (10, 25, 50, 100),
        analysis_seconds: float = 30.0,
        max_wait_seconds: float = 300.0,
        criteria: dict[str, Any] | None = None,
        poll_interval: float = 1.0,
        mlflow_conn_id: str = MlflowHook.default_conn_name,
        serving_conn_id: str = ServingHook.default_conn_name,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.version = version
        self.deployment = deployment
        self.steps = steps
        self.analysis_seconds = analysis_seconds
        self.max_wait_seconds = max_wait_seconds
        self.criteria = criteria
        self.poll_interval = poll_interval
        self.mlflow_conn_id = mlflow_conn_id
        self.serving_conn_id = serving_conn_id
        self.deferrable = deferrable

    # -- helpers -------------------------------------------------------------------------------

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

    def _predictor(self, version: str) -> dict[str, Any]:
        """Fetch the version's OpenVINO IR (checksums verified) into the serving folder."""
        from airloop.steps.convert import fetch_ir

        client = self.mlflow.client
        run_id = client.get_model_version(self.model_name, str(version)).run_id
        fetched = fetch_ir({"tracking_uri": self.mlflow.tracking_uri, "ir_uri": f"runs:/{run_id}/openvino",
                            "dst_dir": str(settings.serving_dir() / "models" / self.model_name / str(version))})
        # model_dir serves a target on this machine; model_uri one that downloads it (Seldon on Kubernetes).
        return {"name": predictor_name(version), "model_version": str(version), "model_dir": fetched["model_dir"],
                "model_uri": f"{client.get_run(run_id).info.artifact_uri}/openvino"}

    def _criteria(self) -> dict[str, Any]:
        return {**DEFAULT_CRITERIA, **(self.criteria or {})}

    def _audit(self, report: dict[str, Any]) -> None:
        from airloop.steps.registry import append_audit

        run_id = self.mlflow.client.get_model_version(self.model_name, str(self.version)).run_id
        summary = {key: report.get(key) for key in ("decision", "champion", "challenger", "started", "ended")}
        summary["steps"] = [{key: step.get(key) for key in ("weight", "verdict", "reasons")}
                            for step in report.get("steps", [])]
        summary["report"] = self.report_path
        append_audit({"tracking_uri": self.mlflow.tracking_uri, "run_id": run_id, "stage": "rollout",
                      "record": summary})

    # -- the rollout ---------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:
        RolloutReportLink.persist(context, path=self.report_path)
        steps = [int(s) for s in self.steps]
        if len(steps) < 2 or steps[-1] != 100 or steps[0] <= 0 or steps != sorted(set(steps)):
            raise ValueError(f"steps must rise from above 0 to 100 with at least one step below 100 "
                             f"(the analysed canary steps), got {list(self.steps)}")
        previous = self._load()
        if previous and previous.get("phase") in ("promoting", "rolling_back"):
            self.log.info("resuming the interrupted %s of v%s", previous["phase"], self.version)
            return self._finish(previous)

        from airloop.steps.registry import aliases

        current = aliases(self.mlflow.tracking_uri, self.model_name)
        champion = current.get("champion")
        if champion is None:
            raise AirflowFailException(f"{self.model_name} has no champion alias: register a version first")
        target = self.serving.target
        report: dict[str, Any] = {
            "deployment": self.deployment, "model_name": self.model_name, "champion": champion,
            "challenger": str(self.version), "started": _now(), "ended": None, "phase": "canary",
            "decision": None, "steps": [], "criteria": self._criteria(),
        }
        if str(champion) == str(self.version):
            # The first model of this registered model: nothing to compare with.
            target.deploy(self.deployment, [{**self._predictor(self.version), "weight": 100}])
            self._drop_others(target, keep={predictor_name(self.version)})
            report.update(decision="deployed", phase="done", ended=_now(), champion=None)
            self._save(report)
            self._audit(report)
            self.log.info("v%s is the first champion of %s: serving 100%% of traffic", self.version,
                          self.model_name)
            return {"decision": "deployed", "champion": str(self.version), "report": self.report_path}

        if current.get("challenger") not in (None, str(self.version)):
            self.log.warning("alias challenger points to v%s, rolling out v%s", current["challenger"],
                             self.version)
        champ, chal = predictor_name(champion), predictor_name(self.version)
        state = target.state(self.deployment)
        predictors = [] if champ in state.get("predictors", {}) else [self._predictor(champion)]
        predictors.append(self._predictor(self.version))
        # Start what is missing with no traffic, then move traffic in one change.
        target.deploy(self.deployment, [{**p, "weight": 0} for p in predictors])
        target.set_traffic(self.deployment, {champ: 100 - steps[0], chal: steps[0]})
        self._drop_others(target, keep={champ, chal})
        return self._analyse_step(context, report, 0)

    def _drop_others(self, target: Any, *, keep: set[str]) -> None:
        for name in set(target.state(self.deployment).get("predictors", {})) - keep:
            target.remove(self.deployment, name)

    def _analyse_step(self, context: Context, report: dict[str, Any], index: int) -> dict[str, Any]:
        weight = int(self.steps[index])
        before = self.serving.target.metrics(self.deployment)
        report["steps"].append({"weight": weight, "started": _now(), "before": before})
        self._save(report)
        self.log.info("challenger v%s at %d%% of traffic: analysing", self.version, weight)
        trigger = SeldonCanaryAnalysisTrigger(
            target_config=self.serving.target_config, deployment=self.deployment,
            champion=predictor_name(report["champion"]), challenger=predictor_name(self.version),
            before=before, criteria=report["criteria"], window_seconds=float(self.analysis_seconds),
            max_wait_seconds=float(self.max_wait_seconds), poll_interval=float(self.poll_interval),
        )
        kwargs = {"report": report, "index": index}
        if self.deferrable:
            self.defer(trigger=trigger, method_name="execute_complete", kwargs=kwargs,
                       timeout=timedelta(seconds=float(self.max_wait_seconds) + float(self.analysis_seconds) + 60))
        return self.execute_complete(context, asyncio.run(_first_event(trigger)), **kwargs)

    def execute_complete(self, context: Context, event: dict[str, Any], report: dict[str, Any],
                         index: int) -> dict[str, Any]:
        from airloop.steps.canary import analyse

        step = report["steps"][index]
        step["ended"] = _now()
        if event["status"] == "error":
            step.update(verdict="error", reasons=[event["message"]])
            return self._finish({**report, "phase": "rolling_back"})
        verdict = analyse({"before": step.pop("before"), "after": event["after"],
                           "champion": predictor_name(report["champion"]),
                           "challenger": predictor_name(self.version), "criteria": report["criteria"]})
        step.update(verdict=verdict["verdict"], reasons=verdict["reasons"], champion_stats=verdict["champion"],
                    challenger_stats=verdict["challenger"])
        if event["status"] == "timeout":
            step.update(verdict="inconclusive", reasons=[event["message"]])
        self.log.info("step %d%%: %s %s", step["weight"], step["verdict"], "; ".join(step["reasons"]))
        if step["verdict"] != "pass":
            return self._finish({**report, "phase": "rolling_back"})
        if index + 2 == len(self.steps):  # the last step, 100%, is the promotion itself
            report["steps"].append({"weight": 100, "started": _now(), "verdict": "promoted", "reasons": []})
            return self._finish({**report, "phase": "promoting"})
        weight = int(self.steps[index + 1])
        self.serving.target.set_traffic(self.deployment, {predictor_name(report["champion"]): 100 - weight,
                                                          predictor_name(self.version): weight})
        return self._analyse_step(context, report, index + 1)

    def _finish(self, report: dict[str, Any]) -> dict[str, Any]:
        """Promote or roll back. Each write is idempotent, so a retry can redo the whole sequence."""
        from airloop.steps.registry import promote, reject

        self._save(report)  # the phase is on record before the first write
        target = self.serving.target
        champ, chal = predictor_name(report["champion"]), predictor_name(self.version)
        request = {"tracking_uri": self.mlflow.tracking_uri, "model_name": self.model_name,
                   "version": str(self.version)}
        if report["phase"] == "promoting":
            target.set_traffic(self.deployment, {champ: 0, chal: 100})
            promote(request)
            target.remove(self.deployment, champ)
            report["decision"] = "promoted"
        else:
            target.set_traffic(self.deployment, {champ: 100, chal: 0})
            reject({**request, "reason": {"steps": report["steps"]}})
            target.remove(self.deployment, chal)
            report["decision"] = "rolled_back"
        report.update(phase="done", ended=_now())
        self._save(report)
        self._audit(report)
        if report["decision"] == "rolled_back":
            last = report["steps"][-1] if report["steps"] else {}
            raise AirflowFailException(
                f"v{self.version} rolled back at {last.get('weight')}% ({last.get('verdict')}): "
                + "; ".join(last.get("reasons", []))
            )
        self.log.info("v%s promoted: champion of %s with 100%% of traffic", self.version, self.model_name)
        return {"decision": "promoted", "champion": str(self.version), "previous": str(report["champion"]),
                "steps": [{k: s.get(k) for k in ("weight", "verdict")} for s in report["steps"]],
                "report": self.report_path}


async def _first_event(trigger: SeldonCanaryAnalysisTrigger) -> dict[str, Any]:
    """Run the trigger in the worker (deferrable=False): the same wait, in a worker slot."""
    async for event in trigger.run():
        return event.payload
    raise AirflowException("the canary analysis trigger ended without an event")
