"""OpenVINO variants of a converted model, the accuracy budget that decides which are kept, and a
side-by-side benchmark that picks the one to serve.

Variants, all from the same probabilities-only ONNX graph:
- ``fp32``: the reference IR; its agreement with the native model is the parity gate.
- ``fp16``: weights stored in FP16 (``save_model(compress_to_fp16=True)``), decompressed at load.
- ``int8``: NNCF post-training quantisation, calibrated on a sample of training rows.

Every variant is compiled as the model server compiles it (``INFERENCE_PRECISION_HINT=f32``), so
the accuracy and the speed measured here are the ones served. A variant is a candidate only when
its holdout accuracy is within ``budget`` points of the native model's; the fastest candidate (by
throughput at a large batch, or latency at batch 1) is selected. The benchmark also runs the native
scikit-learn model and ONNX Runtime on the same ONNX graph, and says plainly when OpenVINO loses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

VARIANTS = ("fp32", "fp16", "int8")
OBJECTIVES = {"throughput": "rows_per_s", "latency": "p50_ms"}
NATIVE, ONNX_RUNTIME = "native", "onnxruntime"
# The model server's compile setting: this CPU would otherwise run bf16 and blur the parity check.
COMPILE_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


def write_variant(onnx_path: str, n_features: int, variant: str, xml_path: str,
                  calibration: np.ndarray | None = None) -> None:
    """Convert ``onnx_path`` to the IR ``variant`` at ``xml_path`` (``int8`` needs ``calibration`` rows)."""
    import openvino

    model = openvino.convert_model(onnx_path, input=[("input", [-1, n_features])])
    if variant == "int8":
        import nncf

        if calibration is None or not len(calibration):
            raise ValueError("the int8 variant needs calibration rows")
        rows = np.asarray(calibration, dtype=np.float32)
        # One row per calibration item: activation statistics are gathered per sample.
        model = nncf.quantize(model, nncf.Dataset(list(rows[:, None, :])), subset_size=len(rows))
    elif variant not in VARIANTS:
        raise ValueError(f"unknown OpenVINO variant {variant!r}: choose from {list(VARIANTS)}")
    openvino.save_model(model, xml_path, compress_to_fp16=variant == "fp16")


def openvino_predictor(xml_path: str) -> Callable[[np.ndarray], np.ndarray]:
    """Probabilities from the IR at ``xml_path``, through one reused infer request (as served)."""
    import openvino

    compiled = openvino.Core().compile_model(xml_path, "CPU", COMPILE_CONFIG)
    request, output = compiled.create_infer_request(), compiled.output(0)
    return lambda rows: request.infer({0: rows})[output]


def onnx_runtime_predictor(onnx_path: str) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    return lambda rows: session.run(None, {"input": rows})[0]


def agreement(proba: np.ndarray, reference: np.ndarray, target_index: np.ndarray) -> dict[str, float]:
    """Accuracy of ``proba`` and how far it is from the native model's ``reference`` probabilities."""
    return {
        "accuracy": float((proba.argmax(axis=1) == target_index).mean()),
        "max_abs_diff": float(np.abs(proba - reference).max()),
        "label_agreement": float((proba.argmax(axis=1) == reference.argmax(axis=1)).mean()),
    }


def benchmark(predictors: dict[str, Callable[[Any], Any]], single_rows: dict[str, Sequence[Any]],
              batch: dict[str, Any], batch_rows: int, calls: int = 200,
              batch_calls: int = 5) -> dict[str, dict[str, float]]:
    """Latency p50/p99 (ms) at batch 1 and throughput (rows/s) at ``batch_rows`` for each predictor.

    Predictors run one after another on the same inputs; ``single_rows`` and ``batch`` are given
    per predictor name (a native model takes a DataFrame, the others float32 arrays).
    """
    results = {}
    for name, predict in predictors.items():
        rows, large = single_rows[name], batch[name]
        for row in rows[:10]:  # warm-up: first calls allocate buffers
            predict(row)
        latencies = np.empty(calls)
        for i in range(calls):
            row = rows[i % len(rows)]
            start = time.perf_counter()
            predict(row)
            latencies[i] = time.perf_counter() - start
        predict(large)
        # At least ``batch_calls`` calls and 0.1 s: a tiny model's batch takes microseconds.
        done, start = 0, time.perf_counter()
        while done < batch_calls or time.perf_counter() - start < 0.1:
            predict(large)
            done += 1
        elapsed = time.perf_counter() - start
        results[name] = {
            "p50_ms": float(np.percentile(latencies, 50) * 1e3),
            "p99_ms": float(np.percentile(latencies, 99) * 1e3),
            "rows_per_s": float(batch_rows * done / elapsed),
        }
    return results


def select(variants: dict[str, dict[str, Any]], speed: dict[str, dict[str, float]], budget: float,
           objective: str) -> tuple[str | None, str]:
    """The fastest variant within the accuracy budget, and why; ``None`` when none is within it."""
    key = OBJECTIVES[objective]
    kept = [name for name, scores in variants.items() if scores["within_budget"]]
    dropped = [f"{name} (accuracy drop {scores['accuracy_drop']:.2f} points)"
               for name, scores in variants.items() if not scores["within_budget"]]
    if not kept:
        return None, f"no OpenVINO variant meets the {budget:g}-point accuracy budget: {', '.join(dropped)}"
    # Higher rows/s is better, lower p50 is better.
    best = max(kept, key=lambda name: -speed[name][key] if key == "p50_ms" else speed[name][key])
    unit = "rows/s at the large batch" if key == "rows_per_s" else "p50 ms at batch 1"
    ranking = ", ".join(f"{name} {speed[name][key]:.4g}" for name in kept)
    reason = f"{best}: best {objective} within the {budget:g}-point accuracy budget ({unit}: {ranking})"
    if dropped:
        reason += f"; over budget: {', '.join(dropped)}"
    return best, reason


def verdict(selected: str, speed: dict[str, dict[str, float]]) -> tuple[dict[str, float], str]:
    """Speed ratios of the selected variant against the native model and ONNX Runtime, in words too.

    Ratios above 1 favour OpenVINO: throughput ratio = ours / theirs, latency ratio = theirs / ours.
    """
    ours = speed[selected]
    ratios = {}
    for peer in (NATIVE, ONNX_RUNTIME):
        ratios[f"throughput_vs_{peer}"] = ours["rows_per_s"] / speed[peer]["rows_per_s"]
        ratios[f"latency_vs_{peer}"] = speed[peer]["p50_ms"] / ours["p50_ms"]
    losses = [name for name, ratio in ratios.items() if ratio < 1]
    if not losses:
        return ratios, f"OpenVINO {selected} is faster than both peers at both batch sizes"
    detail = ", ".join(f"{name.replace('_', ' ')} {ratios[name]:.2f}x" for name in losses)
    return ratios, (f"OpenVINO {selected} does not win everywhere for this model: {detail} "
                    "(ratios < 1 mean the peer is faster)")


def optimise(estimator: Any, onnx_path: str, features: pd.DataFrame, target_index: np.ndarray,
             work_dir: str, *, variants: Sequence[str] = VARIANTS, calibration: np.ndarray | None = None,
             budget: float = 1.0, objective: str = "throughput", calls: int = 200,
             batch_rows: int = 1024) -> dict[str, Any]:
    """Build, score and benchmark the variants of ``onnx_path``; select one.

    The fp32 variant is always built (it is the parity reference). Each variant's IR is written to
    ``work_dir/<variant>/model.xml``. Returns ``{"native_accuracy", "variants": {name: {"accuracy",
    "accuracy_drop", "max_abs_diff", "label_agreement", "within_budget", "size_bytes"}}, "benchmark":
    {name: {"p50_ms", "p99_ms", "rows_per_s"}}, "variant", "reason", "ratios"}``.
    """
    import pandas as pd

    rows = features.to_numpy(dtype=np.float32)
    native = estimator.predict_proba(features)
    native_accuracy = float((native.argmax(axis=1) == target_index).mean())
    scores, paths = {}, {}
    for variant in dict.fromkeys(["fp32", *variants]):
        paths[variant] = os.path.join(work_dir, variant, "model.xml")
        os.makedirs(os.path.dirname(paths[variant]), exist_ok=True)
        write_variant(onnx_path, rows.shape[1], variant, paths[variant], calibration)
        scores[variant] = agreement(openvino_predictor(paths[variant])(rows), native, target_index)
        drop = (native_accuracy - scores[variant]["accuracy"]) * 100
        scores[variant].update(accuracy_drop=drop, within_budget=drop <= budget + 1e-9,
                               size_bytes=os.path.getsize(paths[variant].removesuffix(".xml") + ".bin"))

    predictors = {NATIVE: estimator.predict_proba, ONNX_RUNTIME: onnx_runtime_predictor(onnx_path)}
    predictors.update({variant: openvino_predictor(paths[variant]) for variant in variants})
    large = pd.DataFrame(np.resize(rows, (batch_rows, rows.shape[1])), columns=features.columns)
    singles = range(min(len(rows), 50))
    # The native model takes a DataFrame (its fitted feature names), the others float32 arrays.
    speed = benchmark(
        predictors,
        {name: [features.iloc[[i]] for i in singles] if name == NATIVE else [rows[i : i + 1] for i in singles]
         for name in predictors},
        {name: large if name == NATIVE else large.to_numpy(dtype=np.float32) for name in predictors},
        batch_rows,
        calls=calls,
    )
    selected, reason = select({v: scores[v] for v in variants}, speed, budget, objective)
    ratios: dict[str, float] = {}
    if selected is not None:
        ratios, summary = verdict(selected, speed)
        reason = f"{reason}. {summary}"
    return {"native_accuracy": native_accuracy, "variants": scores, "benchmark": speed, "variant": selected,
            "reason": reason, "ratios": ratios}
