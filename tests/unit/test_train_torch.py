"""PyTorch training end to end: the train operator in the ``torch`` runtime against MLflow on SQLite,
the offline gate scoring the model there, and its conversion to OpenVINO IR through the pt2 route.

The tests in this module run in order (train -> retry -> evaluate -> convert). The runtime is built
by ``make setup``; without it they fail with the command that builds it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import textwrap
from pathlib import Path

import mlflow
import pytest
import yaml

import airloop
from airloop import runtimes
from airloop.embedded.demo import FEATURES, generate
from airloop.steps.training.train import train
from airloop.tables import write_table
from airloop.tracking.artifacts import download, read_data
from airloop.tracking.models import resolve_model
from tests.fakes.context import task_context

MODULE = "torch:airloop.torch_models.MLPClassifier"
PARAMS = {"hidden_sizes": [32, 16], "epochs": 12, "lr": 0.005}
CONNECTION = "mlflow_torch"
TORCH_HERE = importlib.util.find_spec("torch") is not None


def _context(task_id: str = "train", try_number: int = 1) -> dict:
    return task_context(
        task_id, dag_id="airloop_torch", run_id="manual__torch", try_number=try_number, dag_file=__file__
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch")
    runtimes.python("torch")  # RuntimeMissingError naming `airloop runtimes build torch` when absent
    store = {
        "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "artifact_root": (root / "artefacts").as_uri(),
        "data_uri": write_table(generate(1200, seed=0), str(root / "data.parquet")),
        "root": root,
    }
    connection = {
        "conn_type": "mlflow",
        "host": store["tracking_uri"],
        "extra": {"artifact_root": store["artifact_root"]},
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(f"AIRFLOW_CONN_{CONNECTION.upper()}", json.dumps(connection))
        yield store


def _train_operator(store: dict):
    from airloop.operators.mlflow import MlflowTrainModelOperator

    return MlflowTrainModelOperator(
        task_id="train",
        mlflow_conn_id=CONNECTION,
        data_uri=store["data_uri"],
        experiment="torch",
        estimator=MODULE,
        estimator_params=PARAMS,
        runtime="torch",
    )


def test_the_operator_trains_a_torch_module_in_the_torch_runtime(store):
    result = _train_operator(store).execute(_context(try_number=1))
    store["trained"] = result
    assert result["reused"] is False and result["model_uri"] == f"runs:/{result['run_id']}/model"
    metrics = result["metrics"]
    assert metrics["accuracy"] > 0.9 and 0 < metrics["log_loss"] < 0.3 and metrics["roc_auc"] > 0.95
    assert metrics["train_rows"] == 900 and metrics["holdout_rows"] == 300

    client = mlflow.MlflowClient(store["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["estimator"] == MODULE
    assert params["model_class"] == "airloop.torch_models.MLPClassifier"
    assert params["hidden_sizes"] == "[32, 16]" and params["dropout"] == "0.0"  # the constructor's default
    assert (params["epochs"], params["lr"], params["batch_size"]) == ("12", "0.005", "32")
    assert params["standardize"] == "True" and params["seed"] == "0"
    tags = run.data.tags
    assert (tags["airflow.dag_id"], tags["airflow.task_id"], tags["airflow.try_number"]) == (
        "airloop_torch",
        "train",
        "1",
    )
    assert tags["airloop.code_version"] == airloop.__version__
    assert tags["airloop.dag_code.sha256"] == hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    assert tags["airloop.data.sha256"] == result["fingerprint"]["sha256"]
    assert tags["airloop.data.rows"] == "1200"

    # The loss of every epoch, as one metric with a step per epoch; it falls as the module learns.
    history = sorted(client.get_metric_history(result["run_id"], "train_loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, 13))
    assert history[-1].value == metrics["train_loss"] < history[0].value

    # The model: MLflow's pytorch flavour holding a torch.export program, no pickle anywhere.
    location, _ = resolve_model(client, result["model_uri"])
    local = Path(download(store["tracking_uri"], location, str(store["root"] / "model")))
    files = {str(path.relative_to(local)) for path in local.rglob("*") if path.is_file()}
    assert "data/model.pt2" in files and not any(name.endswith((".pth", ".pkl")) for name in files)
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["pytorch"]["model_data"] == "data"
    assert mlmodel["metadata"] == {"classes": [0, 1], "feature_names": FEATURES}
    assert json.loads(mlmodel["signature"]["inputs"])[0]["tensor-spec"] == {
        "dtype": "float32",
        "shape": [-1, 8],
    }
    requirements = (local / "requirements.txt").read_text().split()
    assert any(line.startswith("torch==2.") and "+" not in line for line in requirements)
    assert any(line.startswith("numpy==") for line in requirements)

    holdout = read_data(store["tracking_uri"], result["holdout_uri"])
    assert len(holdout) == 300 and list(holdout.columns) == [*FEATURES, "label"]


def test_a_retry_reuses_the_run_and_a_new_task_trains_the_same_model(store):
    first = store["trained"]
    again = _train_operator(store).execute(_context(try_number=2))
    assert again["reused"] is True and again["run_id"] == first["run_id"]
    assert again["metrics"] == first["metrics"] and again["fingerprint"] == first["fingerprint"]

    # Seeded: another task instance trains its own run, with the same weights, loss and metrics.
    other = runtimes.run_step(
        "airloop.steps.training.train:train",
        {
            "tracking_uri": store["tracking_uri"],
            "experiment": "torch",
            "data_uri": store["data_uri"],
            "estimator": MODULE,
            "estimator_params": PARAMS,
            "tags": {
                "airflow.dag_id": "airloop_torch",
                "airflow.run_id": "manual__other",
                "airflow.task_id": "train",
            },
        },
        runtime="torch",
        context=_context("train_other"),
        task_id="train_other",
    )
    assert other["run_id"] != first["run_id"] and other["metrics"] == first["metrics"]


def test_the_offline_gate_scores_the_torch_model_in_the_torch_runtime(store):
    trained = store["trained"]
    request = {
        "tracking_uri": store["tracking_uri"],
        "model_name": "torch-test",
        "run_id": trained["run_id"],
    }
    verdict = runtimes.run_step(
        "airloop.steps.training.evaluate:evaluate",
        request,
        runtime="torch",
        context=_context("evaluate"),
        task_id="evaluate",
    )
    assert verdict["verdict"] == "pass" and verdict["rule"] == "no_champion"
    assert verdict["challenger"]["accuracy"] == pytest.approx(trained["metrics"]["accuracy"])
    if not TORCH_HERE:
        from airloop.steps.training.evaluate import evaluate

        with pytest.raises(ImportError, match=r"'torch' runtime \(the operator's runtime='torch'\)"):
            evaluate(request)


@pytest.mark.skipif(TORCH_HERE, reason="torch is installed in this environment")
def test_a_torch_estimator_without_torch_names_the_runtime(store):
    with pytest.raises(ImportError, match=r"needs PyTorch.*`airloop runtimes build torch`"):
        train(
            {
                "tracking_uri": store["tracking_uri"],
                "experiment": "torch",
                "data_uri": store["data_uri"],
                "estimator": MODULE,
            }
        )


_BAD_ESTIMATORS = textwrap.dedent("""
    import json

    from airloop.steps.training.train import trainer

    messages = []
    for path, params in [
        ("torch:airloop.torch_models.Missing", {}),
        ("torch:sklearn.neural_network.MLPClassifier", {}),
        ("torch:airloop.torch_models.MLPClassifier", {"hidden": [8]}),
        ("torch:airloop.torch_models.MLPClassifier", {"epochs": 0, "lr": -1}),
    ]:
        try:
            trainer(path, params, 0)
        except ValueError as error:
            messages.append(str(error))
    print(json.dumps(messages))
""")


def test_bad_torch_estimators_are_refused_before_training():
    probe = subprocess.run(
        [runtimes.python("torch"), "-c", _BAD_ESTIMATORS], capture_output=True, text=True, check=True
    )
    missing, not_torch, unknown, training = json.loads(probe.stdout)
    assert "'torch:airloop.torch_models.Missing' cannot be imported" in missing
    assert "must be a torch.nn.Module class" in not_torch
    assert "must take n_features, n_classes and ['hidden']" in unknown and "'epochs'" in unknown
    assert "epochs must be a whole number >= 1" in training and "lr must be a number > 0" in training


def test_the_torch_model_converts_to_openvino_ir_and_passes_parity(store):
    from airloop.operators.openvino import OpenvinoConvertModelOperator

    trained = store["trained"]
    operator = OpenvinoConvertModelOperator(
        task_id="convert",
        mlflow_conn_id=CONNECTION,
        run_id=trained["run_id"],
        holdout_uri=trained["holdout_uri"],
        variants=["fp32", "fp16"],
    )
    result = operator.execute(_context("convert"))  # plan in the worker picks the torch runtime
    assert result["route"] == "pytorch" and result["family"] == "PyTorch module"
    assert result["passed"] is True, result["reason"]
    check = result["conversion_check"]  # the fp32 IR; fp16 may be the variant that serves
    assert check["max_abs_diff"] < 1e-5 and check["label_agreement"] == 1.0
    assert result["parity"]["variant"] == result["variant"] and result["parity"]["passed"] is True
    manifest = json.loads(
        Path(
            mlflow.MlflowClient(store["tracking_uri"]).download_artifacts(
                trained["run_id"], "openvino/manifest.json", str(store["root"] / "ir")
            )
        ).read_text()
    )
    assert manifest["feature_names"] == FEATURES and manifest["classes"] == [0, 1]
    assert manifest["precision"] == result["variant"]
