"""The OpenVINO IR artefact in one place: its manifest (format, SHA-256 of each file, feature names,
classes, precision), fetching and verifying it, compiling it as served, and inferring rows.

The model folder holds ``model.xml``, ``model.bin`` and ``manifest.json``: ``{"format": "openvino-ir",
"files": {name: sha256}, "feature_names": [...], "classes": [...], "precision": "fp32"}``, and the
model's input encoding (``"encoding"``, ``airloop.encoding``) when its features are categorical or may
be missing: the rows a client sends, in ``feature_names`` order, go through it before the IR
(``ir_rows``). A conversion stores it as the run's ``openvino/`` artefacts (``IR_PATH``). Nothing
compiles an IR unless every listed file matches its checksum, checked once per load: by ``fetch_ir``
(which hands the verified manifest on) or by the model server's ``load()``."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from airloop.encoding import encode
from airloop.tracking.artifacts import download
from airloop.tracking.session import mlflow_step

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "openvino-ir"
IR_FILES = ("model.xml", "model.bin")
# Where a conversion stores the selected IR in its run: ``runs:/<run_id>/openvino``.
IR_PATH = "openvino"
# Run tags of a conversion that stored an IR: the served variant and its gate's figures
# (``<prefix>variant``, ``accuracy``, ``max_abs_diff``, ``label_agreement``); registration copies them
# to the model version.
TAG_PREFIX = "airloop.openvino."
VARIANT_TAG = f"{TAG_PREFIX}variant"


class FetchedIR(TypedDict):
    model_dir: str
    files: dict[str, str]
    manifest: dict[str, Any]


class ModelIntegrityError(RuntimeError):
    """The model folder does not match its manifest: a file is missing, altered or outside the folder."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_verified_manifest(model_dir: Path) -> dict[str, Any]:
    """The manifest, after checking every file it lists against its SHA-256."""
    manifest_path = model_dir / MANIFEST
    if not manifest_path.is_file():
        raise ModelIntegrityError(f"{manifest_path} is missing: refusing to load an unverified model")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ModelIntegrityError(
            f"{manifest_path}: format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}"
        )
    files = manifest.get("files") or {}
    if "model.xml" not in files:
        raise ModelIntegrityError(f"{manifest_path} does not list model.xml")
    root = model_dir.resolve()
    for name, expected in files.items():
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            raise ModelIntegrityError(f"{manifest_path} lists {name!r}, which is outside {root}")
        if not path.is_file():
            raise ModelIntegrityError(f"model file {name!r} listed in {manifest_path} is missing")
        actual = file_sha256(path)
        if actual != expected:
            raise ModelIntegrityError(
                f"checksum mismatch for model file {name!r} in {root}: manifest says {expected}, "
                f"file has {actual}"
            )
    for key in ("feature_names", "classes"):
        if not isinstance(manifest.get(key), list) or not manifest[key]:
            raise ModelIntegrityError(f"{manifest_path}: {key!r} must be a non-empty list")
    encoding = manifest.get("encoding")
    if encoding is not None and (
        not isinstance(encoding, dict)
        or not isinstance(encoding.get("inputs"), list)
        or not {i.get("column") for i in encoding["inputs"]} <= set(manifest["feature_names"])
    ):
        raise ModelIntegrityError(f"{manifest_path}: 'encoding' must list inputs of the model's features")
    return manifest


def input_names(manifest: dict[str, Any]) -> list[str]:
    """The feature of each of the IR's input columns: one per encoded input, or the features."""
    encoding = manifest.get("encoding")
    return [str(i["column"]) for i in encoding["inputs"]] if encoding else list(manifest["feature_names"])


def ir_rows(manifest: dict[str, Any], rows: Any) -> np.ndarray:
    """Rows of the manifest's features, in its order, as the IR's float32 rows: through the model's
    encoding when it has one (strings and missing values allowed), else as numbers. ValueError
    (TypeError for rows that are no table) names what the model cannot take."""
    encoding = manifest.get("encoding")
    if encoding:
        return encode(encoding, manifest["feature_names"], rows)
    try:
        return np.asarray(rows, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"features must be numbers: {exc}") from None


def table_rows(manifest: dict[str, Any], frame: Any) -> np.ndarray:
    """``ir_rows`` of a DataFrame's columns of the model's features."""
    columns = frame[manifest["feature_names"]]
    return ir_rows(manifest, columns.to_numpy(dtype=object if manifest.get("encoding") else np.float32))


def compile_ir(core: Any, model: Any, precision_hint: str = "f32") -> tuple[Any, Any]:
    """The IR ``model`` (input ``[?, n]``) compiled on CPU twice: for one row, and for batches.

    The one-row copy has a static input shape ``[1, n]``: OpenVINO then skips a dynamic graph's
    per-call shape work, which costs more than a small model's inference. It runs on one thread or on
    every core, whichever answers a row sooner on this machine (``fastest``): a small model's row costs
    less than handing work to a second thread (the reference MLP on 2 cores: 22 us on one thread, 34 us
    on two), a wide one's is split profitably. The batch copy runs one stream over every core
    (``LATENCY``): on 2 cores one request scores a large batch as fast as ``THROUGHPUT``'s streams do
    (docs/openvino.md). f32 keeps the served outputs those that the parity gate checked.
    """
    config = {"INFERENCE_PRECISION_HINT": precision_hint, "PERFORMANCE_HINT": "LATENCY"}
    one_row, shape = model.clone(), model.input(0).get_partial_shape()
    shape[0] = 1
    one_row.reshape(shape)
    every_core = core.compile_model(one_row, "CPU", config)
    candidates = [every_core]
    if int(every_core.get_property("INFERENCE_NUM_THREADS")) > 1:
        candidates.append(core.compile_model(one_row, "CPU", {**config, "INFERENCE_NUM_THREADS": 1}))
    return fastest(candidates), core.compile_model(model, "CPU", config)


def fastest(candidates: Sequence[Any], calls: int = 30, budget_s: float = 0.25) -> Any:
    """The compiled model (static input shape) that infers a row of zeros soonest: median of up to
    ``calls`` calls each, taking turns, within about ``budget_s`` seconds but at least 3 calls each."""
    if len(candidates) == 1:
        return candidates[0]
    requests = [compiled.create_infer_request() for compiled in candidates]
    rows = [np.zeros(compiled.input(0).get_shape(), dtype=np.float32) for compiled in candidates]
    times: list[list[float]] = [[] for _ in candidates]
    for request, row in zip(requests, rows, strict=True):  # warm-up: the first call allocates buffers
        infer_rows(request, row)
    start = time.perf_counter()
    for turn in range(calls):
        if turn >= 3 and time.perf_counter() - start > budget_s:
            break
        for request, row, seconds in zip(requests, rows, times, strict=True):
            began = time.perf_counter()
            infer_rows(request, row)
            seconds.append(time.perf_counter() - began)
    medians = [float(np.median(seconds)) for seconds in times]
    return candidates[medians.index(min(medians))]


def infer_rows(request: Any, rows: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """The first output of the infer ``request`` for float32 ``rows``, as a new array of ``dtype``.

    The rows are copied into the request's own input tensor, which keeps its buffer while the batch
    size stays: ``request.infer({0: rows})`` wraps every call in dicts, a new input tensor and an
    output copy, and costs more than a small model's whole inference.
    """
    tensor = request.get_input_tensor()
    buffer = tensor.data  # its numpy shape: reading tensor.shape element by element costs ~20 us
    if buffer.shape != rows.shape:
        tensor.shape = rows.shape
        buffer = tensor.data
    buffer[...] = rows
    request.infer()
    return np.array(request.get_output_tensor().data, dtype=dtype)


def ir_predictor(xml_path: str, dtype: Any = np.float32) -> Callable[[np.ndarray], np.ndarray]:
    """Probabilities (as ``dtype``) from the IR at ``xml_path``, compiled and called as the model server
    does: one reused infer request of the one-row copy for single rows, one of the batch copy for batches.
    It checks no manifest: verify the folder first (``fetch_ir``, ``verify_ir``)."""
    import openvino

    core = openvino.Core()
    one_row, batch = (
        compiled.create_infer_request() for compiled in compile_ir(core, core.read_model(xml_path))
    )
    return lambda rows: infer_rows(one_row if len(rows) == 1 else batch, rows, dtype)


def write_manifest(
    ir_dir: str,
    precision: str,
    feature_names: list[str],
    classes: list[Any],
    encoding: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json`` for the IR files in ``ir_dir``; returns the manifest."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "files": {name: file_sha256(Path(ir_dir) / name) for name in IR_FILES},
        "feature_names": feature_names,
        "classes": classes,
        "precision": precision,
        **({"encoding": encoding} if encoding else {}),
    }
    with open(os.path.join(ir_dir, MANIFEST), "w") as handle:
        json.dump(manifest, handle, indent=2)
    return manifest


@mlflow_step
def fetch_ir(request: dict[str, Any]) -> FetchedIR:
    """Download an IR folder and verify it against its manifest.

    Request ``{"tracking_uri", "ir_uri", "dst_dir"}`` -> ``{"model_dir", "files", "manifest"}`` (the
    verified manifest); a missing or altered file raises ``ModelIntegrityError`` naming it.
    """
    for key in ("tracking_uri", "ir_uri", "dst_dir"):
        if not request.get(key):
            raise ValueError(f"request is missing {key!r}")
    os.makedirs(request["dst_dir"], exist_ok=True)
    model_dir = download(request["tracking_uri"], request["ir_uri"], request["dst_dir"])
    manifest = read_verified_manifest(Path(model_dir))
    return {"model_dir": model_dir, "files": manifest["files"], "manifest": manifest}


def verify_ir(model_dir: str) -> dict[str, str]:
    """Check every file of ``model_dir/manifest.json`` against its SHA-256; returns the manifest's files."""
    return read_verified_manifest(Path(model_dir))["files"]
