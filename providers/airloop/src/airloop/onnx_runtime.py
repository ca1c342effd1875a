"""ONNX Runtime as a predictor: the peer a conversion benchmarks OpenVINO against, and the native
framework of an ONNX model."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def onnx_runtime_predictor(onnx_path: str) -> Callable[[np.ndarray], np.ndarray]:
    """The ``probabilities`` output (else the first) of the ONNX graph, through ONNX Runtime."""
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outputs = [output.name for output in session.get_outputs()]
    wanted = ["probabilities"] if "probabilities" in outputs else outputs[:1]
    return lambda rows: session.run(wanted, {name: rows})[0]
