"""OpenVINO variants of a converted model, the accuracy budget that decides which are kept, and a
side-by-side benchmark that picks the one to serve.

Variants, all from the same fp32 graph (an ONNX file or an IR that a conversion route wrote):
- ``fp32``: the reference IR; its agreement with the native model is the parity gate.
- ``fp16``: weights stored in FP16 (``save_model(compress_to_fp16=True)``), decompressed at load.
- ``int8``: NNCF post-training quantisation, calibrated on a sample of training rows. With the native
  model's labels for those rows, ``nncf.quantize_with_accuracy_control`` keeps the layers whose
  quantisation costs more than the budget in f32 (agreement with the native model is its metric).
- ``int8-weights``: weights stored in INT8 (``nncf.compress_weights``, symmetric, no calibration),
  computed in f32. A row reads a quarter of the fp32 weights: a wide model's batch-1 inference is
  bound by reading them, so it wins there, with no need for int8 instructions (``int8`` computes
  faster than f32 only on CPUs with VNNI or AMX).

Every variant is compiled and called as the model server compiles and calls it
(``airloop.openvino_ir.ir_predictor``), so the accuracy, the parity and the speed measured here are the
ones served. A variant is a candidate only when it passes its own parity gate against the native model
(max abs difference of probabilities within its tolerance, label agreement at least the minimum) and
its holdout accuracy is within ``budget`` points of the native model's: the variant that serves is
the one that was checked. The fastest candidate (by throughput at a large batch, or latency at batch 1)
is selected, and among candidates within ``TIE`` of the fastest, the one that is fastest at the other
batch size (a 5 % lead is noise on a shared machine; a 40 % one is not).
The benchmark also runs the native model and ONNX Runtime (when there is an ONNX graph), and says
plainly when OpenVINO loses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from airloop.onnx_runtime import onnx_runtime_predictor
from airloop.openvino_ir import ir_predictor

if TYPE_CHECKING:
    import pandas as pd

VARIANTS = ("fp32", "fp16", "int8", "int8-weights")
OBJECTIVES = {"throughput": "rows_per_s", "latency": "p50_ms"}
NATIVE, ONNX_RUNTIME = "native", "onnxruntime"
# Candidates this close to the best on the objective count as tied (see ``select``): rows/s at
# batch 1024 moves by 5-10 % between runs on a shared machine.
TIE = 0.10
# x86 instructions that make int8 inference faster than f32; without them ``int8`` runs at f32 speed.
INT8_INSTRUCTIONS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu() -> dict[str, Any]:
    """The CPU a benchmark runs on, which decides its numbers: OpenVINO's name for it, the cores this
    process may use, and which of ``INT8_INSTRUCTIONS`` it has (read from Linux's /proc/cpuinfo;
    ``None`` where that cannot be read)."""
    import openvino

    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
        found: list[str] | None = [name for name in INT8_INSTRUCTIONS if name in flags]
    except OSError:
        found = None
    return {
        "name": openvino.Core().get_property("CPU", "FULL_DEVICE_NAME"),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "int8_instructions": found,
    }


def write_variant(
    graph: str,
    variant: str,
    xml_path: str,
    calibration: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    max_drop: float = 0.01,
) -> str:
    """Write the IR ``variant`` of ``graph`` (ONNX or IR, input ``[N, n_features]``) at ``xml_path``.

    ``int8`` needs ``calibration`` rows; with the native model's ``labels`` for them it is quantised
    with accuracy control (``max_drop``: largest allowed drop of agreement, a fraction). Returns how
    the variant was made.
    """
    import openvino

    if variant not in VARIANTS:
        raise ValueError(f"unknown OpenVINO variant {variant!r}: choose from {list(VARIANTS)}")
    model = openvino.Core().read_model(graph)
    method = "fp16 weights" if variant == "fp16" else "fp32"
    if variant == "int8":
        if calibration is None or not len(calibration):
            raise ValueError("the int8 variant needs calibration rows")
        model, method = _quantize(model, np.asarray(calibration, dtype=np.float32), labels, max_drop)
    elif variant == "int8-weights":
        import nncf

        # Tree graphs (hummingbird-ml) hold their thresholds in Gather tables, which NNCF would take
        # for embeddings: compressing them moves splits, and NNCF fails on them anyway.
        if not any(op.get_type_name() in ("MatMul", "Convolution") for op in model.get_ops()):
            raise ValueError("int8-weights compresses MatMul and Convolution weights; this graph has none")
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM)
        method = "nncf.compress_weights INT8_SYM (int8 weights, f32 compute)"
    openvino.save_model(model, xml_path, compress_to_fp16=variant == "fp16")
    return method


def _quantize(model: Any, rows: np.ndarray, labels: np.ndarray | None, max_drop: float) -> tuple[Any, str]:
    import nncf

    # One row per calibration item: activation statistics are gathered per sample.
    calibration = nncf.Dataset(list(rows[:, None, :]))
    if labels is None:
        return nncf.quantize(model, calibration, subset_size=len(rows)), "nncf.quantize"
    validation = nncf.Dataset(list(zip(rows[:, None, :], labels, strict=True)), lambda item: item[0])

    def agreement(compiled: Any, items: Any) -> tuple[float, list[float]]:
        output = compiled.output(0)
        hits = [float(compiled(row)[output].argmax() == label) for row, label in items]
        return float(np.mean(hits)), hits

    quantised = nncf.quantize_with_accuracy_control(
        model, calibration, validation, agreement, max_drop=max_drop, subset_size=len(rows)
    )
    return quantised, (
        f"nncf.quantize_with_accuracy_control (max drop {max_drop:.4g} of agreement with "
        f"the native model on {len(rows)} calibration rows)"
    )


def tolerances(fp32: float, lossy: float) -> dict[str, float]:
    """Each variant's parity tolerance: ``fp32`` for the fp32 IR (the conversion itself must be exact),
    ``lossy`` for the variants that store or compute with fewer bits."""
    return {variant: fp32 if variant == "fp32" else lossy for variant in VARIANTS}


def parity(scores: dict[str, Any], tolerance: float, min_label_agreement: float) -> list[str]:
    """What fails the parity gate in a variant's ``agreement`` scores; empty when it passes."""
    failures = []
    diff = scores["max_abs_diff"]
    if diff is None:
        failures.append(f"max abs diff undefined ({scores['non_finite_rows']} rows NaN or inf)")
    elif diff > tolerance:
        failures.append(f"max abs diff {diff:.3g} > {tolerance:g}")
    if scores["label_agreement"] < min_label_agreement:
        failures.append(f"label agreement {scores['label_agreement']:.4f} < {min_label_agreement:g}")
    return failures


def agreement(proba: np.ndarray, reference: np.ndarray, target_index: np.ndarray) -> dict[str, Any]:
    """Accuracy of ``proba`` and how far it is from the native model's ``reference`` probabilities.

    A row with a NaN or infinite output counts as wrong; ``max_abs_diff`` is then ``None`` (JSON has
    no NaN) and ``non_finite_rows`` says how many there were.
    """
    finite = np.isfinite(proba).all(axis=1)
    labels = np.where(finite, proba.argmax(axis=1), -1)
    return {
        "accuracy": float((labels == target_index).mean()),
        "max_abs_diff": float(np.abs(proba - reference).max()) if finite.all() else None,
        "label_agreement": float((labels == reference.argmax(axis=1)).mean()),
        "non_finite_rows": int((~finite).sum()),
    }


def benchmark(
    predictors: dict[str, Callable[[Any], Any]],
    single_rows: dict[str, Sequence[Any]],
    batch: dict[str, Any],
    batch_rows: int,
    calls: int = 200,
    batch_calls: int = 5,
    rounds: int = 5,
    batch_seconds: float = 0.1,
) -> dict[str, dict[str, float]]:
    """Latency p50/p99 (ms) at batch 1 and throughput (rows/s) at ``batch_rows`` for each predictor.

    Predictors run on the same inputs, given per predictor name (a native model takes a DataFrame,
    the others float32 arrays). They take turns, ``rounds`` times, each turn a share of the ``calls``
    one-row calls and of the large batches (at least ``batch_calls`` and ``batch_seconds`` in all): on
    a shared machine a burst of load then falls on every runtime alike instead of on whichever ran
    during it. Throughput is the median of the turns' rates.
    """
    for name, predict in predictors.items():
        for row in single_rows[name][:10]:  # warm-up: first calls allocate buffers
            predict(row)
        predict(batch[name])
    latencies: dict[str, list[float]] = {name: [] for name in predictors}
    rates: dict[str, list[float]] = {name: [] for name in predictors}
    turn_calls = -(-calls // rounds)
    for turn in range(rounds):
        for name, predict in predictors.items():
            rows, large = single_rows[name], batch[name]
            for i in range(turn * turn_calls, min(calls, (turn + 1) * turn_calls)):
                row = rows[i % len(rows)]
                start = time.perf_counter()
                predict(row)
                latencies[name].append(time.perf_counter() - start)
            # Calls and seconds both: a tiny model's batch takes microseconds, a large one's 0.1 s.
            done, start = 0, time.perf_counter()
            while done * rounds < batch_calls or (time.perf_counter() - start) * rounds < batch_seconds:
                predict(large)
                done += 1
            rates[name].append(batch_rows * done / (time.perf_counter() - start))
    return {
        name: {
            "p50_ms": float(np.percentile(latencies[name], 50) * 1e3),
            "p99_ms": float(np.percentile(latencies[name], 99) * 1e3),
            "rows_per_s": float(np.median(rates[name])),
        }
        for name in predictors
    }


def select(
    variants: dict[str, dict[str, Any]], speed: dict[str, dict[str, float]], budget: float, objective: str
) -> tuple[str | None, str]:
    """The fastest variant that passes its parity gate within the accuracy budget, and why; ``None``
    when there is none.

    Variants within ``TIE`` of the fastest on the ``objective`` are tied: of those, the one fastest
    on the other measure (latency at batch 1 for throughput, and the reverse) is selected.
    """
    key = OBJECTIVES[objective]
    other = next(value for value in OBJECTIVES.values() if value != key)

    def why_not(scores: dict[str, Any]) -> str | None:
        if "error" in scores:
            return f"not built: {scores['error']}"
        failures = [] if scores["within_budget"] else [f"accuracy drop {scores['accuracy_drop']:.2f} points"]
        if scores["parity_failures"]:
            failures.append(f"parity: {', '.join(scores['parity_failures'])}")
        return "; ".join(failures) or None

    reasons = {name: why_not(scores) for name, scores in variants.items()}
    kept = [name for name, reason in reasons.items() if reason is None]
    dropped = [f"{name} ({reason})" for name, reason in reasons.items() if reason is not None]
    if not kept:
        gate = (
            "passes its parity gate within"
            if any(s.get("parity_failures") for s in variants.values())
            else "meets"
        )
        return None, f"no OpenVINO variant {gate} the {budget:g}-point accuracy budget: {', '.join(dropped)}"

    def score(name: str, measure: str) -> float:  # higher is better: rows/s, or minus p50 ms
        return -speed[name][measure] if measure == "p50_ms" else speed[name][measure]

    leader = max(kept, key=lambda name: score(name, key))
    margin = TIE * speed[leader][key]
    tied = [name for name in kept if score(name, key) >= score(leader, key) - margin]
    best = max(tied, key=lambda name: score(name, other))
    unit = "rows/s at the large batch" if key == "rows_per_s" else "p50 ms at batch 1"
    ranking = ", ".join(f"{name} {speed[name][key]:.4g}" for name in kept)
    reason = f"{best}: best {objective} within the {budget:g}-point accuracy budget ({unit}: {ranking})"
    if len(tied) > 1:
        other_unit = "p50 ms at batch 1" if key == "rows_per_s" else "rows/s at the large batch"
        reason += (
            f"; {', '.join(tied)} within {TIE:.0%} of the best, so the fastest of them at the other "
            f"batch size ({other_unit}: {', '.join(f'{name} {speed[name][other]:.4g}' for name in tied)})"
        )
    if dropped:
        reason += f"; not candidates: {', '.join(dropped)}"
    return best, reason


def verdict(selected: str, speed: dict[str, dict[str, float]]) -> tuple[dict[str, float], str]:
    """Speed ratios of the selected variant against the native model and ONNX Runtime (when it ran),
    in words too.

    Ratios above 1 favour OpenVINO: throughput ratio = ours / theirs, latency ratio = theirs / ours.
    """
    ours = speed[selected]
    ratios = {}
    for peer in (name for name in (NATIVE, ONNX_RUNTIME) if name in speed):
        ratios[f"throughput_vs_{peer}"] = ours["rows_per_s"] / speed[peer]["rows_per_s"]
        ratios[f"latency_vs_{peer}"] = speed[peer]["p50_ms"] / ours["p50_ms"]
    losses = [name for name, ratio in ratios.items() if ratio < 1]
    if not losses:
        return ratios, f"OpenVINO {selected} is faster than every peer at both batch sizes"
    detail = ", ".join(f"{name.replace('_', ' ')} {ratios[name]:.2f}x" for name in losses)
    return ratios, (
        f"OpenVINO {selected} does not win everywhere for this model: {detail} "
        "(ratios < 1 mean the peer is faster)"
    )


def _after(
    encode: Callable[[np.ndarray], np.ndarray], run: Callable[[np.ndarray], np.ndarray]
) -> Callable[[np.ndarray], np.ndarray]:
    return lambda batch: run(encode(batch))


def optimise(
    native: Callable[[Any], np.ndarray],
    graph: str,
    features: pd.DataFrame,
    target_index: np.ndarray,
    work_dir: str,
    *,
    native_input: str = "frame",
    encode: Callable[[np.ndarray], np.ndarray] | None = None,
    onnx_path: str | None = None,
    variants: Sequence[str] = VARIANTS,
    tolerance: Mapping[str, float],
    min_label_agreement: float,
    calibration: pd.DataFrame | None = None,
    budget: float = 1.0,
    objective: str = "throughput",
    calls: int = 200,
    batch_rows: int = 1024,
    batch_seconds: float = 0.1,
) -> dict[str, Any]:
    """Build, score and benchmark the variants of ``graph``; select one.

    ``native`` returns the native model's class scores for a DataFrame of ``features``' columns
    (``native_input="frame"``) or a float32 array (``"array"``); ``onnx_path`` is the graph ONNX
    Runtime runs next to it. ``encode`` is the model's input encoding (``airloop.encoding``: raw rows,
    an object array, -> the graph's float32 rows): the native model then takes the raw table as it is,
    and the graphs take what ``encode`` makes of it, timed with it, as a server runs it. ``calibration``
    holds rows of ``features``' columns (int8's). The fp32 variant is always built (the conversion's
    own parity check); a variant that cannot be built is reported with the error and never selected.
    Each variant's parity gate takes its ``tolerance`` (``{variant: max abs diff}``, see
    ``tolerances``) and ``min_label_agreement``. Each variant's IR is written to
    ``work_dir/<variant>/model.xml``. Returns ``{"native_accuracy", "variants": {name: {"accuracy",
    "accuracy_drop", "max_abs_diff", "label_agreement", "non_finite_rows", "tolerance",
    "parity_failures", "within_budget", "size_bytes", "method"} or {"error", "within_budget"}},
    "benchmark": {name: {"p50_ms", "p99_ms", "rows_per_s"}}, "variant", "reason", "ratios", "cpu"}``.
    """
    import pandas as pd

    kind = object if encode else np.float32

    def served(raw: np.ndarray) -> np.ndarray:
        """The rows a graph takes: encoded, or as they come."""
        return raw if encode is None else encode(raw)

    def as_input(frame: pd.DataFrame, index: Any = slice(None)) -> Any:
        """The native model's input: the raw table when it encodes its own, else the graph's rows."""
        if encode is not None:
            return frame.iloc[index]
        array = frame.to_numpy(dtype=np.float32)[index]
        return pd.DataFrame(array, columns=frame.columns) if native_input == "frame" else array

    raw = features.to_numpy(dtype=kind)
    rows = served(raw)
    reference = np.asarray(native(as_input(features)), dtype=np.float32)
    native_accuracy = float((reference.argmax(axis=1) == target_index).mean())
    labels = calibration_rows = None
    if calibration is not None and len(calibration):
        calibration_rows = served(calibration.to_numpy(dtype=kind))
        labels = np.asarray(native(as_input(calibration))).argmax(axis=1)
    scores: dict[str, dict[str, Any]] = {}
    paths: dict[str, str] = {}
    for variant in dict.fromkeys(["fp32", *variants]):
        path = os.path.join(work_dir, variant, "model.xml")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            method = write_variant(graph, variant, path, calibration_rows, labels, max_drop=budget / 100)
        except Exception as exc:  # NNCF or OpenVINO refusing this graph: one candidate fewer, said why
            if variant == "fp32":
                raise
            scores[variant] = {"error": f"{type(exc).__name__}: {exc}"[:300], "within_budget": False}
            continue
        paths[variant] = path
        scores[variant] = agreement(ir_predictor(path)(rows), reference, target_index)
        drop = (native_accuracy - scores[variant]["accuracy"]) * 100
        scores[variant].update(
            accuracy_drop=drop,
            tolerance=tolerance[variant],
            parity_failures=parity(scores[variant], tolerance[variant], min_label_agreement),
            within_budget=drop <= budget + 1e-9,
            size_bytes=os.path.getsize(path.removesuffix(".xml") + ".bin"),
            method=method,
        )

    graphs = {ONNX_RUNTIME: onnx_runtime_predictor(onnx_path)} if onnx_path is not None else {}
    graphs.update({variant: ir_predictor(paths[variant]) for variant in variants if variant in paths})
    if encode is not None:  # timed with the encoding, as served
        graphs = {name: _after(encode, run) for name, run in graphs.items()}
    predictors = {NATIVE: native, **graphs}
    large = np.resize(np.arange(len(raw)), batch_rows)
    singles = range(min(len(raw), 50))
    # The native model takes its own input kind, the others the rows a server gets.
    speed = benchmark(
        predictors,
        {
            name: [as_input(features, [i]) if name == NATIVE else raw[i : i + 1] for i in singles]
            for name in predictors
        },
        {name: as_input(features, large) if name == NATIVE else raw[large] for name in predictors},
        batch_rows,
        calls=calls,
        batch_seconds=batch_seconds,
    )
    selected, reason = select({v: scores[v] for v in variants}, speed, budget, objective)
    ratios: dict[str, float] = {}
    if selected is not None:
        ratios, summary = verdict(selected, speed)
        reason = f"{reason}. {summary}"
    return {
        "native_accuracy": native_accuracy,
        "variants": scores,
        "benchmark": speed,
        "variant": selected,
        "reason": reason,
        "ratios": ratios,
        "cpu": cpu(),
    }
