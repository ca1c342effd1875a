"""Train a classifier and record it as one MLflow run.

The request is a ``TrainRequest`` (``airloop.steps.training.requests``, every default there). The model
comes from a scikit-learn classifier's import path (``package.module.Class``, built with
``estimator_params``), from a training function (``package.module:function``) that returns a
fitted scikit-learn-compatible classifier, or from a PyTorch module's import path
(``torch:package.module.Class``, ``airloop.steps.training.train_torch``); see ``trainer``. A
scikit-learn classifier of a table with categorical features (``categorical_features``, and every
non-numeric column) or missing values is trained behind their encoding, as one ``Pipeline``
(``airloop.encoding``).

The run holds everything later steps need: params, holdout metrics, the model (skops format, or a
``torch.export`` program), the holdout split (``data/holdout.parquet``, for the offline gate and the
conversion parity check), a sample of training features (``drift/reference.parquet``, for the drift
monitor) and tags that tie it to its DAG run and its data. Every MLflow call goes through an
``MlflowClient`` bound to the request's tracking URI: steps share Airflow workers, so the global
tracking URI stays untouched.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import airloop
from airloop.encoding import categorical_columns, needs_encoding, with_encoding
from airloop.metrics import METRICS, score
from airloop.steps.training.requests import TrainRequest
from airloop.tables import fingerprint
from airloop.tracking.artifacts import (
    FINGERPRINT_PATH,
    HOLDOUT_PATH,
    PARENT_RUN_TAG,
    REFERENCE_PATH,
    ensure_experiment,
    read_data,
    run_result,
    task_run,
    trained_run,
)
from airloop.tracking.models import log_sklearn_model
from airloop.tracking.requests import TrainedRun
from airloop.tracking.session import mlflow_step
from airloop.validation import VALIDATION_ARTIFACT, gated_run_tags

if TYPE_CHECKING:
    import mlflow
    import pandas as pd

TORCH_PREFIX = "torch:"


@mlflow_step
def train(request: TrainRequest | Mapping[str, Any]) -> TrainedRun:
    """Fit ``estimator`` on a train split of ``data_uri`` and log the run; see docs/steps.md."""
    import mlflow

    request = TrainRequest.parse(request)
    tags = {str(k): str(v) for k, v in request.tags.items()}
    client = mlflow.MlflowClient(tracking_uri=request.tracking_uri)
    experiment_id = ensure_experiment(client, request.experiment, request.artifact_root)

    previous = task_run(client, experiment_id, tags, finished=False)
    if previous is not None and previous.info.status == "FINISHED":
        return run_result(client, previous, reused=True)

    label = request.label_column
    frame = read_data(request.tracking_uri, request.data_uri, request.storage_options)
    if label not in frame.columns:
        raise ValueError(f"label column {label!r} not in data columns {list(frame.columns)}")
    data_print = fingerprint(frame)
    built = request.training_set or {}
    if built.get("sha256") and built["sha256"] != data_print["sha256"]:
        raise ValueError(
            f"{request.data_uri} is not the training set that was built: sha256 {data_print['sha256']}, "
            f"built {built['sha256']}"
        )
    validation = request.validation or {}
    validation_tags = gated_run_tags(validation, request.data_uri, data_print)
    fit = trainer(request.estimator, request.estimator_params, request.seed)
    features = frame.drop(columns=[label])
    categorical = categorical_columns(features, request.categorical_features)
    if needs_encoding(features, categorical):
        if request.estimator.startswith(TORCH_PREFIX):
            raise ValueError(
                f"estimator {request.estimator!r}: categorical features {categorical} or missing values need"
                " a scikit-learn estimator (whose pipeline encodes them) or a training function"
            )
        if ":" not in request.estimator:  # a training function's model brings its own preprocessing
            fit = with_encoding(fit, categorical)
    run_tags = {
        **tags,
        "airloop.code_version": airloop.__version__,
        "airloop.data_uri": request.data_uri,
        "airloop.data.sha256": data_print["sha256"],
        "airloop.data.rows": str(data_print["rows"]),
        **{f"airloop.data.{key}": str(built[key])[:5000] for key in ("source", "window") if key in built},
        **validation_tags,
    }
    if request.parent_run_id:
        run_tags[PARENT_RUN_TAG] = request.parent_run_id
    if previous is not None and _resumable(previous, request):
        run = _resume(client, previous, run_tags)
    else:
        run = client.create_run(experiment_id, tags=run_tags)
    run_id = run.info.run_id
    try:
        if validation:
            client.log_dict(run_id, validation, VALIDATION_ARTIFACT)
        metrics = _fit_and_log(client, run, fit, frame, data_print, request)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return trained_run(run_id, metrics, data_print, reused=False)


def _request_params(request: TrainRequest) -> dict[str, str]:
    """The run params the request fixes before training, as MLflow stores them."""
    params = {
        "estimator": request.estimator,
        "test_size": request.test_size,
        "seed": request.seed,
        **request.estimator_params,
    }
    return {key: str(value)[:6000] for key, value in params.items()}


def _resumable(run: mlflow.entities.Run, request: TrainRequest) -> bool:
    """Whether this try can train into the run an earlier try of the task instance left unfinished
    (a killed worker, a failure): MLflow params cannot change, so only if those logged agree."""
    logged = run.data.params
    return all(logged.get(key, value) == value for key, value in _request_params(request).items())


def _resume(
    client: mlflow.MlflowClient, run: mlflow.entities.Run, tags: dict[str, str]
) -> mlflow.entities.Run:
    """Reopen an unfinished run of this task instance; logged models it left unfinished are marked
    FAILED, so ``runs:/<id>/model`` names only the one this try logs."""
    from mlflow.entities import LoggedModelStatus, RunTag

    run_id = run.info.run_id
    client.update_run(run_id, status="RUNNING")
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    started = f"source_run_id = '{run_id}'"
    for model in client.search_logged_models([run.info.experiment_id], filter_string=started):
        if model.status != LoggedModelStatus.READY:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
    return client.get_run(run_id)


def _fit_and_log(
    client: mlflow.MlflowClient,
    run: mlflow.entities.Run,
    fit: Callable[[pd.DataFrame, pd.Series], Any],
    frame: pd.DataFrame,
    data_print: dict[str, Any],
    request: TrainRequest,
) -> dict[str, float]:
    from mlflow.entities import Metric, Param
    from sklearn.model_selection import train_test_split

    label = request.label_column
    features = frame.drop(columns=[label])
    target = frame[label]
    x_train, x_test, y_train, y_test = train_test_split(
        features,
        target,
        test_size=float(request.test_size),
        random_state=request.seed,
        stratify=target,
    )
    estimator = fit(x_train, y_train)
    metrics = holdout_metrics(estimator, x_test, y_test)
    metrics.update({"train_rows": float(len(x_train)), "holdout_rows": float(len(x_test))})
    # A model that reports its loss per epoch (the torch route's): one ``train_loss`` step per epoch.
    losses = getattr(estimator, "epoch_losses_", [])
    curve = [Metric("train_loss", loss, 0, epoch) for epoch, loss in enumerate(losses, 1)]

    run_id = run.info.run_id
    params = {
        "model_class": f"{type(estimator).__module__}.{type(estimator).__qualname__}",
        **{key: value for key, value in estimator.get_params(deep=False).items() if not callable(value)},
        # The request's own, where a training function's model reports other values.
        **_request_params(request),
    }
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
        # A resumed run keeps the params its first try logged (MLflow's cannot change).
        params=[Param(k, str(v)[:6000]) for k, v in params.items() if k not in run.data.params],
    )
    for start in range(0, len(curve), 1000):  # MLflow takes at most 1000 metrics a batch
        client.log_batch(run_id, metrics=curve[start : start + 1000])
    if curve:
        metrics["train_loss"] = curve[-1].value  # what the run reports as its latest value
    if request.estimator.startswith(TORCH_PREFIX):
        from airloop.tracking.models import log_torch_model

        log_torch_model(client, run, estimator, x_train)
    else:
        log_sklearn_model(client, run, estimator, x_train)

    reference_rows = min(request.reference_rows, len(x_train))
    reference = x_train.sample(n=reference_rows, random_state=request.seed)
    holdout = x_test.assign(**{label: y_test})
    with tempfile.TemporaryDirectory() as tmp:
        for table, path in ((holdout, HOLDOUT_PATH), (reference, REFERENCE_PATH)):
            local = os.path.join(tmp, os.path.basename(path))
            table.reset_index(drop=True).to_parquet(local, index=False)
            client.log_artifact(run_id, local, os.path.dirname(path))
    client.log_dict(run_id, data_print, FINGERPRINT_PATH)
    return metrics


def trainer(path: str, params: dict[str, Any], seed: int) -> Callable[[pd.DataFrame, pd.Series], Any]:
    """A function ``(features, target) -> fitted classifier`` from the request's ``estimator``.

    - ``package.module.Class``: a scikit-learn classifier built with ``params``; ``random_state``
      defaults to ``seed`` so that a re-run trains the same model.
    - ``package.module:function``: the user's training function, called as
      ``function(features, target, seed=seed, **params)``; it returns a fitted classifier that
      scikit-learn recognises (``is_classifier``, ``predict_proba``, ``classes_``), e.g. a
      ``Pipeline`` with preprocessing, which is logged like any scikit-learn model.
    - ``torch:package.module.Class``: a PyTorch module trained on CPU; ``params`` hold its constructor's
      and the training loop's arguments (``airloop.steps.training.train_torch``). Needs torch: the ``torch``
      runtime.

    Each is checked before it trains where it can be: the import and the parameters.
    """
    if path.startswith(TORCH_PREFIX):
        from airloop.steps.training.train_torch import torch_trainer

        return torch_trainer(path.removeprefix(TORCH_PREFIX), params, seed)
    found, is_function = import_estimator(path)
    if is_function:
        if not callable(found):
            raise ValueError(f"estimator {path!r} is not a function")

        def fit_with_function(features: pd.DataFrame, target: pd.Series) -> Any:
            model = found(features, target, seed=seed, **params)
            _check_classifier(model, f"the model {path!r} returned")
            return model

        return fit_with_function
    try:
        estimator = found(**params)
    except TypeError as exc:
        raise ValueError(f"estimator {path!r} rejects params {sorted(params)}: {exc}") from exc
    _check_classifier(estimator, f"estimator {path!r}")
    if "random_state" in estimator.get_params() and "random_state" not in params:
        estimator.set_params(random_state=seed)
    return estimator.fit


def import_estimator(path: str) -> tuple[Any, bool]:
    """What an ``estimator`` path names (``package.module.Class`` or ``package.module:function``), and
    whether it is a function."""
    is_function = ":" in path
    module_name, _, name = path.rpartition(":" if is_function else ".")
    try:
        return getattr(importlib.import_module(module_name), name), is_function
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"estimator {path!r} cannot be imported: {exc}") from exc


def _check_classifier(model: Any, what: str) -> None:
    from sklearn.base import is_classifier

    if not is_classifier(model) or not hasattr(model, "predict_proba"):
        raise ValueError(f"{what} must be a scikit-learn classifier with predict_proba, got {type(model)!r}")


def holdout_metrics(estimator: Any, features: pd.DataFrame, target: pd.Series) -> dict[str, float]:
    from sklearn.metrics import log_loss, roc_auc_score

    proba = estimator.predict_proba(features)
    predicted = estimator.classes_[proba.argmax(axis=1)]
    binary = proba.shape[1] == 2
    return {
        **{name: float(score(name, target, predicted, estimator.classes_)[0]) for name in METRICS},
        "log_loss": float(log_loss(target, proba, labels=estimator.classes_)),
        "roc_auc": float(
            roc_auc_score(target, proba[:, 1])
            if binary
            else roc_auc_score(target, proba, multi_class="ovr", labels=estimator.classes_)
        ),
    }
