"""Train a classifier and record it as one MLflow run.

The model comes from a scikit-learn classifier's import path (``package.module.Class``, built with
the request's params), from a training function (``package.module:function``) that returns a
fitted scikit-learn-compatible classifier, or from a PyTorch module's import path
(``torch:package.module.Class``, ``airloop.steps.train_torch``); see ``trainer``.

The run holds everything later steps need: params, holdout metrics, the model (skops format, or a
``torch.export`` program), the holdout split (``data/holdout.parquet``, for the offline gate and the
conversion parity check), a sample of training features (``drift/reference.parquet``, for the drift
monitor) and tags that tie it to its DAG run and its data. Every MLflow call goes through an
``MlflowClient`` bound to the request's tracking URI: steps share Airflow workers, so the global
tracking URI stays untouched.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import airloop
from airloop import settings
from airloop.steps.data import fingerprint, read_table
from airloop.steps.tracking import mlflow_step
from airloop.steps.validate import VALIDATION_ARTIFACT, gated_run_tags

if TYPE_CHECKING:
    import mlflow
    import pandas as pd

MODEL_NAME = "model"
DEFAULT_ESTIMATOR = "sklearn.neural_network.MLPClassifier"
TORCH_PREFIX = "torch:"
HOLDOUT_PATH = "data/holdout.parquet"
REFERENCE_PATH = "drift/reference.parquet"
FINGERPRINT_PATH = "data/fingerprint.json"
# Tags that identify one Airflow task instance: a finished run carrying the same values is reused.
IDEMPOTENCY_TAGS = ("airflow.dag_id", "airflow.run_id", "airflow.task_id", "airflow.map_index")
# MLflow marks a nested (child) run with this tag; its UI groups children under the parent.
PARENT_RUN_TAG = "mlflow.parentRunId"
# Types outside skops' built-in safe set that Airloop agrees to load. The allow-list lives here, in
# the loader, not in the model's own MLmodel file, so a crafted artefact cannot widen it.
SKOPS_TRUSTED_TYPES = frozenset(
    {
        "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
        "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
        "sklearn.tree._tree.Tree",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "sklearn._loss.link.Interval",
        "sklearn._loss.link.LogitLink",
        "sklearn._loss.link.MultinomialLogit",
        "sklearn._loss.loss.HalfBinomialLoss",
        "sklearn._loss.loss.HalfMultinomialLoss",
    }
)


@mlflow_step
def train(request: dict[str, Any]) -> dict[str, Any]:
    """Fit ``estimator`` on a train split of ``data_uri`` and log the run; see docs/steps.md."""
    import mlflow

    tracking_uri = _required(request, "tracking_uri")
    data_uri = _required(request, "data_uri")
    label = request.get("label", "label")
    tags = {str(k): str(v) for k, v in (request.get("tags") or {}).items()}
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment_id = ensure_experiment(
        client, request.get("experiment", "airloop"), request.get("artifact_root")
    )

    previous = task_run(client, experiment_id, tags, finished=False)
    if previous is not None and previous.info.status == "FINISHED":
        return run_result(client, previous, reused=True)

    frame = read_data(tracking_uri, data_uri, request.get("storage_options"))
    if label not in frame.columns:
        raise ValueError(f"label column {label!r} not in data columns {list(frame.columns)}")
    data_print = fingerprint(frame)
    validation = request.get("validation") or {}
    validation_tags = gated_run_tags(validation, data_uri, data_print)
    fit = trainer(
        request.get("estimator", DEFAULT_ESTIMATOR),
        request.get("params") or {},
        int(request.get("seed", 0)),
    )
    run_tags = {
        **tags,
        "airloop.code_version": airloop.__version__,
        "airloop.data_uri": data_uri,
        "airloop.data.sha256": data_print["sha256"],
        "airloop.data.rows": str(data_print["rows"]),
        **validation_tags,
    }
    if request.get("parent_run_id"):
        run_tags[PARENT_RUN_TAG] = str(request["parent_run_id"])
    if previous is not None and _resumable(previous, request):
        run = _resume(client, previous, run_tags)
    else:
        run = client.create_run(experiment_id, tags=run_tags)
    run_id = run.info.run_id
    try:
        if validation:
            client.log_dict(run_id, validation, VALIDATION_ARTIFACT)
        metrics = _fit_and_log(client, run, fit, frame, label, data_print, request)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return _result(run_id, metrics, data_print, reused=False)


def _request_params(request: dict[str, Any]) -> dict[str, str]:
    """The run params the request fixes before training, as MLflow stores them."""
    params = {
        "estimator": request.get("estimator", DEFAULT_ESTIMATOR),
        "test_size": request.get("test_size", 0.25),
        "seed": int(request.get("seed", 0)),
        **(request.get("params") or {}),
    }
    return {key: str(value)[:6000] for key, value in params.items()}


def _resumable(run: mlflow.entities.Run, request: dict[str, Any]) -> bool:
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


def run_result(client: mlflow.MlflowClient, run: mlflow.entities.Run, reused: bool) -> dict[str, Any]:
    """The result ``train`` returns, for a run that ``train`` logged earlier."""
    run_id = run.info.run_id
    data_print = read_json_artifact(client, run_id, FINGERPRINT_PATH)
    return _result(run_id, dict(run.data.metrics), data_print, reused=reused)


def _fit_and_log(
    client: mlflow.MlflowClient,
    run: mlflow.entities.Run,
    fit: Callable[[pd.DataFrame, pd.Series], Any],
    frame: pd.DataFrame,
    label: str,
    data_print: dict[str, Any],
    request: dict[str, Any],
) -> dict[str, float]:
    from mlflow.entities import Metric, Param
    from sklearn.model_selection import train_test_split

    seed = int(request.get("seed", 0))
    features = frame.drop(columns=[label])
    target = frame[label]
    x_train, x_test, y_train, y_test = train_test_split(
        features,
        target,
        test_size=float(request.get("test_size", 0.25)),
        random_state=seed,
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
    if request.get("estimator", DEFAULT_ESTIMATOR).startswith(TORCH_PREFIX):
        from airloop.steps.train_torch import log_torch_model

        log_torch_model(client, run, estimator, x_train)
    else:
        log_sklearn_model(client, run, estimator, x_train)

    reference_rows = min(int(request.get("reference_rows", 2000)), len(x_train))
    reference = x_train.sample(n=reference_rows, random_state=seed)
    holdout = x_test.assign(**{label: y_test})
    with tempfile.TemporaryDirectory() as tmp:
        for table, path in ((holdout, HOLDOUT_PATH), (reference, REFERENCE_PATH)):
            local = os.path.join(tmp, os.path.basename(path))
            table.reset_index(drop=True).to_parquet(local, index=False)
            client.log_artifact(run_id, local, os.path.dirname(path))
    client.log_dict(run_id, data_print, FINGERPRINT_PATH)
    return metrics


def _result(
    run_id: str, metrics: dict[str, float], data_print: dict[str, Any], reused: bool
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "model_uri": f"runs:/{run_id}/{MODEL_NAME}",
        "metrics": metrics,
        "holdout_uri": f"runs:/{run_id}/{HOLDOUT_PATH}",
        "reference_uri": f"runs:/{run_id}/{REFERENCE_PATH}",
        "fingerprint": data_print,
        "reused": reused,
    }


def _required(request: dict[str, Any], key: str) -> Any:
    if not request.get(key):
        raise ValueError(f"request is missing {key!r}")
    return request[key]


def task_run(
    client: mlflow.MlflowClient, experiment_id: str, tags: dict[str, str], finished: bool = True
) -> mlflow.entities.Run | None:
    """The newest (finished, unless ``finished=False``) run of the Airflow task instance the tags name."""
    key = {name: tags[name] for name in IDEMPOTENCY_TAGS if name in tags}
    if not {"airflow.dag_id", "airflow.run_id", "airflow.task_id"} <= key.keys():
        return None
    clauses = [f"tags.`{name}` = {_quote(value)}" for name, value in key.items()]
    if finished:
        clauses.append("attributes.status = 'FINISHED'")
    runs = client.search_runs(
        [experiment_id], " AND ".join(clauses), order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0] if runs else None


def _quote(value: str) -> str:
    """A search-filter string literal (MLflow's filter grammar has no escapes)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"tag value {value!r} holds both quote characters and cannot be searched for")


def ensure_experiment(client: mlflow.MlflowClient, name: str, artifact_root: str | None) -> str:
    """The id of experiment ``name``, created with artefacts under ``artifact_root/name`` if new."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    root = (artifact_root or settings.mlflow_artifact_root()).rstrip("/")
    try:
        return client.create_experiment(name, artifact_location=f"{root}/{name}")
    except MlflowException:
        # Another task created it between our lookup and create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def trainer(path: str, params: dict[str, Any], seed: int) -> Callable[[pd.DataFrame, pd.Series], Any]:
    """A function ``(features, target) -> fitted classifier`` from the request's ``estimator``.

    - ``package.module.Class``: a scikit-learn classifier built with ``params``; ``random_state``
      defaults to ``seed`` so that a re-run trains the same model.
    - ``package.module:function``: the user's training function, called as
      ``function(features, target, seed=seed, **params)``; it returns a fitted classifier that
      scikit-learn recognises (``is_classifier``, ``predict_proba``, ``classes_``), e.g. a
      ``Pipeline`` with preprocessing, which is logged like any scikit-learn model.
    - ``torch:package.module.Class``: a PyTorch module trained on CPU; ``params`` hold its constructor's
      and the training loop's arguments (``airloop.steps.train_torch``). Needs torch: the ``torch``
      runtime.

    Each is checked before it trains where it can be: the import and the parameters.
    """
    if path.startswith(TORCH_PREFIX):
        from airloop.steps.train_torch import torch_trainer

        return torch_trainer(path.removeprefix(TORCH_PREFIX), params, seed)
    is_function = ":" in path
    module_name, _, name = path.rpartition(":" if is_function else ".")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"estimator {path!r} cannot be imported: {exc}") from exc
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


def _check_classifier(model: Any, what: str) -> None:
    from sklearn.base import is_classifier

    if not is_classifier(model) or not hasattr(model, "predict_proba"):
        raise ValueError(f"{what} must be a scikit-learn classifier with predict_proba, got {type(model)!r}")


def holdout_metrics(estimator: Any, features: pd.DataFrame, target: pd.Series) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

    proba = estimator.predict_proba(features)
    predicted = estimator.classes_[proba.argmax(axis=1)]
    binary = proba.shape[1] == 2
    return {
        "accuracy": float(accuracy_score(target, predicted)),
        "log_loss": float(log_loss(target, proba, labels=estimator.classes_)),
        "roc_auc": float(
            roc_auc_score(target, proba[:, 1])
            if binary
            else roc_auc_score(target, proba, multi_class="ovr", labels=estimator.classes_)
        ),
    }


def log_logged_model(
    client: mlflow.MlflowClient, run: mlflow.entities.Run, save: Callable[[str, mlflow.models.Model], None]
) -> str:
    """Log the MLflow model that ``save(path, mlflow_model)`` writes (a flavour's ``save_model``) as
    the logged model ``model`` of ``run``; returns its model id.

    The steps of a flavour's ``log_model`` done through ``client``: ``log_model`` itself resolves the
    process-wide tracking URI, which a shared worker must not change.
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    run_id = run.info.run_id
    logged = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, MODEL_NAME)
        save(path, Model(run_id=run_id, model_id=logged.model_id, model_uuid=logged.model_id))
        client.log_model_artifacts(logged.model_id, path)
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged.model_id


def log_sklearn_model(
    client: mlflow.MlflowClient, run: mlflow.entities.Run, estimator: Any, example: pd.DataFrame
) -> str:
    """Log ``estimator`` as the MLflow logged model ``model`` of ``run`` (sklearn flavour, skops);
    returns its model id."""
    import mlflow
    import numpy
    import sklearn
    import skops
    import skops.io
    from mlflow.models import infer_signature

    untrusted = skops.io.get_untrusted_types(data=skops.io.dumps(estimator))
    unknown = sorted(set(untrusted) - SKOPS_TRUSTED_TYPES)
    if unknown:
        raise ValueError(f"estimator holds types outside Airloop's skops allow-list: {unknown}")
    signature = infer_signature(example, estimator.predict_proba(example.head(5)))

    def save(path: str, mlflow_model: mlflow.models.Model) -> None:
        mlflow.sklearn.save_model(
            estimator,
            path,
            mlflow_model=mlflow_model,
            serialization_format="skops",
            skops_trusted_types=untrusted,
            signature=signature,
            # Explicit requirements: inferring them re-imports the model in a subprocess (seconds).
            pip_requirements=[
                f"scikit-learn=={sklearn.__version__}",
                f"skops=={skops.__version__}",
                f"numpy=={numpy.__version__}",
            ],
        )

    return log_logged_model(client, run, save)


def download(tracking_uri: str, uri: str, dst_dir: str) -> str:
    """Download an MLflow artefact URI (``runs:/``, ``models:/``, ``file://``...) into ``dst_dir``."""
    import mlflow

    return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst_dir, tracking_uri=tracking_uri)


def read_data(tracking_uri: str, uri: str, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """A table from a ``runs:/`` / ``models:/`` artefact or any location ``read_table`` reads."""
    if uri.startswith(("runs:/", "models:/")):
        with tempfile.TemporaryDirectory() as tmp:
            return read_table(download(tracking_uri, uri, tmp))
    return read_table(uri, storage_options)


def read_json_artifact(client: mlflow.MlflowClient, run_id: str, path: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        with open(client.download_artifacts(run_id, path, tmp)) as handle:
            return json.load(handle)


def resolve_model(client: mlflow.MlflowClient, model_uri: str) -> tuple[str, str | None]:
    """The artefact location and logged-model id behind ``runs:/<run_id>/<name>`` or ``models:/<id>``.

    Resolved here because MLflow's own ``runs:/`` lookup of a logged model falls back to the
    process-wide tracking URI; other URIs are returned unchanged with no model id.
    """
    if model_uri.startswith("models:/m-"):
        model_id = model_uri.removeprefix("models:/").split("/")[0]
        return client.get_logged_model(model_id).artifact_location, model_id
    if not model_uri.startswith("runs:/"):
        return model_uri, None
    from mlflow.entities import LoggedModelStatus

    run_id, _, name = model_uri.removeprefix("runs:/").partition("/")
    run = client.get_run(run_id)
    outputs = [
        client.get_logged_model(output.model_id)
        for output in (run.outputs.model_outputs if run.outputs else [])
    ]
    # The newest complete one: a resumed run can hold the model of a try that died before finishing.
    ready = [logged for logged in outputs if logged.name == name and logged.status == LoggedModelStatus.READY]
    if ready:
        newest = max(ready, key=lambda logged: logged.creation_timestamp)
        return newest.artifact_location, newest.model_id
    # A model stored as plain run artefacts (mlflow 2 style).
    return f"{run.info.artifact_uri.rstrip('/')}/{name}", None


def load_model(tracking_uri: str, model_uri: str) -> Any:
    """Load a scikit-learn model that ``train`` logged, trusting only ``SKOPS_TRUSTED_TYPES``, or a
    PyTorch one (a ``TorchClassifier``; needs torch, so the ``torch`` runtime).

    Reads the skops file directly instead of ``mlflow.sklearn.load_model``: the latter takes its
    allow-list from the model's own MLmodel file and needs a process-wide opt-in to do so.
    """
    import mlflow
    import skops.io
    from mlflow.models import Model

    location, _ = resolve_model(mlflow.MlflowClient(tracking_uri=tracking_uri), model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = download(tracking_uri, location, tmp)
        flavors = Model.load(os.path.join(local, "MLmodel")).flavors
        if "pytorch" in flavors:
            from airloop.steps.train_torch import load_torch_model

            return load_torch_model(local, model_uri)
        flavor = flavors.get("sklearn")
        if flavor is None or flavor.get("serialization_format") != "skops":
            raise ValueError(f"{model_uri} is not a scikit-learn model saved in the skops format")
        path = os.path.join(local, flavor["pickled_model"])
        unknown = sorted(set(skops.io.get_untrusted_types(file=path)) - SKOPS_TRUSTED_TYPES)
        if unknown:
            raise ValueError(f"{model_uri} holds types outside Airloop's skops allow-list: {unknown}")
        return skops.io.load(path, trusted=sorted(SKOPS_TRUSTED_TYPES))
