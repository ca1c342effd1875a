"""The PyTorch route of ``airloop.steps.training.train``: ``estimator="torch:package.module.Class"``.

``Class`` is a ``torch.nn.Module`` (``airloop.torch_models.MLPClassifier`` to start with) built as
``Class(n_features=..., n_classes=..., **module_params)``; its ``forward`` maps float32 rows
``[N, n_features]`` to class logits. The request's ``estimator_params`` hold both kinds of argument:
the keys of ``TRAINING_DEFAULTS`` drive the training loop, every other key goes to the constructor. The
request's ``seed`` seeds the weights, dropout and batch order, so a re-run trains the same model.

Training runs on CPU: Adam on cross-entropy in shuffled mini-batches, the inputs standardised with the
training split's mean and spread (``standardize``). The fitted ``TorchClassifier`` answers the calls
``train`` and ``evaluate`` make of a scikit-learn classifier (``classes_``, ``predict_proba``,
``predict``, ``get_params``) and carries its per-epoch loss (``epoch_losses_``), so the holdout
metrics and the evaluation gate are the same as for scikit-learn models.

The model is logged in MLflow's ``pytorch`` flavour as a ``torch.export`` program (``data/model.pt2``;
never pickle, whose loading runs code) with a dynamic batch dimension: standardisation, the module
and a softmax, so it takes the raw features and returns class probabilities, as the conversion's
``pytorch`` route expects. The MLmodel ``metadata`` keeps the class labels and feature names.

torch is in the ``torch`` runtime, not in Airflow's environment: run the training, the evaluation and
the conversion of such a model with ``runtime="torch"``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from airloop.tracking.models import TorchClassifier, import_torch

if TYPE_CHECKING:
    import pandas as pd

# The training loop's params and their defaults; any other param is the module's.
TRAINING_DEFAULTS: dict[str, Any] = {
    "epochs": 30,
    "lr": 1e-3,
    "batch_size": 32,
    "weight_decay": 0.0,
    "standardize": True,
}


def torch_trainer(path: str, params: dict[str, Any], seed: int) -> Callable[[pd.DataFrame, pd.Series], Any]:
    """A function ``(features, target) -> TorchClassifier`` for the module class at ``path``.

    The import, the training params and the constructor's arguments are checked here, before training.
    """
    torch = import_torch(f"the estimator 'torch:{path}'")
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"estimator 'torch:{path}' cannot be imported: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"estimator 'torch:{path}' must be a torch.nn.Module class, got {cls!r}")
    training = {**TRAINING_DEFAULTS, **{k: v for k, v in params.items() if k in TRAINING_DEFAULTS}}
    _check_training(training)
    module_params = {k: v for k, v in params.items() if k not in TRAINING_DEFAULTS}
    signature = inspect.signature(cls)
    try:
        signature.bind(n_features=1, n_classes=2, **module_params)
    except TypeError as exc:
        raise ValueError(
            f"estimator 'torch:{path}' must take n_features, n_classes and {sorted(module_params)} "
            f"(the training params are {sorted(TRAINING_DEFAULTS)}): {exc}"
        ) from exc
    defaults = {
        key: parameter.default
        for key, parameter in signature.parameters.items()
        if parameter.default is not parameter.empty and key not in ("n_features", "n_classes")
    }
    logged = {"model_class": f"{cls.__module__}.{cls.__qualname__}", **defaults, **module_params, **training}

    def fit(features: pd.DataFrame, target: pd.Series) -> TorchClassifier:
        return _fit(cls, module_params, training, seed, features, target, logged)

    return fit


def _check_training(training: dict[str, Any]) -> None:
    problems = []
    for key in ("epochs", "batch_size"):
        if not isinstance(training[key], int) or isinstance(training[key], bool) or training[key] < 1:
            problems.append(f"{key} must be a whole number >= 1, got {training[key]!r}")
    if not isinstance(training["lr"], int | float) or not training["lr"] > 0:
        problems.append(f"lr must be a number > 0, got {training['lr']!r}")
    if not isinstance(training["weight_decay"], int | float) or training["weight_decay"] < 0:
        problems.append(f"weight_decay must be a number >= 0, got {training['weight_decay']!r}")
    if not isinstance(training["standardize"], bool):
        problems.append(f"standardize must be true or false, got {training['standardize']!r}")
    if problems:
        raise ValueError("bad torch training params: " + "; ".join(problems))


def _fit(
    cls: type,
    module_params: dict[str, Any],
    training: dict[str, Any],
    seed: int,
    features: pd.DataFrame,
    target: pd.Series,
    params: dict[str, Any],
) -> TorchClassifier:
    import torch

    from airloop.torch_models import Standardize

    rows = torch.from_numpy(_float_rows(features))
    classes, labels = np.unique(target.to_numpy(), return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"the training split holds a single class ({classes[0]!r}): nothing to learn")
    labels = torch.from_numpy(labels.astype(np.int64))
    standardize: torch.nn.Module = torch.nn.Identity()
    if training["standardize"]:
        scale = rows.std(dim=0, correction=0)
        # A constant column keeps its scale: dividing by zero would make every input NaN.
        standardize = Standardize(rows.mean(dim=0), torch.where(scale > 0, scale, torch.ones_like(scale)))
    inputs = standardize(rows)
    # Seeded on a fork of the global generator: the same weights, dropout masks and batch order every
    # run, without changing the random state of the process the step runs in.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = cls(n_features=rows.shape[1], n_classes=len(classes), **module_params)
        order = torch.Generator().manual_seed(seed)
        optimiser = torch.optim.Adam(
            net.parameters(), lr=float(training["lr"]), weight_decay=float(training["weight_decay"])
        )
        loss_function = torch.nn.CrossEntropyLoss()
        losses: list[float] = []
        net.train()
        for epoch in range(1, training["epochs"] + 1):
            total = 0.0
            for batch in torch.randperm(len(labels), generator=order).split(training["batch_size"]):
                optimiser.zero_grad()
                loss = loss_function(net(inputs[batch]), labels[batch])
                loss.backward()
                optimiser.step()
                total += loss.item() * len(batch)
            losses.append(total / len(labels))
            if not np.isfinite(losses[-1]):
                raise ValueError(f"training diverged at epoch {epoch} (loss {losses[-1]}): lower lr")
    model = torch.nn.Sequential(standardize, net, torch.nn.Softmax(dim=1)).eval()
    return TorchClassifier(model, classes.tolist(), [str(c) for c in features.columns], params, losses)


def _float_rows(features: pd.DataFrame) -> np.ndarray:
    from pandas.api.types import is_numeric_dtype

    other = [str(column) for column in features.columns if not is_numeric_dtype(features[column])]
    if other:
        raise ValueError(
            f"the torch route takes numeric features only: encode {other} first, or train with a "
            "training function (package.module:function) that does"
        )
    rows = features.to_numpy(np.float32)
    if not np.isfinite(rows).all():
        raise ValueError("the training features hold NaN or infinite values: impute or drop them first")
    return rows
