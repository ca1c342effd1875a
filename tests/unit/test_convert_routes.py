"""The conversion routes that need the torch runtime: scikit-learn tree models through hummingbird-ml's
torch graph, and PyTorch modules (pt2) through torch.export, each run by a hop into that runtime.

The runtime is built by ``make setup``; without it these tests fail with the command that builds it.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import mlflow
import pytest

from airloop import runtimes
from airloop.embedded.demo import generate
from airloop.steps.conversion.optimise import VARIANTS
from airloop.steps.training.train import train
from airloop.tables import write_table
from tests.fakes.context import task_context

TREES = {
    "DecisionTreeClassifier": ("sklearn.tree.DecisionTreeClassifier", {"max_depth": 5}),
    "RandomForestClassifier": (
        "sklearn.ensemble.RandomForestClassifier",
        {"n_estimators": 10, "max_depth": 6},
    ),
    "GradientBoostingClassifier": ("sklearn.ensemble.GradientBoostingClassifier", {"n_estimators": 20}),
    "HistGradientBoostingClassifier": ("sklearn.ensemble.HistGradientBoostingClassifier", {"max_iter": 20}),
}


def _context(task_id: str = "convert") -> dict:
    return task_context(task_id, dag_id="airloop_convert", run_id="manual__convert", dag_file=__file__)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("routes")
    runtimes.python("torch")  # RuntimeMissingError naming `airloop runtimes build torch` when absent
    return {
        "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "artifact_root": (root / "artefacts").as_uri(),
        "data_uri": write_table(generate(1200, seed=0), str(root / "data.parquet")),
        "root": root,
    }


def _train(store: dict, family: str) -> dict:
    estimator, params = TREES[family]
    return train(
        {
            "tracking_uri": store["tracking_uri"],
            "artifact_root": store["artifact_root"],
            "data_uri": store["data_uri"],
            "estimator": estimator,
            "estimator_params": params,
        }
    )


def _in_torch_runtime(store: dict, request: dict) -> dict:
    return runtimes.run_step(
        "airloop.steps.conversion.convert:convert",
        {"tracking_uri": store["tracking_uri"], "benchmark_calls": 20, **request},
        runtime="torch",
        context=_context(),
        task_id="convert",
    )


@pytest.mark.parametrize(
    "family", ["RandomForestClassifier", "GradientBoostingClassifier", "HistGradientBoostingClassifier"]
)
def test_tree_models_convert_through_hummingbird_in_the_torch_runtime(store, family):
    trained = _train(store, family)
    result = _in_torch_runtime(store, {"run_id": trained["run_id"], "variants": ["fp32", "fp16"]})
    assert result["route"] == "hummingbird" and result["family"] == family
    assert result["passed"] is True, result["reason"]
    # The fp32 IR is exact; the variant that serves passed its own gate.
    check, served = result["conversion_check"], result["parity"]
    assert check["max_abs_diff"] < 1e-5 and check["label_agreement"] == 1.0
    assert served["variant"] == result["variant"] and served["max_abs_diff"] <= served["tolerance"]
    # ONNX Runtime runs skl2onnx's graph of the same trees (ai.onnx.ml operators) next to OpenVINO,
    # when skl2onnx exports it; the notes say when it does not.
    exported = not any(note.startswith("ONNX Runtime not benchmarked") for note in result["notes"])
    assert set(result["benchmark"]) == {"native", "fp32", "fp16"} | ({"onnxruntime"} if exported else set())
    run = mlflow.MlflowClient(store["tracking_uri"]).get_run(trained["run_id"])
    assert run.data.tags["airloop.openvino.variant"] == result["variant"]


def test_the_operator_picks_the_torch_runtime_for_a_tree_and_records_why(store, monkeypatch):
    from airloop.operators.openvino import OpenvinoConvertModelOperator

    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_ROUTES",
        json.dumps(
            {
                "conn_type": "mlflow",
                "host": store["tracking_uri"],
                "extra": {"artifact_root": store["artifact_root"]},
            }
        ),
    )
    trained = _train(store, "DecisionTreeClassifier")
    operator = OpenvinoConvertModelOperator(
        task_id="convert",
        mlflow_conn_id="mlflow_routes",
        run_id=trained["run_id"],
        holdout_uri=trained["holdout_uri"],
    )
    assert operator.runtime is None  # chosen per model at run time
    result = operator.execute(_context())
    assert result["route"] == "hummingbird" and result["passed"] is True
    assert set(result["variants"]) == set(VARIANTS)
    # The selected variant is the fastest one within the budget; the others are named with their drops
    # or the error that kept them from being built.
    kept = [name for name, scores in result["variants"].items() if scores["within_budget"]]
    assert result["variant"] in kept and result["reason"].startswith(f"{result['variant']}: best throughput")
    for name, scores in result["variants"].items():
        if not scores["within_budget"]:
            assert name in result["reason"].split("not candidates: ")[1]
    report = json.loads(
        Path(
            mlflow.MlflowClient(store["tracking_uri"]).download_artifacts(
                trained["run_id"], "openvino_report.json", str(store["root"] / "report")
            )
        ).read_text()
    )
    assert report["route"] == "hummingbird" and report["variant"] == result["variant"]


_SAVE_MODULE = textwrap.dedent("""
    import sys

    import mlflow.pytorch
    import numpy as np
    import torch


    class Erfinv(torch.nn.Module):
        # OpenVINO converts aten::erfinv; torch's TorchScript ONNX exporter has no symbolic for it.
        def forward(self, x):
            return torch.special.erfinv(torch.tanh(x) * 0.5)


    torch.manual_seed(0)
    middle = [Erfinv()] if sys.argv[3] == "erfinv" else []
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), *middle, torch.nn.Linear(32, 2),
                              torch.nn.Softmax(dim=1)).eval()
    example = np.random.default_rng(0).standard_normal((5, 8)).astype("float32")
    mlflow.pytorch.save_model(net, sys.argv[1], serialization_format=sys.argv[2], input_example=example,
                              pip_requirements=["torch"])
""")

# The route's graphs of a saved module, run on the same rows: how far ONNX Runtime is from torch.
_ORT_VS_TORCH = textwrap.dedent("""
    import sys

    import numpy as np
    import pandas as pd

    from airloop.onnx_runtime import onnx_runtime_predictor
    from airloop.steps.conversion import routes

    rows = np.random.default_rng(1).standard_normal((200, 8)).astype("float32")
    frame = pd.DataFrame(rows, columns=[f"x{i}" for i in range(8)])
    source = routes.load_source(sys.argv[1], sys.argv[2], sys.argv[3], frame)
    print(np.abs(onnx_runtime_predictor(source.onnx_path)(rows) - source.native(rows)).max())
""")


def _pytorch_model(store: dict, name: str, serialization: str, module: str = "mlp") -> str:
    path = store["root"] / name
    subprocess.run(
        [runtimes.python("torch"), "-c", _SAVE_MODULE, str(path), serialization, module],
        check=True,
        capture_output=True,
    )
    return path.as_uri()


def _new_run(store: dict, trained: dict) -> str:
    client = mlflow.MlflowClient(store["tracking_uri"])
    return client.create_run(client.get_run(trained["run_id"]).info.experiment_id).info.run_id


def test_a_pytorch_module_converts_through_torch_export(store):
    trained = _train(store, "DecisionTreeClassifier")  # for its holdout and calibration rows
    model_uri = _pytorch_model(store, "module", "pt2")
    result = _in_torch_runtime(
        store,
        {
            "run_id": _new_run(store, trained),
            "model_uri": model_uri,
            "holdout_uri": trained["holdout_uri"],
            "calibration_uri": trained["reference_uri"],
        },
    )
    assert result["route"] == "pytorch" and result["family"] == "PyTorch module"
    assert result["passed"] is True, result["reason"]
    assert result["conversion_check"]["max_abs_diff"] < 1e-5
    assert result["parity"]["variant"] == result["variant"] and result["parity"]["passed"] is True
    # ONNX Runtime runs torch's ONNX export of the program next to torch and the OpenVINO variants.
    assert set(result["benchmark"]) == {"native", "onnxruntime", *VARIANTS}
    assert not any(note.startswith("ONNX Runtime not benchmarked") for note in result["notes"])
    assert set(result["ratios"]) == {
        "throughput_vs_native",
        "latency_vs_native",
        "throughput_vs_onnxruntime",
        "latency_vs_onnxruntime",
    }
    # ... and returns what the module returns.
    diff = subprocess.run(
        [
            runtimes.python("torch"),
            "-c",
            _ORT_VS_TORCH,
            store["tracking_uri"],
            model_uri,
            str(store["root"] / "ort_vs_torch"),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert float(diff.split()[-1]) < 1e-6


def test_a_module_torch_cannot_export_to_onnx_converts_without_onnx_runtime(store):
    trained = _train(store, "DecisionTreeClassifier")
    result = _in_torch_runtime(
        store,
        {
            "run_id": _new_run(store, trained),
            "model_uri": _pytorch_model(store, "erfinv", "pt2", module="erfinv"),
            "holdout_uri": trained["holdout_uri"],
            "variants": ["fp32"],
        },
    )
    assert result["passed"] is True, result["reason"]
    assert set(result["benchmark"]) == {"native", "fp32"}
    assert any(
        note.startswith("ONNX Runtime not benchmarked: torch's ONNX exporter cannot export this module: ")
        and "aten::erfinv" in note
        for note in result["notes"]
    ), result["notes"]


def test_a_pickled_pytorch_module_is_refused(store):
    trained = _train(store, "DecisionTreeClassifier")
    model_uri = _pytorch_model(store, "pickled", "pickle")
    with pytest.raises(Exception, match="saved with pickle, which runs code when loaded.*format='pt2'"):
        _in_torch_runtime(store, {"run_id": trained["run_id"], "model_uri": model_uri, "variants": ["fp32"]})


def test_runtime_builds_take_pips_find_links(monkeypatch):
    monkeypatch.setenv("PIP_FIND_LINKS", "/opt/wheels https://example.org/cpu")
    assert runtimes._find_links() == [
        "--find-links",
        "/opt/wheels",
        "--find-links",
        "https://example.org/cpu",
    ]
    monkeypatch.delenv("PIP_FIND_LINKS")
    assert runtimes._find_links() == []


def test_a_tree_splits_float32_neighbours_as_scikit_learn_does(store):
    """A threshold between two adjacent float32 values rounds, in a float32 graph, to the upper one:
    without the conversion's float32 thresholds every row at that value would go the other way."""
    import numpy as np
    import pandas as pd

    low = np.nextafter(np.float32(1000), np.float32(2000))  # an odd mantissa: the midpoint rounds up
    high = np.nextafter(low, np.float32(2000))
    assert np.float32((np.float64(low) + np.float64(high)) / 2) == high
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 800)
    table = pd.DataFrame(
        {"f0": np.where(labels == 1, high, low).astype(np.float64), "f1": rng.normal(size=800)}
    )
    data = write_table(table.assign(label=labels), str(store["root"] / "neighbours.parquet"))
    trained = train(
        {
            "tracking_uri": store["tracking_uri"],
            "artifact_root": store["artifact_root"],
            "data_uri": data,
            "estimator": "sklearn.tree.DecisionTreeClassifier",
            "estimator_params": {"max_depth": 3},
        }
    )
    result = _in_torch_runtime(store, {"run_id": trained["run_id"], "variants": ["fp32"]})
    assert result["passed"] is True, result["reason"]
    assert result["conversion_check"]["label_agreement"] == 1.0
    assert result["conversion_check"]["max_abs_diff"] == 0.0
