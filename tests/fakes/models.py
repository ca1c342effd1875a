"""Small real models for the serving tests: an MLP classifier as an OpenVINO IR with its manifest,
like the conversion step writes, built in about a second."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

FEATURES = ["f0", "f1", "f2", "f3"]


def truth(rows: np.ndarray) -> np.ndarray:
    """The label the models learn: whether f0 + f1 is positive."""
    return (rows[:, 0] + rows[:, 1] > 0).astype(int)


def build_ir(folder: Path, seed: int, sloppy: bool = False) -> Path:
    """A small MLP classifier of ``FEATURES`` as an OpenVINO IR in ``folder`` (created) with its manifest.

    ``sloppy`` learns a cruder rule (f0 alone, about 75 % accurate): a worse model, for comparisons.
    """
    import onnx
    import onnx.utils
    import openvino as ov
    import skl2onnx
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(400, len(FEATURES))).astype(np.float32)
    y = (X[:, 0] > 0).astype(int) if sloppy else truth(X)
    estimator = MLPClassifier(hidden_layer_sizes=(8,), max_iter=200, random_state=seed).fit(X, y)
    folder.mkdir(parents=True)
    full, core = folder / "full.onnx", folder / "core.onnx"
    onnx.save(skl2onnx.to_onnx(estimator, X[:1], options={id(estimator): {"zipmap": False}}), full)
    # Keep the plain-tensor graph up to the probabilities: OpenVINO cannot convert ai.onnx.ml operators.
    onnx.utils.extract_model(str(full), str(core), ["X"], ["probabilities"])
    ov.save_model(ov.convert_model(str(core)), str(folder / "model.xml"), compress_to_fp16=False)
    full.unlink()
    core.unlink()
    files = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in ("model.xml", "model.bin")}
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "format": "openvino-ir",
                "files": files,
                "feature_names": FEATURES,
                "classes": [0, 1],
                "precision": "fp32",
            }
        )
    )
    return folder
