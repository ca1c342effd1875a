"""The selected OpenVINO variant against the native framework and ONNX Runtime.

For four models: a 4-layer 1024-wide MLP (trained briefly on synthetic data) in scikit-learn and the
same in PyTorch (a pt2 program: native is torch eager), the reference loop's tiny MLP and a random
forest (100 trees, depth 8) on the reference data. Each goes through the conversion step's own route
and optimisation (the variants within a 1-point accuracy budget, then the fastest) and the script
prints, side by side from one run: p50 / p99 latency at batch 1, rows/s at batch 1024, and the
selected variant's ratios against both peers (> 1 favours OpenVINO). The runtimes take turns (see
``optimise.benchmark``) and each case prints the load average before and after it: the numbers are
only comparable within a case. The PyTorch and forest cases need the torch runtime, so they run in
this script re-run by that interpreter. The first line names the CPU and whether it has int8
instructions (VNNI, AMX): without them int8 computes no faster than f32.

    python benchmarks/openvino_speed.py [--calls 300] [--batch-seconds 2] [--objective throughput|latency]
        [--cases ...]

Targets: at batch 1024 the selected variant is >= 3x the native model and >= 2x ONNX Runtime; at
batch 1 it is no slower than the fastest peer. Each is printed as met or NOT met, with its numbers;
tiny models are expected to miss them (OpenVINO's per-call cost outweighs their work).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("CI", "true")  # OpenVINO telemetry off
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.datasets import make_classification  # noqa: E402
from sklearn.ensemble import RandomForestClassifier  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402

from airloop.embedded.demo import FEATURES, generate  # noqa: E402
from airloop.steps.conversion import optimise  # noqa: E402
from airloop.steps.conversion.requests import ConvertRequest  # noqa: E402
from airloop.steps.conversion.routes import Source, load_source, sklearn_source  # noqa: E402

# A case: its conversion source (built in a work folder), training rows, holdout rows, class index.
Case = tuple[Callable[[str], Source], pd.DataFrame, pd.DataFrame, np.ndarray]


def sklearn_case(model: Any, train: pd.DataFrame, holdout: pd.DataFrame, target: pd.Series) -> Case:
    index = target.map({label: i for i, label in enumerate(model.classes_)}).to_numpy()
    return (lambda work_dir: sklearn_source(model, work_dir, holdout)), train, holdout, index


def wide_data() -> tuple[pd.DataFrame, np.ndarray]:
    x, y = make_classification(n_samples=4000, n_features=32, n_informative=16, random_state=0)
    return pd.DataFrame(x, columns=[f"x{i}" for i in range(32)]), y


def wide_mlp() -> Case:
    frame, y = wide_data()
    model = MLPClassifier(hidden_layer_sizes=(1024,) * 4, max_iter=4, random_state=0)
    model.fit(frame[:3000], y[:3000])
    return sklearn_case(model, frame[:3000], frame[3000:], pd.Series(y[3000:]))


def torch_mlp() -> Case:
    """The same data and shape as ``wide_mlp`` in PyTorch (native: torch eager), saved as a pt2 program."""
    import mlflow.pytorch
    import torch

    from airloop.torch_models import MLPClassifier as TorchMLP

    frame, y = wide_data()
    rows = torch.from_numpy(frame.to_numpy(np.float32)[:3000])
    torch.manual_seed(0)
    net = TorchMLP(32, 2, (1024,) * 4)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(4):  # epochs of 100-row batches, like the scikit-learn MLP's 4 iterations
        for batch in torch.randperm(3000).split(100):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(net(rows[batch]), torch.from_numpy(y[:3000])[batch]).backward()
            optimiser.step()
    model = torch.nn.Sequential(net, torch.nn.Softmax(dim=1)).eval()

    def source(work_dir: str) -> Source:
        # Saved next to, not in, the folder that the conversion downloads the model into.
        saved, loaded = Path(work_dir, "saved"), Path(work_dir, "loaded")
        example = frame.to_numpy(np.float32)[:5]
        mlflow.pytorch.save_model(model, saved, serialization_format="pt2", input_example=example)
        loaded.mkdir()
        return load_source(f"sqlite:///{work_dir}/mlflow.db", saved.as_uri(), str(loaded), frame[3000:])

    return source, frame[:3000], frame[3000:], y[3000:]


def reference_data() -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = generate(4000, seed=0)
    return frame[:3000], frame[3000:]


def reference_mlp() -> Case:
    train, holdout = reference_data()
    model = MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=300, random_state=0)
    model.fit(train[FEATURES], train["label"])
    return sklearn_case(model, train[FEATURES], holdout[FEATURES], holdout["label"])


def reference_forest() -> Case:
    train, holdout = reference_data()
    model = RandomForestClassifier(n_estimators=100, max_depth=8, random_state=0, n_jobs=1)
    model.fit(train[FEATURES], train["label"])
    return sklearn_case(model, train[FEATURES], holdout[FEATURES], holdout["label"])


# name -> (case, runtime); the torch runtime holds hummingbird-ml and torch.
CASES = {
    "wide-mlp": (wide_mlp, "worker"),
    "torch-mlp": (torch_mlp, "torch"),
    "tiny-mlp": (reference_mlp, "worker"),
    "forest": (reference_forest, "torch"),
}
TITLES = {
    "wide-mlp": "4-layer 1024-wide MLP (scikit-learn)",
    "torch-mlp": "4-layer 1024-wide MLP (PyTorch, pt2 program)",
    "tiny-mlp": "reference tiny MLP (32, 16)",
    "forest": "reference random forest (100 trees, depth 8), hummingbird-ml route",
}


def targets(report: dict[str, Any]) -> list[str]:
    """Each target of the selected variant, met or not, with the numbers that decide it."""
    speed = report["benchmark"]
    ours = speed[report["variant"]]
    lines = []
    for peer, floor in ((optimise.NATIVE, 3), (optimise.ONNX_RUNTIME, 2)):
        if peer not in speed:
            lines.append(f">= {floor}x {peer} rows/s at batch 1024: not measured ({peer} did not run)")
            continue
        ratio = ours["rows_per_s"] / speed[peer]["rows_per_s"]
        lines.append(
            f">= {floor}x {peer} rows/s at batch 1024: {'met' if ratio >= floor else 'NOT met'} "
            f"({ratio:.2f}x: {ours['rows_per_s']:,.0f} vs {speed[peer]['rows_per_s']:,.0f})"
        )
    peers = [peer for peer in (optimise.NATIVE, optimise.ONNX_RUNTIME) if peer in speed]
    fastest = min(peers, key=lambda peer: speed[peer]["p50_ms"])
    ratio = speed[fastest]["p50_ms"] / ours["p50_ms"]
    lines.append(
        f"batch 1 p50 no slower than the fastest peer ({fastest}): {'met' if ratio >= 1 else 'NOT met'} "
        f"({ratio:.2f}x: {ours['p50_ms']:.4f} vs {speed[fastest]['p50_ms']:.4f} ms)"
    )
    return lines


def load() -> str:
    return "/".join(f"{value:.2f}" for value in os.getloadavg())


def run(
    name: str,
    make_source: Callable[[str], Source],
    train: pd.DataFrame,
    holdout: pd.DataFrame,
    index: np.ndarray,
    args: Any,
) -> None:
    before = load()
    with tempfile.TemporaryDirectory() as tmp:
        source = make_source(tmp)
        report = optimise.optimise(
            source.native,
            source.graph,
            holdout,
            index,
            tmp,
            native_input=source.native_input,
            onnx_path=source.onnx_path,
            # The conversion's own parity gates: a variant that fails its gate is not selected.
            tolerance=optimise.tolerances(ConvertRequest.tolerance, ConvertRequest.variant_tolerance),
            min_label_agreement=ConvertRequest.min_label_agreement,
            calibration=train.iloc[:300],
            objective=args.objective,
            calls=args.calls,
            batch_seconds=args.batch_seconds,
        )
    print(f"\n== {name}: native accuracy {report['native_accuracy']:.4f} ({source.route} route)")
    print(f"load average (1/5/15 min) {before} before, {load()} after, on {os.cpu_count()} cores")
    print(f"{'runtime':<12}{'p50 ms b1':>12}{'p99 ms b1':>12}{'rows/s b1024':>15}{'acc drop pts':>14}")
    for runtime, numbers in report["benchmark"].items():
        drop = report["variants"].get(runtime, {}).get("accuracy_drop")
        print(
            f"{runtime:<12}{numbers['p50_ms']:>12.4f}{numbers['p99_ms']:>12.4f}"
            f"{numbers['rows_per_s']:>15,.0f}{'' if drop is None else f'{drop:.2f}':>14}"
        )
    print(f"selected: {report['reason']}")
    for note in source.notes:
        print(f"note: {note}")
    if report["variant"] is None:
        return
    ratios = report["ratios"]
    for peer in (peer for peer in (optimise.NATIVE, optimise.ONNX_RUNTIME) if peer in report["benchmark"]):
        print(
            f"{report['variant']} vs {peer}: batch 1024 throughput {ratios[f'throughput_vs_{peer}']:.2f}x, "
            f"batch 1 latency {ratios[f'latency_vs_{peer}']:.2f}x"
        )
    for line in targets(report):
        print(f"target {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="batch-1 calls per runtime")
    parser.add_argument("--batch-seconds", type=float, default=2.0, help="batch-1024 time per runtime")
    parser.add_argument("--objective", choices=sorted(optimise.OBJECTIVES), default="throughput")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--here", action="store_true", help="run every case in this interpreter")
    args = parser.parse_args()
    machine = optimise.cpu()
    found = machine["int8_instructions"]
    if found is None:
        int8 = "unknown"
    elif found:
        int8 = ", ".join(found)
    else:
        int8 = f"none of {', '.join(optimise.INT8_INSTRUCTIONS)}: int8 computes at the f32 rate"
    print(f"CPU: {machine['name']}, {machine['cores']} cores; int8 instructions: {int8}")
    for name in args.cases:
        case, runtime = CASES[name]
        if runtime == "worker" or args.here:
            run(TITLES[name], *case(), args)
            continue
        from airloop import runtimes

        sys.stdout.flush()
        subprocess.run(
            [
                runtimes.python(runtime),
                __file__,
                "--here",
                "--cases",
                name,
                "--calls",
                str(args.calls),
                "--batch-seconds",
                str(args.batch_seconds),
                "--objective",
                args.objective,
            ],
            check=True,
        )


if __name__ == "__main__":
    main()
