"""The conversion routes, one per model family: each loads the model and builds its fp32 graph
(``Source``) for OpenVINO, with the native predictor the parity gate compares against.

The model is resolved and downloaded once per conversion (``load_source``) and every route reads that
copy; planning a route reads the MLmodel file alone (``identify``).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from airloop.encoding import encode, export
from airloop.onnx_runtime import onnx_runtime_predictor
from airloop.tracking.models import MODEL_CLASS, download_model, load_model, read_mlmodel

if TYPE_CHECKING:
    import mlflow.models
    import pandas as pd


# scikit-learn family -> route; a route -> the runtime whose libraries it needs.
ROUTES = {
    "MLPClassifier": "skl2onnx",
    "DecisionTreeClassifier": "hummingbird",
    "RandomForestClassifier": "hummingbird",
    "GradientBoostingClassifier": "hummingbird",
    "HistGradientBoostingClassifier": "hummingbird",
}


ROUTE_RUNTIMES = {"skl2onnx": "worker", "onnx": "worker", "hummingbird": "torch", "pytorch": "torch"}


# The family named for a model of a flavour that is not scikit-learn's (its route is the flavour).
FLAVOUR_FAMILIES = {"pytorch": "PyTorch module", "onnx": "ONNX model"}


SUPPORTED = (
    "scikit-learn MLPClassifier (skl2onnx); scikit-learn DecisionTreeClassifier, RandomForestClassifier, "
    "GradientBoostingClassifier, HistGradientBoostingClassifier (hummingbird-ml, 'torch' runtime); "
    "PyTorch modules (MLflow pytorch flavour, pt2 format, 'torch' runtime); ONNX models without "
    "ai.onnx.ml operators (MLflow onnx flavour)"
)


ONNX_ML_DOMAIN = "ai.onnx.ml"


class UnsupportedModelError(ValueError):
    """The model's flavour or family has no conversion route to OpenVINO."""


@dataclass
class Source:
    """A loaded model and what its route made of it: the fp32 graph OpenVINO reads, and its peers."""

    flavour: str
    family: str
    route: str
    feature_names: list[str]
    classes: list[Any]
    native: Callable[[Any], np.ndarray]  # class scores from ``native_input`` rows
    native_input: str  # "frame" (a DataFrame with the feature names) or "array" (float32)
    native_name: str  # the framework that ``native`` runs
    graph: str = ""  # ONNX file or IR that OpenVINO reads
    # The input encoding the IR's rows go through first (``airloop.encoding``); the native model does it
    # itself, on the raw rows.
    encoding: dict[str, Any] | None = None
    onnx_path: str | None = None  # what ONNX Runtime runs in the benchmark, when there is one
    notes: list[str] = field(default_factory=list)


def identify(tracking_uri: str, model_uri: str) -> tuple[str, str]:
    """The model's flavour and family, from its MLmodel file: a scikit-learn model that ``train``
    logged names its class there; any other is downloaded and loaded (skops, allow-listed) to name it."""
    mlmodel = read_mlmodel(tracking_uri, model_uri)
    flavour = _flavour(mlmodel, model_uri)
    if flavour != "sklearn":
        return flavour, FLAVOUR_FAMILIES[flavour]
    model_class = (mlmodel.metadata or {}).get(MODEL_CLASS)
    if model_class:
        return flavour, str(model_class).rpartition(".")[2]
    return flavour, type(load_model(tracking_uri, model_uri)).__name__


def _flavour(mlmodel: mlflow.models.Model, model_uri: str) -> str:
    """The supported MLflow flavour of the model: ``sklearn`` in skops format, ``pytorch`` or ``onnx``."""
    flavours = mlmodel.flavors
    if flavours.get("sklearn", {}).get("serialization_format") == "skops":
        return "sklearn"
    for name in ("pytorch", "onnx"):
        if name in flavours:
            return name
    named = sorted(flavours)
    hint = (
        " (a scikit-learn model saved with pickle: log it with serialization_format='skops')"
        if "sklearn" in flavours
        else ""
    )
    raise UnsupportedModelError(
        f"{model_uri} has MLflow flavours {named}, none that Airloop converts to OpenVINO{hint}: "
        f"supported are {SUPPORTED}"
    )


def route_for(flavour: str, family: str) -> str:
    if flavour != "sklearn":
        return flavour
    if family not in ROUTES:
        raise UnsupportedModelError(
            f"cannot convert a {family} to OpenVINO: supported are {SUPPORTED}. Serve a {family} "
            "with ONNX Runtime or the native model, or train a supported family"
        )
    return ROUTES[family]


def load_source(
    tracking_uri: str, model_uri: str, work_dir: str, frame: pd.DataFrame, classes: list[Any] | None = None
) -> Source:
    """Download the model behind ``model_uri`` into ``work_dir`` and build its fp32 graph there.

    ``frame`` holds holdout rows (features, no label): it names the columns of a model that does not,
    and gives the example input torch graphs are traced with. ``classes`` names the output columns of a
    PyTorch or ONNX model (default ``0..k-1``).
    """
    from mlflow.models import Model

    local = download_model(tracking_uri, model_uri, work_dir)
    if not os.path.isfile(os.path.join(local, "MLmodel")):
        raise UnsupportedModelError(f"{model_uri} is not an MLflow model (no MLmodel file)")
    flavour = _flavour(Model.load(os.path.join(local, "MLmodel")), model_uri)
    if flavour == "sklearn":
        return sklearn_source(load_model(tracking_uri, model_uri, local=local), work_dir, frame)
    if flavour == "pytorch":
        return _pytorch_source(local, work_dir, frame, classes)
    return _onnx_source(local, work_dir, frame, classes)


def sklearn_source(model: Any, work_dir: str, frame: pd.DataFrame) -> Source:
    """A fitted scikit-learn classifier's route and fp32 graph (``frame``: rows with its features). A
    ``Pipeline`` of an input encoding and a classifier (``airloop.encoding``): the classifier's graph,
    on the encoded rows, and the encoding beside it."""
    pipeline = hasattr(model, "steps")
    estimator = model[-1] if pipeline else model
    family = type(estimator).__name__
    route = route_for("sklearn", family)
    source = Source(
        "sklearn",
        family,
        route,
        _feature_names(model),
        [value.item() if hasattr(value, "item") else value for value in model.classes_],
        model.predict_proba,
        "frame",
        "scikit-learn",
    )
    if pipeline:
        if len(model.steps) != 2:
            raise UnsupportedModelError(
                f"a Pipeline of {len(model.steps)} steps: supported is an input encoding then the classifier"
                " (airloop.encoding)"
            )
        try:
            source.encoding = export(model[0])
        except ValueError as exc:
            raise UnsupportedModelError(str(exc)) from None
    rows = _rows(frame, source.feature_names, source.encoding)
    onnx_path = os.path.join(work_dir, "model.onnx")
    if route == "skl2onnx":
        export_onnx(estimator, onnx_path)
        source.graph = source.onnx_path = onnx_path
    else:
        # ONNX Runtime reads ai.onnx.ml tree operators; OpenVINO gets hummingbird-ml's graph instead.
        try:
            _skl2onnx(estimator, onnx_path)
            source.onnx_path = onnx_path
        except Exception as exc:  # skl2onnx's own limits: the benchmark goes on without ONNX Runtime
            source.notes.append(
                f"ONNX Runtime not benchmarked: skl2onnx cannot export this {family}: {_error_line(exc)}"
            )
        _hummingbird_graph(estimator, rows, source, work_dir)
    return source


def _error_line(exc: Exception) -> str:
    """The exception's type and the first line of its message, for a note."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def export_onnx(estimator: Any, onnx_path: str) -> None:
    """Write the probabilities-only ONNX graph of an MLP (input ``input``: ``[N, n_features]``)."""
    family = type(estimator).__name__
    if ROUTES.get(family) != "skl2onnx":
        raise UnsupportedModelError(
            f"a {family} has no skl2onnx route to OpenVINO (its graph needs {ONNX_ML_DOMAIN} operators): "
            f"supported are {SUPPORTED}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        full = os.path.join(tmp, "full.onnx")
        _skl2onnx(estimator, full)
        _probabilities_graph(full, onnx_path)


def _skl2onnx(estimator: Any, path: str) -> None:
    import onnx
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    graph = convert_sklearn(
        estimator,
        initial_types=[("input", FloatTensorType([None, int(estimator.n_features_in_)]))],
        options={id(estimator): {"zipmap": False}},
    )
    onnx.save(graph, path)


def _probabilities_graph(full: str, path: str) -> str:
    """Keep the subgraph of ``full`` that computes its first 2-D float output; returns that output's name.

    Refuses a subgraph that still holds ``ai.onnx.ml`` operators, naming them.
    """
    import onnx
    import onnx.utils

    model = onnx.load(full)
    float_type = onnx.TensorProto.FLOAT
    outputs = [
        output.name
        for output in model.graph.output
        if output.type.tensor_type.elem_type == float_type and len(output.type.tensor_type.shape.dim) == 2
    ]
    if not outputs:
        raise UnsupportedModelError(
            f"the ONNX graph has no 2-D float output (class scores) to convert: "
            f"outputs {[output.name for output in model.graph.output]}"
        )
    onnx.utils.extract_model(full, path, [model.graph.input[0].name], [outputs[0]])
    ml_ops = sorted({node.op_type for node in onnx.load(path).graph.node if node.domain == ONNX_ML_DOMAIN})
    if ml_ops:
        raise UnsupportedModelError(
            f"the ONNX graph computes {outputs[0]!r} with {ONNX_ML_DOMAIN} operators {ml_ops}, which "
            f"OpenVINO cannot read: supported are {SUPPORTED}"
        )
    return outputs[0]


def _needs_torch_runtime(route: str, family: str, error: ImportError) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"the {route} route for a {family} needs the 'torch' runtime ({error.name} is not installed here): "
        "run the conversion with runtime='torch' (build it with `airloop runtimes build torch`)"
    )


def float32_thresholds(estimator: Any) -> Any:
    """A copy of a scikit-learn tree model whose split thresholds are the largest float32 at or under
    each, so that a float32 graph splits every row as scikit-learn does.

    scikit-learn's trees cast the features to float32 and compare them with float64 thresholds
    (midpoints between two training values). A float32 graph rounds a threshold to the nearest float32,
    which may be the training value just above it: that value then goes left in the graph and right in
    scikit-learn, moving a forest's probability by one tree's vote (seen on real data: 0.01 with 100
    trees). For float32 inputs, ``x <= t`` holds exactly when ``x <= the largest float32 <= t``.
    Histogram gradient boosting compares in float64 and is returned as it is.
    """
    import copy

    trees = _float32_trees(estimator)
    if not trees:
        return estimator
    copied = copy.deepcopy(estimator)
    for tree in _float32_trees(copied):
        threshold = tree.tree_.threshold  # a view of the tree's nodes: writes go to the tree
        down = threshold.astype(np.float32)
        above = down.astype(np.float64) > threshold
        down[above] = np.nextafter(down[above], np.float32(-np.inf))
        threshold[:] = down
    return copied


def _float32_trees(estimator: Any) -> list[Any]:
    """The fitted ``tree_``-holding trees of a model that predicts on float32 features."""
    if hasattr(estimator, "tree_"):
        return [estimator]
    family = type(estimator).__name__
    if family in ("RandomForestClassifier", "ExtraTreesClassifier", "GradientBoostingClassifier"):
        return [tree for tree in np.ravel(estimator.estimators_) if hasattr(tree, "tree_")]
    return []


def _hummingbird_graph(estimator: Any, rows: np.ndarray, source: Source, work_dir: str) -> None:
    """hummingbird-ml's torch graph of a tree model, converted to an fp32 IR (``source.graph``)."""
    try:
        import hummingbird.ml
        import torch
    except ImportError as error:
        raise _needs_torch_runtime(source.route, source.family, error) from None
    import openvino

    executor = hummingbird.ml.convert(float32_thresholds(estimator), "torch", rows[:100]).model

    class Probabilities(torch.nn.Module):
        """hummingbird-ml's operators on one float32 tensor, returning the probabilities only: its own
        executor takes numpy or DataFrames and returns labels too."""

        def __init__(self) -> None:
            super().__init__()
            self.executor = executor

        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            values = {self.executor._input_names[0]: batch}
            for operator in self.executor._operators:
                outputs = operator(*(values[name] for name in operator.inputs))
                values.update(
                    zip(operator.outputs, outputs if len(operator.outputs) > 1 else (outputs,), strict=True)
                )
            result = values[self.executor._output_names[-1]]
            return result[-1] if isinstance(result, tuple) else result

    with torch.inference_mode():
        model = openvino.convert_model(
            Probabilities().eval(), example_input=torch.from_numpy(rows[:2]), input=[(-1, rows.shape[1])]
        )
    source.graph = os.path.join(work_dir, "source.xml")
    openvino.save_model(model, source.graph, compress_to_fp16=False)
    if len(source.classes) > 2 and source.family in (
        "GradientBoostingClassifier",
        "HistGradientBoostingClassifier",
    ):
        source.notes.append(
            "multiclass boosting: OpenVINO's CPU plugin has been seen to miscompute the "
            "fused sum + softmax of this graph; the parity gate decides"
        )


def _pytorch_source(local: str, work_dir: str, frame: pd.DataFrame, classes: list[Any] | None) -> Source:
    try:
        import torch
    except ImportError as error:
        raise _needs_torch_runtime("pytorch", FLAVOUR_FAMILIES["pytorch"], error) from None
    import openvino
    from mlflow.models import Model

    mlmodel = Model.load(os.path.join(local, "MLmodel"))
    flavour = mlmodel.flavors["pytorch"]
    # Models trained by Airloop carry their class labels and feature order (steps/train_torch.py).
    metadata = mlmodel.metadata or {}
    program_path = os.path.join(local, flavour.get("model_data", "data"), "model.pt2")
    if not os.path.isfile(program_path):
        raise UnsupportedModelError(
            "the PyTorch model is saved with pickle, which runs code when loaded: log it with "
            "mlflow.pytorch.log_model(..., serialization_format='pt2') (a torch.export program)"
        )
    program = torch.export.load(program_path)
    feature_names = metadata.get("feature_names") or _signature_columns(local) or list(frame.columns)
    model = openvino.convert_model(program)
    model.reshape([-1, len(feature_names)])  # the export's batch dimension is dynamic; name the features
    source = Source(
        "pytorch",
        FLAVOUR_FAMILIES["pytorch"],
        "pytorch",
        feature_names,
        [],
        _torch_predictor(program),
        "array",
        "torch",
    )
    source.classes = (
        classes or metadata.get("classes") or _class_range(source.native(_rows(frame, feature_names)[:2]))
    )
    source.graph = os.path.join(work_dir, "source.xml")
    openvino.save_model(model, source.graph, compress_to_fp16=False)
    onnx_path = os.path.join(work_dir, "model.onnx")
    try:
        _torch_onnx(program, _rows(frame, feature_names)[:2], onnx_path)
        source.onnx_path = onnx_path
    except Exception as exc:  # an operator without an ONNX symbolic: the benchmark goes on without it
        source.notes.append(
            f"ONNX Runtime not benchmarked: torch's ONNX exporter cannot export this module: "
            f"{_error_line(exc)}"
        )
    return source


def _torch_onnx(program: Any, example: np.ndarray, path: str) -> None:
    """Write the ONNX graph of an exported program's module (input ``input``: ``[N, n_features]``,
    output ``probabilities``: what the module returns).

    torch's exporter for exported programs needs onnxscript, which needs a newer onnx than hummingbird-ml
    allows in this runtime, so the TorchScript exporter traces the module; ``TrainingMode.PRESERVE``
    because the module refuses ``.train()`` (its graph already holds the eval-mode operators).
    """
    import torch

    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated and its tracer warns; it is the one that runs here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            program.module(),
            (torch.from_numpy(example),),
            path,
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            input_names=["input"],
            output_names=["probabilities"],
            dynamic_axes={"input": {0: "n"}, "probabilities": {0: "n"}},
        )


def _torch_predictor(program: Any) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    module = program.module()

    def predict(rows: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(rows)).numpy()

    return predict


def _onnx_source(local: str, work_dir: str, frame: pd.DataFrame, classes: list[Any] | None) -> Source:
    from mlflow.models import Model

    flavour = Model.load(os.path.join(local, "MLmodel")).flavors["onnx"]
    graph = os.path.join(work_dir, "model.onnx")
    _probabilities_graph(os.path.join(local, flavour.get("data", "model.onnx")), graph)
    feature_names = _signature_columns(local) or list(frame.columns)
    native = onnx_runtime_predictor(graph)
    source = Source(
        "onnx",
        FLAVOUR_FAMILIES["onnx"],
        "onnx",
        feature_names,
        [],
        native,
        "array",
        "onnxruntime",
        graph=graph,
    )
    source.classes = classes or _class_range(native(_rows(frame, feature_names)[:2]))
    source.notes.append("the native framework of an ONNX model is ONNX Runtime")
    return source


def _signature_columns(local: str) -> list[str]:
    """Column names of the model's MLflow input signature (empty for a tensor signature or none)."""
    from mlflow.models import Model

    signature = Model.load(os.path.join(local, "MLmodel")).signature
    if signature is None or not signature.inputs.has_input_names() or signature.is_signature_from_type_hint:
        return []
    return [str(name) for name in signature.inputs.input_names()]


def _rows(
    frame: pd.DataFrame, feature_names: list[str], encoding: dict[str, Any] | None = None
) -> np.ndarray:
    """The model's features of the holdout rows, as the float32 rows its graph takes."""
    missing = sorted(set(feature_names) - set(frame.columns))
    if missing:
        raise ValueError(f"holdout lacks the model's features {missing}")
    if encoding is not None:
        return encode(encoding, feature_names, frame[feature_names].to_numpy(dtype=object))
    return frame[feature_names].to_numpy(np.float32)


def _class_range(scores: np.ndarray) -> list[int]:
    if scores.ndim != 2:
        raise UnsupportedModelError(
            f"the model returns an array of shape {list(scores.shape)}: expected class scores [rows, classes]"
        )
    return list(range(scores.shape[1]))


def _feature_names(estimator: Any) -> list[str]:
    names = [str(name) for name in getattr(estimator, "feature_names_in_", [])]
    return names or [f"x{i}" for i in range(int(estimator.n_features_in_))]


def class_index(classes: list[Any], labels: Any) -> np.ndarray:
    """Each label's column in the model's output; a label the model never saw raises ValueError."""
    unknown = sorted(set(labels) - set(classes), key=str)
    if unknown:
        raise ValueError(f"holdout labels {unknown[:5]} are not among the model's classes {classes}")
    lookup = {value: i for i, value in enumerate(classes)}
    return np.array([lookup[value] for value in labels])
