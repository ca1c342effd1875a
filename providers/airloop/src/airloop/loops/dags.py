# DAG wiring passes XComArgs (indexed: ``.output["uri"]``) and templates where operators declare the
# values they resolve to, as every DAG file does; the operators check what they receive.
# mypy: disable-error-code="index, arg-type"
"""A loop spec's two DAGs: ``<name>_loop`` (one retraining turn) and ``<name>_drift_monitor``.

``loop_dags(spec)`` builds them from a ``LoopSpec`` (or a spec file, or a mapping); ``folder_dags``
from every spec in a folder, for a DAG file (``dags/airloop_loops.py``). Each loop is isolated by its
name: its registered model, MLflow experiment, serving deployment (and so its request log), drift
Asset, cooldown, artefact prefixes and audit record carry it, so a drift in one loop schedules only
that loop's retraining. The turn is the reference loop's (``dags/airloop_loop.py``): training data ->
validate -> train (or one trial per candidate, then select) -> convert -> evaluate -> register ->
roll out, with the approval hold when the plan asks for one.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import DAG, Param, task

from airloop.assets import drift_asset
from airloop.loops.spec import LoopSpec, load, load_folder, parse
from airloop.operators.drift import (
    DriftDecideRetrainOperator,
    DriftDetectDataOperator,
    DriftDetectRequestsOperator,
)
from airloop.operators.feast import FeastBuildTrainingSetOperator
from airloop.operators.great_expectations import GreatExpectationsValidateDataOperator
from airloop.operators.labels import LabelsIngestOperator
from airloop.operators.mlflow import (
    MlflowEvaluateChallengerOperator,
    MlflowRegisterModelOperator,
    MlflowSelectBestRunOperator,
    MlflowTrainModelOperator,
)
from airloop.operators.openvino import OpenvinoConvertModelOperator
from airloop.operators.optuna import OptunaSuggestTrialsOperator
from airloop.operators.performance import PerformanceMonitorOperator
from airloop.operators.rollout import RolloutChallengerOperator, RolloutFinishOperator
from airloop.operators.tables import TablesBuildTrainingSetOperator
from airloop.steps.training.requests import WINDOW_PATTERN

if TYPE_CHECKING:
    from airflow.sdk.bases.operator import BaseOperator
    from airflow.sdk.definitions.xcom_arg import XComArg

# Training, evaluation, conversion and registration are safe to retry (see dags/airloop_loop.py).
RETRIES: dict[str, Any] = {"retries": 2, "retry_delay": timedelta(seconds=30)}
# What the gate expects of the table training_data wrote (see dags/airloop_loop.py).
EXPECTED_SHA256 = "{{ ti.xcom_pull(task_ids='training_data', key='sha256') }}"


def folder_dags(folder: str | Path) -> dict[str, DAG]:
    """``{dag_id: DAG}`` for every spec in ``folder``; a missing folder has none."""
    if not Path(folder).is_dir():
        return {}
    dags: dict[str, DAG] = {}
    for spec in load_folder(folder):
        dags.update({dag.dag_id: dag for dag in loop_dags(spec)})
    return dags


def loop_dags(spec: LoopSpec | Mapping[str, Any] | str | Path) -> tuple[DAG, ...]:
    """The retraining DAG and the drift monitor of one loop, and its labels DAG when the spec
    declares where ground truth lands."""
    if isinstance(spec, (str, Path)):
        spec = load(spec)
    elif not isinstance(spec, LoopSpec):
        spec = parse(spec)
    return (_loop(spec), _monitor(spec), *([_labels(spec)] if spec.labels else []))


def _loop(spec: LoopSpec) -> DAG:
    plan, data = spec.rollout, spec.data
    params: dict[str, Param] = {
        "data_window": Param(
            data["window"],
            type="string",
            pattern=WINDOW_PATTERN,
            description="which drops of a data folder: all, latest, the latest n (latest:3), + a share of the"
            " earlier ones (latest+history:0.2)",
        ),
        "analysis_seconds": Param(
            plan["analysis_seconds"], type="number", description="canary window per step"
        ),
        "approval": Param(plan["approval"], type="boolean", description="hold for a person at the last step"),
        "allow_rejected": Param(
            False, type="boolean", description="roll out the version though an earlier rollout rejected it"
        ),
    }
    if "uri" in data:
        params["data_uri"] = Param(data["uri"], type="string", description="training data: a file or folder")
    with _dag(
        spec, spec.loop_dag_id, drift_asset(spec.name), spec.description or "one retraining turn", params
    ) as dag:
        source: dict[str, Any] = {"conn_id": data.get("conn_id")}
        if "feast" in data:
            training_set = FeastBuildTrainingSetOperator(task_id="training_set", **data["feast"])
            source["data_uri"] = training_set.output["uri"]
        elif "sql" in data:
            source["sql"] = data["sql"]
        else:
            source["data_uri"] = "{{ params.data_uri }}"
        training_data = TablesBuildTrainingSetOperator(
            task_id="training_data",
            window="{{ params.data_window }}",
            label_column=spec.label,
            features=spec.features,
            exclude=spec.excluded,
            **source,
        )
        if "feast" in data:
            training_set >> training_data
        validate = GreatExpectationsValidateDataOperator(
            task_id="validate",
            data_uri=training_data.output["uri"],
            suite_path=spec.suite,
            label_column=spec.label,
            expected_fingerprint=EXPECTED_SHA256,
        )
        fit: dict[str, Any] = {
            "data_uri": training_data.output["uri"],
            "estimator": spec.estimator,
            "label_column": spec.label,
            "categorical_features": spec.categorical,
            "experiment": spec.name,
            "validation": validate.output,
            "training_set": training_data.output,
            **RETRIES,
        }
        if spec.search:
            train: BaseOperator = _search(spec, fit)
        elif spec.candidates:
            trials = MlflowTrainModelOperator.partial(task_id="trial", **fit).expand(
                estimator_params=[{**spec.params, **candidate} for candidate in spec.candidates]
            )
            train = MlflowSelectBestRunOperator(
                task_id="train",
                run_ids=trials.output["run_id"],
                metric=spec.evaluation["metric"],
                mode="max",
                **RETRIES,
            )
        else:
            train = MlflowTrainModelOperator(task_id="train", estimator_params=spec.params, **fit)
        convert = OpenvinoConvertModelOperator(
            task_id="convert",
            run_id=train.output["run_id"],
            holdout_uri=train.output["holdout_uri"],
            label_column=spec.label,
            accuracy_budget=spec.conversion["accuracy_budget"],
            objective=spec.conversion["objective"],
            **RETRIES,
        )
        evaluate = MlflowEvaluateChallengerOperator(
            task_id="evaluate",
            model_name=spec.name,
            run_id=train.output["run_id"],
            ir_uri=convert.output["ir_uri"],
            label_column=spec.label,
            **{key: spec.evaluation[key] for key in ("metric", "margin", "alpha")},
            **RETRIES,
        )
        register = MlflowRegisterModelOperator(
            task_id="register", model_name=spec.name, run_id=train.output["run_id"], **RETRIES
        )
        serving = {"serving_conn_id": plan["serving_conn_id"]} if "serving_conn_id" in plan else {}
        rollout = RolloutChallengerOperator(
            task_id="rollout",
            model_name=spec.name,
            version=register.output["version"],
            deployment=spec.name,
            steps=plan["steps"],
            mode=plan["mode"],
            on_inconclusive=plan["on_inconclusive"],
            max_extensions=plan["max_extensions"],
            labels_from=plan["labels_from"],
            analysis_seconds="{{ params.analysis_seconds }}",
            approval="{{ params.approval }}",
            allow_rejected="{{ params.allow_rejected }}",
            retries=2,
            retry_delay=timedelta(seconds=30),
            **serving,
        )
        validate >> train
        training_data >> validate
        train >> convert >> evaluate >> register >> rollout
        approval_hold(
            rollout, model_name=spec.name, version=register.output["version"], deployment=spec.name, **serving
        )
    return dag


def _dag(
    spec: LoopSpec, dag_id: str, schedule: Any, what: str, params: dict[str, Param] | None = None
) -> DAG:
    """One of a loop's DAGs: tagged with the loop, and naming the spec it came from."""
    return DAG(
        dag_id=dag_id,
        schedule=schedule,
        catchup=False,
        max_active_runs=1,
        tags=["airloop", f"loop:{spec.name}"],
        params=params or {},
        description=f"Loop {spec.name}: {what}",
        doc_md=f"Built from the loop spec `{spec.source}` by `airloop.loops.dags`.",
    )


def _search(spec: LoopSpec, fit: dict[str, Any]) -> BaseOperator:
    """Rounds of suggest -> mapped trials, then the best of every trial: the ``train`` task."""
    search = spec.search or {}
    history: list[Any] = []
    for round_ in range(search["rounds"]):
        # After a round that trained nothing (the search stopped), the next ones still run, and stop.
        rule = "all_success" if round_ == 0 else "none_failed"
        suggest = OptunaSuggestTrialsOperator(
            task_id=f"suggest_{round_}",
            estimator=spec.estimator,
            space=search["space"],
            estimator_params=spec.params,
            trials=search["trials"],
            patience=search["patience"],
            metric=spec.evaluation["metric"],
            seed=search["seed"],
            history=list(history),
            trigger_rule=rule,
        )
        trials = MlflowTrainModelOperator.partial(task_id=f"trial_{round_}", trigger_rule=rule, **fit).expand(
            estimator_params=suggest.output
        )
        history += [suggest.output, trials.output]

    @task(task_id="trials", trigger_rule="none_failed")
    def run_ids(rounds: list[Any]) -> list[str]:
        return [run["run_id"] for trained in rounds for run in trained or []]

    return MlflowSelectBestRunOperator(
        task_id="train",
        run_ids=run_ids(history[1::2]),
        metric=spec.evaluation["metric"],
        mode="max",
        **RETRIES,
    )


def approval_hold(rollout: BaseOperator, **finish: Any) -> None:
    """After ``rollout``: when it awaits approval, a person's Approve or Reject, then the finish task
    that promotes or rolls back; otherwise nothing (approval off, or a first champion)."""

    @task.short_circuit(task_id="needs_approval")
    def needs_approval(result: dict[str, Any]) -> bool:
        return bool(result["decision"] == "awaiting_approval")

    gate: XComArg = needs_approval(rollout.output)
    approve = ApprovalOperator(
        task_id="approve",
        subject="Promote version {{ ti.xcom_pull(task_ids='rollout')['challenger'] }} to champion?",
        body=(
            "The rollout is held: every window passed, or one was inconclusive (on_inconclusive='hold');"
            " the rollout report linked from the rollout task says which."
        ),
        fail_on_reject=True,  # a rejection must not skip the finish task, which rolls back
        defaults="Reject",
        response_timeout=timedelta(days=1),
    )
    # Runs after the approval whatever its outcome: promotes on Approve, otherwise rolls back.
    done = RolloutFinishOperator(
        task_id="finish",
        approval_task_id="approve",
        trigger_rule="all_done_min_one_success",
        retries=2,  # a retry completes an interrupted promotion or rollback
        retry_delay=timedelta(seconds=30),
        **finish,
    )
    gate >> approve >> done
    gate >> done


def _labels(spec: LoopSpec) -> DAG:
    labels = spec.labels or {}
    with _dag(
        spec, spec.labels_dag_id, labels["schedule"], "ground truth joined to the served requests"
    ) as dag:
        LabelsIngestOperator(
            task_id="ingest",
            deployment=spec.name,
            labels_uri=labels.get("uri"),
            labels_sql=labels.get("sql"),
            labels_conn_id=labels.get("conn_id"),
            id_column=labels["id_column"],
            label_column=labels["label_column"],
            time_column=labels.get("time_column"),
            max_label_delay_hours=labels["max_label_delay_hours"],
        )
    return dag


def _monitor(spec: LoopSpec) -> DAG:
    drift = spec.drift
    params = {
        "window_minutes": Param(
            drift["window_minutes"], type="number", description="logged requests to test"
        ),
        "cooldown_minutes": Param(
            drift["cooldown_minutes"], type="number", description="minimum time between two retrains"
        ),
    }
    with _dag(spec, spec.monitor_dag_id, drift["schedule"], "drift monitor", params) as dag:
        # alibi-detect lives in the runtimes: the serving one, or torch for its MMD (on PyTorch).
        runtime = (
            ("torch" if drift["method"] == "mmd" else "serving") if drift["backend"] == "alibi" else "worker"
        )
        common: dict[str, Any] = {
            "model_name": spec.name,
            "backend": drift["backend"],
            "method": drift["method"],
            "min_rows": drift["min_rows"],
            "runtime": runtime,
        }
        window = drift.get("window")
        if window:
            detect: BaseOperator = DriftDetectDataOperator(
                task_id="detect",
                window_uri=window.get("uri"),
                window_sql=window.get("sql"),
                window_conn_id=window.get("conn_id"),
                **common,
            )
        else:
            detect = DriftDetectRequestsOperator(
                task_id="detect", deployment=spec.name, window_minutes="{{ params.window_minutes }}", **common
            )
        performance = drift.get("performance") or {}
        judged = None
        if performance.get("enabled", True):
            judged = PerformanceMonitorOperator(
                task_id="performance",
                model_name=spec.name,
                deployment=spec.name,
                window_minutes="{{ params.window_minutes }}",
                min_rows=drift["min_rows"],
                **{key: value for key, value in performance.items() if key != "enabled"},
            ).output
        DriftDecideRetrainOperator(
            task_id="decide",
            detection=detect.output,
            performance=judged,
            actions=drift.get("actions"),
            cooldown_minutes="{{ params.cooldown_minutes }}",
            min_window_rows=drift["min_rows"],
            mode=drift["mode"],
            max_retrains=drift.get("max_retrains"),
            retrain_period_hours=drift["retrain_period_hours"],
            retrain_dag_id=spec.loop_dag_id,
            outlets=[drift_asset(spec.name)],
        )
    return dag
