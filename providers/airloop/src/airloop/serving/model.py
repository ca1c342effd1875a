"""The model server class for Seldon Core 1.x's Python wrapper, serving an OpenVINO IR on CPU.

Run in the serving runtime, either by Seldon's own console script (in an image on Kubernetes)::

    seldon-core-microservice airloop.serving.model.OpenVinoModel --service-type MODEL \
        --parameters '[{"name": "model_dir", "value": "/models/v3", "type": "STRING"}]'

or, on a laptop, by ``python -m airloop.serving.model`` with the same arguments, which binds the
HTTP and metrics servers to 127.0.0.1 instead of every interface.

The model folder holds ``model.xml``, ``model.bin`` and ``manifest.json`` (written by the conversion
step): ``{"format": "openvino-ir", "files": {name: sha256}, "feature_names": [...], "classes": [...],
"precision": "fp32"}``, and the model's input encoding when it has one (``airloop.encoding``): its
categorical features then take strings, and a missing value (null) of any feature is served.
``load()`` refuses to compile unless every listed file matches its checksum.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from airloop.openvino_ir import compile_ir, infer_rows, input_names, ir_rows, read_verified_manifest

# Infer requests per compiled model (one-row, batch) shared by the server's threads (Seldon's --threads);
# more threads wait for a free one.
INFER_REQUESTS = 4
# Custom metrics, on Seldon's metrics port with its labels (deployment_name, predictor_name, ...);
# Seldon exposes counters with a "_total" suffix. On Kubernetes they are what Prometheus knows of
# a predictor's answers and of their quality.
PREDICTIONS_METRIC = "airloop_model_predictions"  # rows per predicted class (tag "class")
FEEDBACK_METRIC = "airloop_model_feedback"  # feedback rows, tag "outcome": "correct" | "incorrect"


def label_value(value: Any) -> Any:
    """Compare labels by value: the truth may come as 1, 1.0 or "1" for class "1"."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def predicted_class(probabilities: Sequence[float], classes: Sequence[Any]) -> str:
    """The name of the most probable class of one row (its index when there are no names)."""
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return str(classes[best] if len(classes) else best)


def label_rows(values: Any) -> list[Any]:
    """Labels as a flat list, one per row: ``[[1], [0]]``, ``[1, 0]``, an array of either, or ``1``."""
    values = values.tolist() if isinstance(values, np.ndarray) else values
    if not isinstance(values, list):
        return [values]
    return [v[0] if isinstance(v, list) and len(v) == 1 else v for v in values]


def _bad_input(message: str) -> Exception:
    """A client error: Seldon's wrapper answers it with 400 instead of 500 (a server fault)."""
    try:
        from seldon_core.flask_utils import SeldonMicroserviceException
    except ImportError:  # the class used outside Seldon's wrapper (tests, batch scoring)
        return ValueError(message)
    return SeldonMicroserviceException(message, status_code=400, reason="BAD_INPUT")


class OpenVinoModel:
    """Class probabilities from an OpenVINO IR classifier, for Seldon's ``MODEL`` service type."""

    def __init__(self, model_dir: str, precision_hint: str = "f32") -> None:
        self.model_dir = model_dir
        self.precision_hint = precision_hint
        self._compiled: Any = None
        self._manifest: dict[str, Any] = {}
        # Seldon's gthread workers call predict() from several threads: per-thread metrics, pooled
        # requests, one pool for single rows (keyed True) and one for batches.
        self._local = threading.local()
        self._requests: dict[bool, queue.SimpleQueue] = {
            True: queue.SimpleQueue(),
            False: queue.SimpleQueue(),
        }

    def load(self) -> None:
        manifest = read_verified_manifest(Path(self.model_dir))
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(Path(self.model_dir) / "model.xml"))
        one_row, self._compiled = compile_ir(core, model, self.precision_hint)
        self._manifest = manifest
        # Infer requests are made and run once here, one thread at a time: the first inferences of a
        # freshly compiled model racing in the server's threads have hung the server.
        warm_up = np.zeros((1, len(input_names(manifest))), dtype=np.float32)
        for single, compiled in ((True, one_row), (False, self._compiled)):
            for _ in range(INFER_REQUESTS):
                request = compiled.create_infer_request()
                infer_rows(request, warm_up)
                self._requests[single].put(request)

    def class_names(self) -> list[str]:
        return [str(c) for c in self._manifest["classes"]]

    def predict(
        self, X: Any, features_names: list[str] | None = None, meta: dict | None = None
    ) -> np.ndarray:
        start = time.perf_counter()
        probabilities = self._infer(X, features_names)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        classes = self.class_names()
        predicted = Counter(predicted_class(row, classes) for row in probabilities)
        self._local.pending = [
            {"type": "COUNTER", "key": "airloop_model_rows_total", "value": len(probabilities)},
            {"type": "TIMER", "key": "airloop_model_inference_ms", "value": elapsed_ms},
            *(
                {"type": "COUNTER", "key": PREDICTIONS_METRIC, "value": n, "tags": {"class": name}}
                for name, n in sorted(predicted.items())
            ),
        ]
        return probabilities

    def _infer(self, X: Any, features_names: Sequence[str] | None) -> np.ndarray:
        if self._compiled is None:
            raise RuntimeError(f"model in {self.model_dir} is not loaded: call load() first")
        expected = self._manifest["feature_names"]
        if features_names is not None and len(features_names) and list(features_names) != expected:
            raise _bad_input(f"feature names {list(features_names)} do not match the model's {expected}")
        try:
            rows = ir_rows(self._manifest, X)
        except (TypeError, ValueError) as exc:
            raise _bad_input(str(exc)) from None
        columns = input_names(self._manifest)
        if rows.ndim != 2 or rows.shape[1] != len(columns):
            raise _bad_input(f"expected rows of {len(expected)} features, got shape {list(rows.shape)}")
        finite = np.isfinite(rows)
        if not finite.all():  # NaN (a null without an encoding), Infinity, 1e400: no made-up probabilities
            row, column = np.argwhere(~finite)[0]
            raise _bad_input(f"feature {columns[column]!r} of row {row} must be a finite number")
        pool = self._requests[len(rows) == 1]
        request = pool.get()  # waits while every request is busy
        try:
            return infer_rows(request, rows, np.float64)
        finally:
            pool.put(request)

    def metrics(self) -> list[dict[str, Any]]:
        # Seldon asks after every call (health checks too): report each prediction's metrics once.
        pending, self._local.pending = getattr(self._local, "pending", []), []
        return pending

    def health_status(self) -> dict[str, Any]:
        if self._compiled is None:
            raise RuntimeError(f"model in {self.model_dir} is not loaded")
        return {
            "model_dir": self.model_dir,
            "classes": self._manifest["classes"],
            "feature_names": self._manifest["feature_names"],
        }

    def send_feedback(
        self, features: Any, feature_names: Any, reward: float, truth: Any, routing: int | None = None
    ) -> list:
        """Count the feedback rows this model predicts correctly, as Seldon custom metrics.

        Seldon passes the request's features and the truth, not the answer that was given: the model
        predicts the rows again (the same IR gives the same classes), so the count holds whichever
        predictor the feedback reaches. Seldon's own reward metrics skip reward 0, so they cannot
        count wrong answers. Feedback without features or truth counts nothing.
        """
        if truth is None or features is None or not np.size(features):
            return []
        probabilities = self._infer(features, feature_names)
        labels = label_rows(truth)
        if len(labels) != len(probabilities):
            raise _bad_input(f"{len(labels)} truth labels for {len(probabilities)} rows of features")
        classes = self.class_names()
        correct = sum(
            label_value(predicted_class(row, classes)) == label_value(label)
            for row, label in zip(probabilities, labels, strict=True)
        )
        self._local.pending = [
            {"type": "COUNTER", "key": FEEDBACK_METRIC, "value": correct, "tags": {"outcome": "correct"}},
            {
                "type": "COUNTER",
                "key": FEEDBACK_METRIC,
                "value": len(labels) - correct,
                "tags": {"outcome": "incorrect"},
            },
        ]
        return []


def _serve_on_loopback() -> None:
    """Run Seldon's microservice with its servers bound to 127.0.0.1 (Seldon hard-codes 0.0.0.0)."""
    from seldon_core import gunicorn_utils, microservice

    load_config = gunicorn_utils.StandaloneApplication.load_config

    def load_loopback_config(app: Any) -> None:
        app.options["bind"] = app.options["bind"].replace("0.0.0.0:", "127.0.0.1:")
        load_config(app)

    gunicorn_utils.StandaloneApplication.load_config = load_loopback_config
    microservice.main()


if __name__ == "__main__":
    _serve_on_loopback()
