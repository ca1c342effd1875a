"""The rollout of a model version next to the champion: a state machine over a serving target
(``airloop.serving.base.ServingTarget``) and the model registry (``airloop.tracking.registry``).

The plan: in ``shadow`` mode first a shadow window (the challenger gets ``shadow_percent`` % of the
requests mirrored, its answers reach no client), then one canary window per step below 100. A window
that fails rolls back: the champion takes 100 %, the challenger is removed and its version is
tagged rejected. A window still short of data when its wait ends (too few labelled requests on
either predictor, mostly: labels that come late) is ``inconclusive``, never a pass; ``on_inconclusive``
says what follows: ``rollback``, ``extend`` (the same window waited for again, its data kept, up to
``max_extensions`` times, then rolled back) or ``hold`` (the approval hold below, with the reason;
approving promotes). Before any of them, an inconclusive window gets the early warning when the rollout has
an ``estimate`` (CBPE per arm on the logged answers): a challenger whose estimated accuracy is clearly
worse than the champion's fails the window and is rolled back without waiting for its labels; an
estimate never passes one. When every window passed, the last step (100) promotes: the challenger takes
100 %, the alias ``champion`` moves to it and ``previous`` keeps the old one; with ``approval`` the rollout
holds instead (phase ``awaiting_approval``, traffic and aliases unchanged) until ``decide``. The first
model of a registered model (it is already ``champion``) is simply deployed at 100 %.

The windows are waited for elsewhere (``airloop.triggers.rollout.RolloutTrigger``, in the triggerer
or the worker): ``start`` returns the ``Window`` to wait for, ``record_window`` takes the trigger's
event, which carries the verdict, and returns the next window or the result.

A rollout survives being killed at any point. The report (``RolloutReport``, one file per attempt; a
later attempt never overwrites an earlier one's) records the phase before each write, every write is
idempotent, and whoever comes next continues from it:

- ``deploying``, ``analysing``: ``start`` (a retry, a cleared task) resumes: the interrupted window is
  marked ``interrupted`` and opened again at the same traffic. ``decide`` (the finish task), ``abort``
  (``on_kill``) and an error put all traffic back on the champion instead (phase ``aborting``,
  decision ``aborted``, the reason in the report and the audit; not a verdict, so no rejection).
- ``promoting``, ``rolling_back``, ``aborting``: everyone completes the sequence.
- ``done``: a deployment or promotion gives its result again. A rolled-back version stays rejected
  (the registry's tag): it is not deployed again unless ``allow_rejected`` (a person's decision)
  lifts the tag, which starts a new attempt, as ``start`` does after an aborted one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from airloop import settings
from airloop.serving.base import ServingTarget, check_deployment_name, check_mirror
from airloop.steps.rollout.canary import MODES, check_criteria, estimated_accuracy_test
from airloop.steps.rollout.report import Folder, Reports, audit_record, audit_steps, now, result
from airloop.steps.rollout.requests import (
    Metrics,
    RolloutReport,
    RolloutRequest,
    RolloutResult,
    RolloutStep,
    Stage,
    WindowEvent,
)
from airloop.steps.rollout.traffic import Deployment, predictor_name
from airloop.tracking.registry import (
    CHAMPION,
    REJECTED_TAG,
    aliases,
    append_audit,
    promote,
    registry_client,
    reject,
)
from airloop.tracking.session import mlflow_calls

DEPLOYING, ANALYSING, AWAITING = "deploying", "analysing", "awaiting_approval"
PROMOTING, ROLLING_BACK, ABORTING, DONE = "promoting", "rolling_back", "aborting", "done"
# Phases in which a decision is being carried out: whoever comes next completes it.
FINISHING = (PROMOTING, ROLLING_BACK, ABORTING)
DECISIONS = {PROMOTING: "promoted", ROLLING_BACK: "rolled_back", ABORTING: "aborted"}
INCONCLUSIVE_ACTIONS = ("rollback", "extend", "hold")
LABEL_SOURCES = ("metrics", "log")
_T = TypeVar("_T")
# (versions, since) -> {version: its figures, with estimated_accuracy and sampling_error}
Estimate = Callable[[list[str], float], Mapping[str, Mapping[str, Any]]]


class RolloutStopped(RuntimeError):
    """The rollout was aborted, or moved on elsewhere, while this call of it was under way."""


@dataclass(frozen=True)
class Window:
    """An analysis window to wait for: the trigger's arguments, and the report entry (``step``) it closes."""

    step: int
    mode: str
    deployment: str
    champion: str
    challenger: str
    before: Metrics
    criteria: dict[str, float]
    window_seconds: float
    max_wait_seconds: float
    poll_interval: float
    labels_root: str | None = None
    labels_since: float | None = None

    def trigger_kwargs(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key != "step"}


class Rollout:
    """One rollout: its request, the serving target it drives, and its reports under ``root``.

    ``start`` and ``record_window`` return the next ``Window`` or the ``RolloutResult``; a result
    whose decision is ``rolled_back``, ``aborted`` or ``refused`` carries the ``message`` with which
    the task fails.
    """

    def __init__(
        self,
        request: RolloutRequest | Mapping[str, Any],
        target: ServingTarget,
        root: Folder,
        log: Any = None,
        estimate: Estimate | None = None,
    ) -> None:
        self.request = RolloutRequest.parse(request)
        check_deployment_name(self.request.deployment)
        self.deployment = Deployment(target, self.request.deployment, self.predictor, self._guard)
        self.reports = Reports(root, self.request.deployment, self.request.model_name, self.request.version)
        self.log = log or logging.getLogger(__name__)
        # Per version, each arm's CBPE estimate over the answers since a time: the early warning of an
        # inconclusive window (``_early_warning``); None: no estimate.
        self.estimate = estimate
        self._stopped = False

    # -- entry points ----------------------------------------------------------------------------

    def start(self) -> Window | RolloutResult:
        """Begin the rollout, or continue it from its latest report."""
        return self._aborting_on_error(self._start)

    def record_window(self, step: int, event: WindowEvent) -> Window | RolloutResult:
        """Close the window ``step`` of the report with the trigger's event; open the next or finish."""
        return self._aborting_on_error(lambda: self._record_window(step, event))

    def decide(self, *, approved: bool, by: str | None, reason: str) -> RolloutResult:
        """Finish a rollout held for approval: promote when a person approved, else roll back.

        A rollout that stopped before a decision (its task failed or was killed) is aborted: there is
        nothing to approve. A promotion or rollback under way is completed; a finished one gives its
        result again.
        """
        report = self.reports.load()
        if report is None:
            raise ValueError(
                f"no rollout report at {self.reports.path()}: nothing to finish "
                "(run the rollout with approval=True first)"
            )
        phase = report["phase"]
        if phase in FINISHING:
            self.log.info("resuming the interrupted %s of v%s", phase, self.request.version)
            return self._finish(report)
        if phase == DONE:
            return self._result(report)
        if phase != AWAITING:
            return self._abort(
                report, f"the rollout stopped in phase {phase!r} before a decision: nothing to approve"
            )
        hold = report["steps"][-1]
        hold.update(
            {
                "ended": now(),
                "verdict": "approved" if approved else "rejected",
                "by": by,
                "reasons": [reason],
            }
        )
        if approved:
            report["steps"].append(self._promotion_step())
            return self._finish(report, PROMOTING)
        return self._finish(report, ROLLING_BACK)

    def abort(self, reason: str) -> RolloutResult | None:
        """Stop now (the task is being killed): all traffic back on the champion, or, when a promotion
        or rollback is under way, complete it. A call of this object that the kill interrupted writes
        nothing after this: it raises ``RolloutStopped`` at its next write."""
        try:
            report = self.reports.load()
            if report is None or report["phase"] in (DONE, AWAITING):
                return None
            if report["phase"] in FINISHING:
                return self._finish(report)
            return self._abort(report, reason)
        finally:
            self._stopped = True

    def predictor(self, version: str) -> dict[str, Any]:
        """The version's predictor: its OpenVINO IR fetched (checksums verified) into the serving folder."""
        from airloop.openvino_ir import fetch_ir

        name = self.request.model_name
        with self._mlflow():
            client = registry_client(self.request.tracking_uri)
            run_id = str(client.get_model_version(name, version).run_id)
            dst_dir = settings.serving_dir() / "models" / name / version
            fetched = fetch_ir(
                {**self.request.mlflow(), "ir_uri": f"runs:/{run_id}/openvino", "dst_dir": str(dst_dir)}
            )
            artifact_uri = client.get_run(run_id).info.artifact_uri
        # model_dir serves a target on this machine; model_uri one that downloads it (Seldon on Kubernetes).
        return {
            "name": predictor_name(version),
            "model_version": version,
            "model_dir": fetched["model_dir"],
            "model_uri": f"{artifact_uri}/openvino",
        }

    def _save(self, report: RolloutReport) -> None:
        self._guard()
        self.reports.save(report)

    # -- the state machine -----------------------------------------------------------------------

    def _start(self) -> Window | RolloutResult:
        report = self.reports.load()
        if report is not None:
            phase = report["phase"]
            if phase in (DEPLOYING, ANALYSING):
                return self._resume(report)
            if phase == AWAITING:
                return self._result(report)
            if phase in FINISHING:
                self.log.info("resuming the interrupted %s of v%s", phase, self.request.version)
                report = self._finish_report(report)
                if report["decision"] != "aborted":
                    return self._result(report)
            elif report["decision"] in ("deployed", "promoted"):
                return self._result(report)
        return self._begin(1 + max(self.reports.attempts(), default=0))

    def _begin(self, attempt: int) -> Window | RolloutResult:
        request, version = self.request, self.request.version
        plan = self._plan()
        criteria = check_criteria(request.criteria)
        with self._mlflow():
            champion = aliases(request.tracking_uri, request.model_name).get(CHAMPION)
            if champion is None:
                raise ValueError(f"{request.model_name} has no champion alias: register a version first")
            rejected = self._rejection() if champion != version else None
        if rejected is not None:
            if not request.allow_rejected:
                return self._refused(rejected)
            self._lift_rejection()
            self.log.warning("v%s was rejected (%s): rolled out again (allow_rejected)", version, rejected)
        report: RolloutReport = {
            "attempt": attempt,
            "deployment": request.deployment,
            "model_name": request.model_name,
            "champion": champion,
            "challenger": version,
            "mode": request.mode,
            "approval": request.approval,
            "started": now(),
            "ended": None,
            "phase": DEPLOYING,
            "decision": None,
            "reason": None,
            "rejection_lifted": rejected is not None,
            "plan": plan,
            "steps": [],
            "criteria": criteria,
        }
        if champion == version:
            # The first model of this registered model: nothing to compare with, and nothing to record
            # before the writes, which a retry simply repeats.
            report["champion"] = None
            self.deployment.route_all(version)
            self.deployment.remove_others(keep={predictor_name(version)})
            report.update({"decision": "deployed", "phase": DONE, "ended": now()})
            self._audit(report)
            self._save(report)
            self.log.info(
                "v%s is the first champion of %s: serving 100%% of traffic", version, request.model_name
            )
            return self._result(report)
        self._save(report)  # the phase is on record before the first write
        self.deployment.ensure(champion, version)
        return self._open_window(report, 0)

    def _resume(self, report: RolloutReport) -> Window:
        stage = 0
        steps = report["steps"]
        if steps:
            last = steps[-1]
            stage = last.get("stage", 0)
            if "ended" not in last:
                last.pop("before", None)
                last.update(
                    {
                        "ended": now(),
                        "verdict": "interrupted",
                        "reasons": ["the rollout was interrupted during this window: it is analysed again"],
                    }
                )
        self.log.info(
            "resuming the rollout of v%s (%s) at stage %d", self.request.version, report["phase"], stage
        )
        return self._open_window(report, stage)

    def _open_window(self, report: RolloutReport, index: int) -> Window:
        stage = report["plan"][index]
        champ, chal = self._names(report)
        step = _stage_step(stage, index)
        report["phase"] = ANALYSING
        report["steps"].append(step)
        self._save(report)  # the window is on record before its traffic moves
        self.deployment.ensure(str(report["champion"]), self.request.version)
        if stage["kind"] == "shadow":
            self.deployment.route({champ: 100}, shadow={chal: stage["mirror"]})
            self.log.info(
                "v%s as shadow, %d%% of requests mirrored: analysing", self.request.version, stage["mirror"]
            )
        else:
            self.deployment.route({champ: 100 - stage["weight"], chal: stage["weight"]})
            self.log.info("v%s at %d%% of traffic: analysing", self.request.version, stage["weight"])
        self.deployment.remove_others(keep={champ, chal})
        step["since"] = time.time()
        step["before"] = self.deployment.metrics()
        self._save(report)
        return self._window(report, stage["kind"], champ, chal, step["before"], step["since"])

    def _window(
        self, report: RolloutReport, mode: str, champion: str, challenger: str, before: Metrics, since: float
    ) -> Window:
        """The window of the report's last step, to wait for."""
        return Window(
            step=len(report["steps"]) - 1,
            mode=mode,
            deployment=self.request.deployment,
            champion=champion,
            challenger=challenger,
            before=before,
            criteria=report["criteria"],
            window_seconds=self.request.analysis_seconds,
            max_wait_seconds=self.request.max_wait_seconds,
            poll_interval=self.request.poll_interval,
            labels_root=settings.artefact_root() if self.request.labels_from == "log" else None,
            labels_since=since,
        )

    def _record_window(self, index: int, event: WindowEvent) -> Window | RolloutResult:
        report = self.reports.load()
        if report is None:
            raise ValueError(f"no rollout report at {self.reports.path()}")
        if report["phase"] == DONE:
            return self._result(report)  # aborted, or finished by another task, meanwhile
        steps = report["steps"]
        if report["phase"] != ANALYSING or index != len(steps) - 1 or "ended" in steps[index]:
            raise RolloutStopped(
                f"the event of window {index} came after the rollout moved on (phase {report['phase']!r})"
            )
        step = steps[index]
        before = step.pop("before")  # on record since the window opened
        since = step["since"]
        step["ended"] = now()
        verdict = event["verdict"]
        if event["status"] == "error" or verdict is None:
            step.update({"verdict": "error", "reasons": [event["message"]]})
            return self._finish(report, ROLLING_BACK)
        # The trigger analysed the window: its verdict is recorded as it is.
        step.update(
            {
                "verdict": verdict["verdict"],
                "reasons": verdict["reasons"],
                "champion_stats": verdict["champion"],
                "challenger_stats": verdict["challenger"],
                "tests": verdict["tests"],
            }
        )
        if event["status"] == "timeout":
            step.update({"verdict": "inconclusive", "reasons": [event["message"]]})
        self.log.info(
            "%s step %d%%: %s %s",
            step["kind"],
            step.get("mirror", step["weight"]),
            step["verdict"],
            "; ".join(step["reasons"]),
        )
        if step["verdict"] == "inconclusive":
            return self._inconclusive(report, step, before, since)
        if step["verdict"] != "pass":
            return self._finish(report, ROLLING_BACK)
        if step.get("stage", 0) + 1 < len(report["plan"]):
            return self._open_window(report, step.get("stage", 0) + 1)
        if report["approval"]:
            return self._await_approval(
                report, "every analysis window passed: waiting for a person to approve the promotion"
            )
        report["steps"].append(self._promotion_step())  # the last step, 100 %, is the promotion itself
        return self._finish(report, PROMOTING)

    def _inconclusive(
        self, report: RolloutReport, step: RolloutStep, before: Metrics, since: float
    ) -> Window | RolloutResult:
        """A window short of data when its wait ended: extend it, hold for approval or roll back."""
        if self._early_warning(report, step, since):
            return self._finish(report, ROLLING_BACK)
        action, limit = self.request.on_inconclusive, self.request.max_extensions
        stage = step.get("stage", 0)
        if action == "hold":
            where = f"{step['kind']} {step.get('mirror', step['weight'])}%"
            return self._await_approval(
                report,
                f"the window at {where} was inconclusive: waiting for a person to approve the promotion "
                "or reject it (on_inconclusive='hold')",
            )
        done = sum(1 for s in report["steps"] if s.get("stage") == stage and s.get("verdict") == "extended")
        if action == "extend" and done < limit:
            step["verdict"] = "extended"
            step["reasons"] = [*step["reasons"], f"extension {done + 1} of {limit}: the window goes on"]
            return self._extend_window(report, stage, before, since, done + 1)
        if action == "extend":
            step["reasons"] = [*step["reasons"], f"still inconclusive after {limit} extensions"]
        return self._finish(report, ROLLING_BACK)

    def _early_warning(self, report: RolloutReport, step: RolloutStep, since: float) -> bool:
        """While labels are pending, each arm's accuracy estimated (CBPE) on its answers since the window
        opened: a challenger clearly worse is failed now (``canary.estimated_accuracy_test``)."""
        if self.estimate is None:
            return False
        champion, challenger = str(report["champion"]), self.request.version
        try:
            figures = self.estimate([champion, challenger], since)
        except Exception as exc:  # a missing runtime, an unreadable log: the window stays inconclusive
            self.log.warning("no accuracy estimate for the inconclusive window: %s", exc)
            return False
        test = estimated_accuracy_test(figures.get(champion), figures.get(challenger), report["criteria"])
        step.setdefault("tests", {})["estimated_accuracy"] = test
        self.log.info("estimated accuracy: %s", test["reason"])
        if test["status"] != "fail":
            return False
        step["verdict"] = "fail"
        step["reasons"] = [*step["reasons"], f"estimated_accuracy: {test['reason']}"]
        return True

    def _extend_window(
        self, report: RolloutReport, index: int, before: Metrics, since: float, extension: int
    ) -> Window:
        """The window of stage ``index`` again, counted from the same ``before``: traffic stays as it is."""
        stage = report["plan"][index]
        champ, chal = self._names(report)
        step = _stage_step(stage, index)
        step["extension"], step["before"], step["since"] = extension, before, since
        report["steps"].append(step)
        self._save(report)
        self.log.info("v%s: window of stage %d extended (%d)", self.request.version, index, extension)
        return self._window(report, stage["kind"], champ, chal, before, since)

    def _await_approval(self, report: RolloutReport, reason: str) -> RolloutResult:
        """Hold: traffic and aliases stay as they are until a person decides (``decide``)."""
        last = report["steps"][-1]
        report["steps"].append(
            {
                "kind": "approval",
                "weight": last["weight"],
                "started": now(),
                "verdict": "awaiting",
                "reasons": [reason],
            }
        )
        report["phase"] = AWAITING
        self._save(report)
        self._audit(report)
        self.log.info(
            "v%s passed every window; held at %s %d%% for approval",
            self.request.version,
            last["kind"],
            last.get("mirror", last["weight"]),
        )
        return self._result(report)

    def _abort(self, report: RolloutReport, reason: str) -> RolloutResult:
        steps = report["steps"]
        if steps and "ended" not in steps[-1]:
            steps[-1].pop("before", None)
            steps[-1].update({"ended": now(), "verdict": "aborted", "reasons": [reason]})
        report["reason"] = reason
        self.log.warning("aborting the rollout of v%s: %s", self.request.version, reason)
        return self._finish(report, ABORTING)

    def _finish(self, report: RolloutReport, phase: str | None = None) -> RolloutResult:
        return self._result(self._finish_report(report, phase))

    def _finish_report(self, report: RolloutReport, phase: str | None = None) -> RolloutReport:
        """Promote, roll back or abort. Each write is idempotent, so a retry redoes the whole sequence."""
        if phase is not None:
            report["phase"] = phase
        self._save(report)  # the phase is on record before the first write
        champion, version = str(report["champion"]), self.request.version
        registry = {**self.request.mlflow(), "model_name": self.request.model_name, "version": version}
        if report["phase"] == PROMOTING:
            self.deployment.route_all(version)
            with self._mlflow():
                self._guard()
                promote(registry)
            self.deployment.remove_others(keep={predictor_name(version)})
        else:
            # A shadow is not named here: it is removed with the other predictors.
            self.deployment.route_all(champion)
            if report["phase"] == ROLLING_BACK:
                with self._mlflow():
                    self._guard()
                    reject({**registry, "reason": {"steps": audit_steps(report)}})
            self.deployment.remove_others(keep={predictor_name(champion)})
        report.update({"decision": DECISIONS[report["phase"]], "ended": now()})
        # Audit before the last save: a kill in between redoes the sequence, audit included.
        self._audit(report)
        report["phase"] = DONE
        self._save(report)
        return report

    def _result(self, report: RolloutReport) -> RolloutResult:
        done = result(report, self.reports.path(report["attempt"]))
        if done["decision"] == "promoted":
            self.log.info(
                "v%s promoted: champion of %s with 100%% of traffic", done["champion"], report["model_name"]
            )
        return done

    def _refused(self, why: str) -> RolloutResult:
        return {
            "decision": "refused",
            "report": self.reports.path(),
            "message": f"v{self.request.version} of {self.request.model_name} is rejected ({why}): it is "
            "not rolled out again unless a person says so (allow_rejected=True)",
        }

    def _plan(self) -> list[Stage]:
        """The analysed stages, in order: the shadow (shadow mode), then the canary steps below 100."""
        request = self.request
        if request.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {request.mode!r}")
        steps = [int(s) for s in request.steps]
        below = 0 if request.mode == "shadow" else 1
        if len(steps) < 1 + below or steps[-1] != 100 or steps[0] <= 0 or steps != sorted(set(steps)):
            needs = " with at least one step below 100" * below
            raise ValueError(
                f"steps must rise from above 0 to 100{needs} (the analysed canary steps), "
                f"got {list(request.steps)}"
            )
        if request.on_inconclusive not in INCONCLUSIVE_ACTIONS:
            raise ValueError(
                f"on_inconclusive must be one of {list(INCONCLUSIVE_ACTIONS)}, "
                f"got {request.on_inconclusive!r}"
            )
        if request.labels_from not in LABEL_SOURCES:
            raise ValueError(f"labels_from must be one of {list(LABEL_SOURCES)}, got {request.labels_from!r}")
        if request.max_extensions < 0:
            raise ValueError(f"max_extensions must be 0 or more, got {request.max_extensions}")
        plan: list[Stage] = []
        if request.mode == "shadow":
            check_mirror("shadow_percent", request.shadow_percent)
            plan.append({"kind": "shadow", "weight": 0, "mirror": request.shadow_percent})
        return plan + [{"kind": "canary", "weight": weight} for weight in steps[:-1]]

    @staticmethod
    def _promotion_step() -> RolloutStep:
        return {"kind": "promotion", "weight": 100, "started": now(), "verdict": "promoted", "reasons": []}

    def _names(self, report: RolloutReport) -> tuple[str, str]:
        return predictor_name(str(report["champion"])), predictor_name(self.request.version)

    def _audit(self, report: RolloutReport) -> None:
        request = {
            **self.request.mlflow(),
            "model_name": self.request.model_name,
            "version": self.request.version,
        }
        with self._mlflow():
            self._guard()
            append_audit({**request, "stage": "rollout", "record": audit_record(report, self.reports)})

    # -- the registry ----------------------------------------------------------------------------

    @contextmanager
    def _mlflow(self) -> Iterator[None]:
        with mlflow_calls(self.request.mlflow()):
            yield

    def _rejection(self) -> str | None:
        """Why the version is rejected (the registry's tag), or ``None``."""
        version = registry_client(self.request.tracking_uri).get_model_version(
            self.request.model_name, self.request.version
        )
        if version.tags.get(REJECTED_TAG, "").lower() != "true":
            return None
        return version.tags.get(f"{REJECTED_TAG}.reason") or "no reason recorded"

    def _lift_rejection(self) -> None:
        with self._mlflow():
            client = registry_client(self.request.tracking_uri)
            for tag in (REJECTED_TAG, f"{REJECTED_TAG}.reason"):
                self._guard()
                client.delete_model_version_tag(self.request.model_name, self.request.version, tag)

    # -- kills and errors ------------------------------------------------------------------------

    def _guard(self) -> None:
        if self._stopped:
            raise RolloutStopped(f"the rollout of v{self.request.version} was aborted while this call ran")

    def _aborting_on_error(self, call: Callable[[], _T]) -> _T:
        """Run ``call``; when it fails with traffic possibly split, put all traffic back on the champion."""
        try:
            return call()
        except RolloutStopped:
            raise
        except Exception as exc:
            report = self.reports.load()
            if report is not None and report["phase"] in (DEPLOYING, ANALYSING):
                try:
                    self._abort(report, f"{type(exc).__name__}: {exc}")
                except Exception:
                    self.log.exception("could not put all traffic back on the champion after the error")
            raise


def _stage_step(stage: Stage, index: int) -> RolloutStep:
    """The report's record of one window of the plan's stage ``index``, as it opens."""
    step: RolloutStep = {"kind": stage["kind"], "weight": stage["weight"], "stage": index, "started": now()}
    if "mirror" in stage:
        step["mirror"] = stage["mirror"]
    return step
