"""The selected OpenVINO variant against the native scikit-learn model and ONNX Runtime.

For two models, a 4-layer 1024-wide MLP (trained briefly on synthetic data) and the reference loop's
tiny MLP, runs the conversion step's own optimisation (fp32 / fp16 / int8 within a 1-point accuracy
budget, then the fastest) and prints, side by side from one run: p50 / p99 latency at batch 1,
rows/s at batch 1024, and the selected variant's ratios against both peers (> 1 favours OpenVINO).

    python benchmarks/openvino_speed.py [--calls 300] [--objective throughput|latency]

Targets (issue 5): at batch 1024 the selected variant is >= 3x the native model and >= 2x ONNX
Runtime; at batch 1 it is no slower than the fastest peer. Tiny models are expected to miss them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

os.environ.setdefault("CI", "true")  # OpenVINO telemetry off
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pandas as pd  # noqa: E402
from sklearn.datasets import make_classification  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402

from airloop.steps import optimise  # noqa: E402
from airloop.steps.convert import export_onnx  # noqa: E402
from airloop.steps.data import FEATURES, generate  # noqa: E402


Case = tuple[MLPClassifier, pd.DataFrame, pd.DataFrame, pd.Series]  # model, train rows, holdout, labels


def wide_mlp() -> Case:
    x, y = make_classification(n_samples=4000, n_features=32, n_informative=16, random_state=0)
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(32)])
    model = MLPClassifier(hidden_layer_sizes=(1024,) * 4, max_iter=4, random_state=0)
    return model.fit(frame[:3000], y[:3000]), frame[:3000], frame[3000:], pd.Series(y[3000:])


def reference_mlp() -> Case:
    frame = generate(4000, seed=0)
    train, holdout = frame[:3000], frame[3000:]
    model = MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=300, random_state=0)
    return model.fit(train[FEATURES], train["label"]), train[FEATURES], holdout[FEATURES], holdout["label"]


def run(name: str, model: MLPClassifier, train: pd.DataFrame, holdout: pd.DataFrame, target: pd.Series,
        args: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = os.path.join(tmp, "model.onnx")
        export_onnx(model, onnx_path)
        index = target.map({label: i for i, label in enumerate(model.classes_)}).to_numpy()
        report = optimise.optimise(
            model, onnx_path, holdout, index, tmp, calibration=train.to_numpy(dtype="float32")[:300],
            objective=args.objective, calls=args.calls,
        )
    print(f"\n== {name}: native accuracy {report['native_accuracy']:.4f}")
    print(f"{'runtime':<12}{'p50 ms b1':>12}{'p99 ms b1':>12}{'rows/s b1024':>15}{'acc drop pts':>14}")
    for runtime, numbers in report["benchmark"].items():
        drop = report["variants"].get(runtime, {}).get("accuracy_drop")
        print(f"{runtime:<12}{numbers['p50_ms']:>12.4f}{numbers['p99_ms']:>12.4f}"
              f"{numbers['rows_per_s']:>15,.0f}{'' if drop is None else f'{drop:.2f}':>14}")
    print(f"selected: {report['reason']}")
    if report["variant"] is None:
        return
    ratios = report["ratios"]
    for peer in (optimise.NATIVE, optimise.ONNX_RUNTIME):
        print(f"{report['variant']} vs {peer}: batch 1024 throughput {ratios[f'throughput_vs_{peer}']:.2f}x, "
              f"batch 1 latency {ratios[f'latency_vs_{peer}']:.2f}x")
    met = (ratios["throughput_vs_native"] >= 3 and ratios["throughput_vs_onnxruntime"] >= 2
           and min(ratios["latency_vs_native"], ratios["latency_vs_onnxruntime"]) >= 1)
    print(f"target (>=3x native, >=2x ONNX Runtime at batch 1024; no slower at batch 1): "
          f"{'met' if met else 'not met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="batch-1 calls per runtime")
    parser.add_argument("--objective", choices=sorted(optimise.OBJECTIVES), default="throughput")
    args = parser.parse_args()
    run("4-layer 1024-wide MLP", *wide_mlp(), args)
    run("reference tiny MLP (32, 16)", *reference_mlp(), args)


if __name__ == "__main__":
    main()
