"""The performance monitor's step in the monitoring runtime (NannyML's CBPE), on a real data set: the
estimate against the realized accuracy of a calibrated model, and each verdict (realized drop, estimated
drop while labels are pending, drifted predictions, too few rows)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from airloop import runtimes
from airloop.labels import LABEL, VERSION, probability_columns

STEP = "airloop.steps.drift.performance:monitor"
_HOP = """
import json, sys
from airloop.runtimes import call_step
json.dump(call_step(sys.argv[1], json.load(open(sys.argv[2]))), open(sys.argv[3], "w"))
"""


@pytest.fixture(scope="module")
def monitoring_python() -> str:
    try:
        return runtimes.python("monitoring")
    except runtimes.RuntimeMissingError as error:
        pytest.skip(f"the performance monitor is not tested: {error}")


def hop(python: str, request: dict, tmp_path: Path) -> dict:
    """The step across the runtime hop, as the operator runs it."""
    (tmp_path / "request.json").write_text(json.dumps(request))
    out = tmp_path / "result.json"
    subprocess.run(
        [python, "-c", _HOP, STEP, str(tmp_path / "request.json"), str(out)], check=True, capture_output=True
    )
    return json.loads(out.read_text())


def table(
    probabilities: np.ndarray, truth: list, classes: list[str], version: str | None = None
) -> pd.DataFrame:
    frame = pd.DataFrame(probabilities, columns=probability_columns(classes))
    frame[LABEL] = pd.array([None if t is None else str(t) for t in truth], dtype="string")
    if version is not None:
        frame[VERSION] = version
    return frame


def split_model(loader, seed: int = 0):
    """A scaled logistic regression (well calibrated: it minimises log loss), its reference (half the
    test rows) and the rest."""
    features, target = loader(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        features, target, test_size=0.6, random_state=seed, stratify=target
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_train, y_train)
    half = len(x_test) // 2
    return model, (x_test[:half], y_test[:half]), (x_test[half:], y_test[half:])


def request(
    tmp_path: Path, reference: pd.DataFrame, window: pd.DataFrame, classes: list[str], **options
) -> dict:
    reference.to_parquet(tmp_path / "reference.parquet")
    window.to_parquet(tmp_path / "window.parquet")
    return {
        "window_path": str(tmp_path / "window.parquet"),
        "references": {"1": str(tmp_path / "reference.parquet")},
        "classes": classes,
        "monitored": "1",
        **options,
    }


@pytest.mark.parametrize("loader", [load_breast_cancer, load_digits], ids=["binary", "ten_classes"])
def test_cbpe_brackets_the_realized_accuracy_of_a_calibrated_model(monitoring_python, tmp_path, loader):
    model, (x_ref, y_ref), (x_cur, y_cur) = split_model(loader)
    classes = [str(c) for c in model.classes_]
    pending = [None] * len(y_cur)  # no label has come: the estimate is all there is
    result = hop(
        monitoring_python,
        request(
            tmp_path,
            table(model.predict_proba(x_ref), list(y_ref), classes),
            table(model.predict_proba(x_cur), pending, classes, "1"),
            classes,
            min_rows=20,
        ),
        tmp_path,
    )
    figures = result["versions"]["1"]
    realized = float((model.predict(x_cur) == y_cur).mean())
    assert figures["rows"] == len(y_cur) and figures["labelled"] == 0 and figures["realized_accuracy"] is None
    assert figures["estimated_lower"] <= realized <= figures["estimated_upper"]
    assert abs(figures["estimated_accuracy"] - realized) < 0.05
    print(f"CBPE {figures['estimated_accuracy']:.4f} vs realized {realized:.4f} on {len(y_cur)} rows")
    assert result["verdict"] == "no_drift", result["reason"]


def test_a_realized_drop_is_high_and_a_clear_estimated_drop_is_medium(monitoring_python, tmp_path):
    model, (x_ref, y_ref), (x_cur, y_cur) = split_model(load_breast_cancer)
    classes = ["0", "1"]
    reference = table(model.predict_proba(x_ref), list(y_ref), classes)
    # The truth turned: every label that has come says the model is wrong.
    flipped = [1 - int(y) for y in y_cur]
    result = hop(
        monitoring_python,
        request(
            tmp_path,
            reference,
            table(model.predict_proba(x_cur), flipped, classes, "1"),
            classes,
            min_rows=20,
        ),
        tmp_path,
    )
    assert (result["verdict"], result["severity"]) == ("drift", "high")
    assert "realized accuracy" in result["reason"] and result["versions"]["1"]["realized_accuracy"] < 0.2
    # Rows the model is unsure of, labels pending: CBPE sees the drop before any label comes.
    rng = np.random.default_rng(3)
    unsure = rng.uniform(0.45, 0.55, 200)
    window = table(np.column_stack([1 - unsure, unsure]), [None] * 200, classes, "1")
    result = hop(monitoring_python, request(tmp_path, reference, window, classes, min_rows=20), tmp_path)
    figures = result["versions"]["1"]
    assert (result["verdict"], result["severity"]) == ("drift", "medium"), result["reason"]
    assert figures["estimated_upper"] < figures["reference_accuracy"] - 0.05 and figures["labelled"] == 0


def test_drifted_predictions_are_low_and_few_rows_are_not_judged(monitoring_python, tmp_path):
    model, (x_ref, y_ref), (x_cur, y_cur) = split_model(load_breast_cancer)
    classes = ["0", "1"]
    reference = table(model.predict_proba(x_ref), list(y_ref), classes)
    probabilities = model.predict_proba(x_cur)
    # Only the rows predicted as class 1, confidently: the output distribution moved, accuracy did not.
    confident = probabilities[probabilities[:, 1] > 0.95]
    window = table(confident, [None] * len(confident), classes, "1")
    result = hop(monitoring_python, request(tmp_path, reference, window, classes, min_rows=20), tmp_path)
    assert (result["verdict"], result["severity"]) == ("drift", "low"), result["reason"]
    assert result["versions"]["1"]["predicted"]["1"] == 1.0
    result = hop(monitoring_python, request(tmp_path, reference, window, classes, min_rows=10_000), tmp_path)
    assert result["verdict"] == "insufficient_data" and "10000" in result["reason"]


def test_a_version_without_a_reference_is_named(monitoring_python, tmp_path):
    model, (x_ref, y_ref), (x_cur, _) = split_model(load_breast_cancer)
    classes = ["0", "1"]
    given = request(
        tmp_path,
        table(model.predict_proba(x_ref), list(y_ref), classes),
        table(model.predict_proba(x_cur), [None] * len(x_cur), classes, "7"),
        classes,
    )
    with pytest.raises(subprocess.CalledProcessError) as failed:
        hop(monitoring_python, given, tmp_path)
    assert "no reference for model version '7'" in failed.value.stderr.decode()
