"""Models in MLflow: log, resolve, download and load the scikit-learn (skops) and PyTorch
(``torch.export``) models that the train step makes.

A step that needs the model's files more than once (the conversion reads the MLmodel file, loads the
estimator and converts its graph) resolves and downloads it once, with ``download_model``, and hands the
local copy on: ``load_model(..., local=folder)``. The MLmodel file alone (flavours and ``metadata``, which
names a scikit-learn model's class) is read without the model, with ``read_mlmodel``.

A PyTorch model is logged in MLflow's ``pytorch`` flavour as a ``torch.export`` program
(``data/model.pt2``; never pickle, whose loading runs code) with a dynamic batch dimension; the MLmodel
``metadata`` keeps the class labels and feature names. ``TorchClassifier`` answers the calls the steps
make of a scikit-learn classifier."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

import numpy as np

from airloop.tracking.artifacts import MODEL_NAME, download

if TYPE_CHECKING:
    import mlflow
    import mlflow.models
    import pandas as pd

# The MLmodel ``metadata`` key naming a scikit-learn model's class (``package.module.Class``).
MODEL_CLASS = "model_class"


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
        # A model's input encoding (airloop.encoding): its missing-value step and OrdinalEncoder's dtype.
        "airloop.encoding.missing_as_nan",
        "numpy.dtype",
    }
)


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
    from mlflow.models import infer_signature

    with quiet_skops() as skops_io:
        untrusted = skops_io.get_untrusted_types(data=skops_io.dumps(estimator))
    unknown = sorted(set(untrusted) - SKOPS_TRUSTED_TYPES)
    if unknown:
        raise ValueError(f"estimator holds types outside Airloop's skops allow-list: {unknown}")
    signature = infer_signature(example, estimator.predict_proba(example.head(5)))
    # A pipeline's classifier: its family decides the conversion route (the encoding goes beside the IR).
    cls = type(estimator[-1] if hasattr(estimator, "steps") else estimator)

    def save(path: str, mlflow_model: mlflow.models.Model) -> None:
        mlflow.sklearn.save_model(
            estimator,
            path,
            mlflow_model=mlflow_model,
            serialization_format="skops",
            skops_trusted_types=untrusted,
            signature=signature,
            # The class, so that a conversion plans its route from the MLmodel file alone.
            metadata={MODEL_CLASS: f"{cls.__module__}.{cls.__qualname__}"},
            # Explicit requirements: inferring them re-imports the model in a subprocess (seconds).
            pip_requirements=[
                f"scikit-learn=={sklearn.__version__}",
                f"skops=={version('skops')}",
                f"numpy=={numpy.__version__}",
            ],
        )

    with quiet_skops():
        return log_logged_model(client, run, save)


@contextmanager
def quiet_skops() -> Iterator[Any]:
    """``skops.io``, imported and used without its lookups' warnings. skops finds a function's module
    the way pickle does, by asking every imported module for the name (at import too): Airflow's
    deprecated modules answer each question with a warning, a thousand lines of task log per model
    that say nothing about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"skops\.io\._utils")
        import skops.io

        yield skops.io


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


def download_model(tracking_uri: str, model_uri: str, dst_dir: str) -> str:
    """Resolve ``model_uri`` and download the model folder into ``dst_dir``; returns the local folder."""
    import mlflow

    location, _ = resolve_model(mlflow.MlflowClient(tracking_uri=tracking_uri), model_uri)
    return download(tracking_uri, location, dst_dir)


def read_mlmodel(tracking_uri: str, model_uri: str) -> mlflow.models.Model:
    """The model's MLmodel file (flavours, signature, ``metadata``), without downloading the model."""
    import mlflow
    from mlflow.models import Model

    location, _ = resolve_model(mlflow.MlflowClient(tracking_uri=tracking_uri), model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        return Model.load(download(tracking_uri, f"{location.rstrip('/')}/MLmodel", tmp))


def load_model(tracking_uri: str, model_uri: str, *, local: str | None = None) -> Any:
    """Load a scikit-learn model that ``train`` logged, trusting only ``SKOPS_TRUSTED_TYPES``, or a
    PyTorch one (a ``TorchClassifier``; needs torch, so the ``torch`` runtime).

    ``local`` is the model folder when the caller downloaded it already (``download_model``); otherwise
    the model is resolved and downloaded here. Reads the skops file directly instead of
    ``mlflow.sklearn.load_model``: the latter takes its allow-list from the model's own MLmodel file and
    needs a process-wide opt-in to do so.
    """
    if local is not None:
        return _load_local(local, model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        return _load_local(download_model(tracking_uri, model_uri, tmp), model_uri)


def _load_local(local: str, model_uri: str) -> Any:
    from mlflow.models import Model

    flavors = Model.load(os.path.join(local, "MLmodel")).flavors
    if "pytorch" in flavors:
        return load_torch_model(local, model_uri)
    flavor = flavors.get("sklearn")
    if flavor is None or flavor.get("serialization_format") != "skops":
        raise ValueError(f"{model_uri} is not a scikit-learn model saved in the skops format")
    path = os.path.join(local, flavor["pickled_model"])
    with quiet_skops() as skops_io:
        unknown = sorted(set(skops_io.get_untrusted_types(file=path)) - SKOPS_TRUSTED_TYPES)
        if unknown:
            raise ValueError(f"{model_uri} holds types outside Airloop's skops allow-list: {unknown}")
        return skops_io.load(path, trusted=sorted(SKOPS_TRUSTED_TYPES))


PROGRAM_FILE = "model.pt2"


EXAMPLE_ROWS = 5  # more than one, so that torch.export keeps the batch dimension dynamic


def import_torch(what: str) -> Any:
    """``torch``, or an ImportError that says where ``what`` can run."""
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            f"{what} needs PyTorch, which this environment lacks ({error}): run the task in the 'torch' "
            "runtime (the operator's runtime='torch'), built with `airloop runtimes build torch`"
        ) from None
    return torch


class TorchClassifier:
    """A fitted (or loaded) torch module that returns class probabilities, with the scikit-learn calls
    the steps make. ``feature_names_in_`` are the columns it reads, in order."""

    def __init__(
        self,
        module: Any,
        classes: list[Any],
        feature_names: list[str],
        params: dict[str, Any] | None = None,
        epoch_losses: list[float] | None = None,
    ) -> None:
        self.module = module
        self.classes_ = np.asarray(classes)
        self.feature_names_in_ = np.asarray(feature_names, dtype=object)
        self.params = params or {}
        self.epoch_losses_ = epoch_losses or []

    def predict_proba(self, features: pd.DataFrame) -> np.ndarray:
        import torch

        names = list(self.feature_names_in_)
        missing = sorted(set(names) - set(features.columns))
        if missing:
            raise ValueError(f"the data lacks the model's features {missing}")
        with torch.inference_mode():
            return self.module(torch.from_numpy(features[names].to_numpy(np.float32))).numpy()

    def predict(self, features: pd.DataFrame) -> np.ndarray:
        return self.classes_[self.predict_proba(features).argmax(axis=1)]

    def get_params(self, deep: bool = False) -> dict[str, Any]:
        """What ``train`` logs as params: ``model_class`` (the module's class), the constructor's
        arguments with their defaults, and the training loop's."""
        return dict(self.params)


def log_torch_model(
    client: mlflow.MlflowClient, run: mlflow.entities.Run, classifier: TorchClassifier, example: pd.DataFrame
) -> str:
    """Log ``classifier`` as the run's logged model ``model``: MLflow's ``pytorch`` flavour in the pt2
    format, with a tensor signature ``[-1, n_features] -> [-1, n_classes]``; returns its model id."""
    import mlflow.pytorch
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    names = [str(name) for name in classifier.feature_names_in_]
    rows = example[names].head(EXAMPLE_ROWS).to_numpy(np.float32)
    # pt2 needs a tensor signature; unnamed, so the conversion takes the feature names from the data.
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(names)))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(classifier.classes_)))]),
    )

    def save(path: str, mlflow_model: Any) -> None:
        mlflow.pytorch.save_model(
            classifier.module,
            path,
            mlflow_model=mlflow_model,
            serialization_format="pt2",
            input_example=rows,
            signature=signature,
            metadata={"classes": classifier.classes_.tolist(), "feature_names": names},
            # Explicit, as for scikit-learn models; torch's release without its build tag (+cpu), which
            # pip finds on any index.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
        )

    return log_logged_model(client, run, save)


def load_torch_model(local: str, model_uri: str) -> TorchClassifier:
    """The classifier in the MLflow ``pytorch`` model folder ``local`` that ``log_torch_model`` wrote."""
    from mlflow.models import Model

    torch = import_torch(f"loading the PyTorch model {model_uri}")
    mlmodel = Model.load(os.path.join(local, "MLmodel"))
    program = os.path.join(local, mlmodel.flavors["pytorch"].get("model_data", "data"), PROGRAM_FILE)
    if not os.path.isfile(program):
        raise ValueError(
            f"{model_uri} is a PyTorch model saved with pickle, which runs code when loaded: "
            "log it with serialization_format='pt2' (a torch.export program)"
        )
    metadata = mlmodel.metadata or {}
    if not {"classes", "feature_names"} <= metadata.keys():
        raise ValueError(
            f"{model_uri} has no 'classes' and 'feature_names' in its MLmodel metadata: Airloop scores "
            "the PyTorch models its train step logged (estimator='torch:package.module.Class')"
        )
    return TorchClassifier(
        torch.export.load(program).module(), metadata["classes"], metadata["feature_names"]
    )
