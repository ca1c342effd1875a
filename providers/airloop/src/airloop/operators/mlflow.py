"""Training, the offline evaluation gate and registration, with MLflow as the system of record."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from airloop.hooks.mlflow import MlflowHook
from airloop.links.mlflow import MlflowModelVersionLink, MlflowRunLink
from airloop.operators.base import StepOperator, airflow_tags, loop_trigger
from airloop.steps.training.requests import (
    EvaluateRequest,
    EvaluationResult,
    RegisterRequest,
    RegisterResult,
    SelectBestRequest,
    SelectResult,
    TrainRequest,
)
from airloop.tracking.requests import TrainedRun

# Data files of a training set named in the audit record (the newest).
AUDIT_FILES = 20


def code_version(context: Context) -> dict[str, str]:
    """Tags naming the DAG code that ran: its file's SHA-256 and, in a git work tree, the commit
    (``+dirty`` when the file is changed or not committed). The step tags the provider's version."""
    path = getattr(context.get("dag"), "fileloc", None)
    if not path or not os.path.isfile(path):
        return {}
    with open(path, "rb") as handle:
        tags = {"airloop.dag_code.sha256": hashlib.sha256(handle.read()).hexdigest()}
    folder = os.path.dirname(path)
    try:
        head = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True)
        if head.returncode == 0:
            status = subprocess.run(
                ["git", "-C", folder, "status", "--porcelain", "--", path], capture_output=True, text=True
            )
            tags["airloop.dag_code.git_sha"] = head.stdout.strip() + (
                "+dirty" if status.stdout.strip() else ""
            )
    except OSError:  # no git on this worker
        pass
    return tags


class _MlflowOperator(StepOperator):
    def __init__(self, *, mlflow_conn_id: str = MlflowHook.default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mlflow_conn_id = mlflow_conn_id

    @cached_property
    def hook(self) -> MlflowHook:
        return MlflowHook(mlflow_conn_id=self.mlflow_conn_id)

    def persist_run_link(self, context: Context, run_id: str) -> None:
        run = self.hook.client.get_run(run_id)
        MlflowRunLink.persist(
            context, ui_url=self.hook.ui_url, experiment_id=run.info.experiment_id, run_id=run_id
        )

    def audit(self, run_id: str, records: dict[str, Any]) -> None:
        """Add this task's stages (``{stage: record}``) to the audit record kept in the training run,
        in one write."""
        from airloop.tracking.registry import append_audit

        append_audit({**self.hook.step_config(), "run_id": run_id, "records": records})


class MlflowTrainModelOperator(_MlflowOperator):
    """
    Train an estimator on a validated data set and log it, its metrics, the data fingerprint, the drift
    reference sample and the loop's audit record to one MLflow run. Retrying the task reuses that run.

    :param data_uri: the training set (parquet or CSV).
    :param estimator: import path of a scikit-learn classifier (``package.module.Class``), of a
        training function (``package.module:function``) called as ``function(features, target, seed=...,
        **estimator_params)`` that returns a fitted scikit-learn-compatible classifier, or of a PyTorch
        module prefixed ``torch:`` (``"torch:airloop.torch_models.MLPClassifier"``), trained on CPU
        and logged as a ``torch.export`` program; torch needs ``runtime="torch"``.
    :param estimator_params: the estimator's (or the training function's) parameters; for a PyTorch
        module, its constructor's and the training loop's (``epochs``, ``lr``, ``batch_size``,
        ``weight_decay``, ``standardize``; see ``airloop.steps.training.train_torch``).
    :param label_column: the target column.
    :param categorical_features: features encoded as categories besides the non-numeric ones; a
        scikit-learn classifier of categorical features or missing values trains behind their encoding
        (``airloop.encoding``).
    :param experiment: MLflow experiment name.
    :param test_size: the share of rows held out for the metrics, the offline gate and the parity check.
    :param seed: seeds the split, the estimator's ``random_state`` and the drift reference sample.
    :param validation: the data gate's result (usually the validation task's XCom), kept in the audit record
        and on the run (tags ``airloop.validation.*``, artefact ``validation/summary.json``).
    :param parent_run_id: an MLflow run to nest this run under (tag ``mlflow.parentRunId``).
    :param training_set: how ``data_uri`` was built (usually ``TablesBuildTrainingSetOperator``'s XCom):
        its source and window go on the run; training refuses data that is not what was built.

    The audit record's ``data`` stage names the exact data trained on: URI, SHA-256 and rows, the
    source, window and files it was built from, and the Asset events that started the DAG run (a
    drift-triggered retrain names the drift event).

    A hyperparameter search maps it over candidates, one task and one run each:
    ``MlflowTrainModelOperator.partial(task_id="train", data_uri=...).expand(estimator_params=[...])``,
    then ``MlflowSelectBestRunOperator`` picks the winner. Defaults: ``TrainRequest``.
    """

    template_fields: Sequence[str] = (
        "data_uri",
        "estimator",
        "estimator_params",
        "label_column",
        "experiment",
        "validation",
        "parent_run_id",
        "training_set",
    )
    operator_extra_links = (MlflowRunLink(),)

    def __init__(
        self,
        *,
        data_uri: str,
        estimator: str = TrainRequest.estimator,
        estimator_params: dict[str, Any] | None = None,
        label_column: str = TrainRequest.label_column,
        categorical_features: list[str] | None = None,
        experiment: str = TrainRequest.experiment,
        test_size: float = TrainRequest.test_size,
        seed: int = TrainRequest.seed,
        validation: dict[str, Any] | None = None,
        parent_run_id: str | None = None,
        training_set: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.data_uri = data_uri
        self.estimator = estimator
        self.estimator_params = estimator_params
        self.label_column = label_column
        self.categorical_features = categorical_features
        self.experiment = experiment
        self.test_size = test_size
        self.seed = seed
        self.validation = validation
        self.parent_run_id = parent_run_id
        self.training_set = training_set

    def execute(self, context: Context) -> TrainedRun:
        request = TrainRequest(
            **self.hook.step_config(),
            data_uri=self.data_uri,
            estimator=self.estimator,
            estimator_params=self.estimator_params or {},
            label_column=self.label_column,
            categorical_features=list(self.categorical_features or []),
            experiment=self.experiment,
            test_size=self.test_size,
            seed=self.seed,
            validation=self.validation,
            parent_run_id=self.parent_run_id,
            training_set=self.training_set,
            tags={**airflow_tags(context), **code_version(context)},
        )
        result: TrainedRun = self.run_step("airloop.steps.training.train:train", request, context)
        self.persist_run_link(context, result["run_id"])
        trigger = loop_trigger(context)
        built = self.training_set or {}
        data: dict[str, Any] = {
            "uri": self.data_uri,
            **{key: result["fingerprint"][key] for key in ("sha256", "rows")},
            **{key: built[key] for key in ("source", "window") if key in built},
            "asset_events": trigger["asset_events"],
        }
        if "files" in built:  # the newest drops only: an audit stage stays small (the table has them all)
            data.update(file_count=len(built["files"]), files=built["files"][-AUDIT_FILES:])
        self.audit(
            result["run_id"],
            {
                "trigger": trigger,
                "data": data,
                "validation": self.validation or {},
                "training": {key: result[key] for key in ("run_id", "model_uri", "metrics", "fingerprint")},
            },
        )
        self.log.info("run %s: %s", result["run_id"], result["metrics"])
        return result


class MlflowSelectBestRunOperator(_MlflowOperator):
    """
    Pick the best run of a hyperparameter search by ``metric`` and nest the candidates under one
    parent run. Returns what ``MlflowTrainModelOperator`` returns for the winner (so evaluation,
    conversion and registration follow unchanged), plus ``parent_run_id``, ``metric``, ``mode`` and
    ``candidates``.

    :param run_ids: the candidates' run ids, usually ``train.output["run_id"]`` of a mapped train task.
    :param metric: a metric every candidate logged.
    :param mode: ``"max"`` or ``"min"``.
    """

    template_fields: Sequence[str] = ("run_ids", "metric", "mode")
    operator_extra_links = (MlflowRunLink(),)

    def __init__(
        self,
        *,
        run_ids: Sequence[str],
        metric: str = SelectBestRequest.metric,
        mode: str = SelectBestRequest.mode,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.run_ids = run_ids
        self.metric = metric
        self.mode = mode

    def execute(self, context: Context) -> SelectResult:
        request = SelectBestRequest(
            **self.hook.step_config(),
            # A mapped upstream's XCom arrives as a lazy sequence: make it a JSON-able list.
            run_ids=list(self.run_ids),
            metric=self.metric,
            mode=self.mode,
            tags=airflow_tags(context),
        )
        result: SelectResult = self.run_step("airloop.steps.training.select:select_best", request, context)
        self.persist_run_link(context, result["run_id"])
        self.log.info(
            "best of %d runs by %s (%s): %s",
            len(result["candidates"]),
            self.metric,
            self.mode,
            result["run_id"],
        )
        return result


class MlflowEvaluateChallengerOperator(_MlflowOperator):
    """
    The offline gate: compare the candidate with the registered model's ``champion`` on the same
    held-out data. Fails unless the candidate is better by ``margin`` and the difference is significant;
    the first model (no champion yet) passes by that explicit rule. A holdout score too good to be
    true (error rate 0, or under ``min_error_share`` of the champion's) fails, unless
    ``perfect_scores_expected``.

    :param model_name: the registered model whose champion the candidate must beat.
    :param run_id: the candidate's training run.
    :param data_uri: the rows both models score (default: the candidate run's holdout split).
    :param label_column: the target column.
    :param metric: ``"accuracy"``, ``"balanced_accuracy"`` or ``"f1_macro"`` (``airloop.metrics``).
    :param margin: how much better (a share, 0.01 = one point) the candidate must be.
    :param alpha: the significance level of the paired test (McNemar's for accuracy, the paired
        bootstrap for a macro metric); 1 turns the test off.
    :param ir_uri: the artefact that will serve the candidate (its conversion's ``ir_uri``): both models
        are then scored as they serve, the champion by its own run's IR.
    :param perfect_scores_expected: the task is one where a perfect holdout score is plausible.
    :param min_error_share: an error rate under this share of the champion's is implausible.
    """

    template_fields: Sequence[str] = (
        "model_name",
        "run_id",
        "data_uri",
        "metric",
        "margin",
        "alpha",
        "ir_uri",
        "perfect_scores_expected",
        "min_error_share",
    )
    operator_extra_links = (MlflowRunLink(),)

    def __init__(
        self,
        *,
        model_name: str,
        run_id: str,
        data_uri: str | None = None,
        label_column: str = EvaluateRequest.label_column,
        metric: str = EvaluateRequest.metric,
        margin: float = EvaluateRequest.margin,
        alpha: float = EvaluateRequest.alpha,
        ir_uri: str | None = None,
        perfect_scores_expected: bool = EvaluateRequest.perfect_scores_expected,
        min_error_share: float = EvaluateRequest.min_error_share,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.run_id = run_id
        self.data_uri = data_uri
        self.label_column = label_column
        self.metric = metric
        self.margin = margin
        self.alpha = alpha
        self.ir_uri = ir_uri
        self.perfect_scores_expected = perfect_scores_expected
        self.min_error_share = min_error_share

    def execute(self, context: Context) -> EvaluationResult:
        self.persist_run_link(context, self.run_id)
        request = EvaluateRequest(
            **self.hook.step_config(),
            model_name=self.model_name,
            run_id=self.run_id,
            data_uri=self.data_uri,
            label_column=self.label_column,
            metric=self.metric,
            margin=self.margin,
            alpha=self.alpha,
            ir_uri=self.ir_uri,
            perfect_scores_expected=self.perfect_scores_expected,
            min_error_share=self.min_error_share,
        )
        verdict: EvaluationResult = self.run_step(
            "airloop.steps.training.evaluate:evaluate", request, context
        )
        self.audit(self.run_id, {"evaluation": verdict})
        self.log.info("evaluation verdict %s (%s): %s", verdict["verdict"], verdict["rule"], verdict)
        if verdict["verdict"] != "pass":
            champion = verdict["champion"]
            against = f"champion v{champion['version']}" if champion else "no champion"
            raise AirflowFailException(
                f"run {self.run_id} fails the offline gate against {against} on {self.metric} "
                f"({verdict['rule']}): {verdict['reason']}"
            )
        return verdict


class MlflowRegisterModelOperator(_MlflowOperator):
    """
    Register the run's model as a new version; it becomes ``champion`` when the model has none yet,
    else ``challenger``. Re-running the task returns the same version.

    :param model_name: the registered model.
    :param run_id: the training run.
    :param model_uri: the model to register (default: the run's logged model).
    """

    template_fields: Sequence[str] = ("model_name", "run_id", "model_uri")
    operator_extra_links = (MlflowModelVersionLink(),)

    def __init__(self, *, model_name: str, run_id: str, model_uri: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.run_id = run_id
        self.model_uri = model_uri

    def execute(self, context: Context) -> RegisterResult:
        request = RegisterRequest(
            **self.hook.step_config(),
            model_name=self.model_name,
            run_id=self.run_id,
            model_uri=self.model_uri,
            tags=airflow_tags(context),
        )
        result: RegisterResult = self.run_step("airloop.steps.training.register:register", request, context)
        MlflowModelVersionLink.persist(
            context, ui_url=self.hook.ui_url, model_name=self.model_name, version=str(result["version"])
        )
        self.log.info("%s version %s has alias %s", self.model_name, result["version"], result["alias"])
        return result
