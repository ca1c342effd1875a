"""A model's input encoding (``airloop.encoding``): categorical string features and missing values, as
the scikit-learn pipeline computes them and as serving does from raw rows; a conversion whose parity
gate covers the whole pipeline; the model server on raw requests; ``airloop init`` on such a table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from airloop.encoding import MISSING, UNKNOWN, categorical_columns, encode, export, with_encoding
from airloop.tables import write_table
from tests.fakes.tables import DECLARED, LABEL, customers

MLP = {"hidden_layer_sizes": [16], "max_iter": 400, "random_state": 0}


def _pipeline(frame: pd.DataFrame):
    from sklearn.tree import DecisionTreeClassifier

    features = frame.drop(columns=[LABEL])
    categorical = categorical_columns(features, [DECLARED])
    fit = DecisionTreeClassifier(max_depth=6, random_state=0).fit
    return with_encoding(fit, categorical)(features, frame[LABEL]), features


def test_serving_encodes_raw_rows_as_the_fitted_pipeline_does():
    frame = customers(600)
    model, features = _pipeline(frame)
    assert categorical_columns(features, [DECLARED]) == ["region", "plan", DECLARED]
    encoding = export(model[0])
    assert [(i["column"], i["kind"]) for i in encoding["inputs"]] == [
        ("tenure", "numeric"),
        ("spend", "numeric"),
        ("region", "categorical"),
        ("plan", "categorical"),
        (DECLARED, "categorical"),
    ]
    assert encoding["inputs"][2]["categories"] == ["east", "north", "south", "west"]
    assert encoding["inputs"][4]["categories"] == [1, 2, 3, 4, 5]
    json.dumps(encoding)  # it goes into the manifest
    names = list(features.columns)
    # The table as parquet gives it back: missing strings are None, missing numbers NaN.
    expected = model[0].transform(features).astype(np.float32)
    np.testing.assert_array_equal(encode(encoding, names, features.to_numpy(dtype=object)), expected)
    # Raw requests: nulls, a category never seen, numbers as the strings Seldon's wrapper makes of a
    # mixed row, an integer code as a float.
    raw = [[None, None, None, 40.0, None], ["mars", "pro", "3", "12.5", "7"], ["north", "basic", 2.0, 1, 3]]
    frame_of = pd.DataFrame(raw, columns=names).astype({"tenure": float, "spend": float})
    got = encode(encoding, names, raw)
    median = float(features["spend"].median())
    # store had no missing value in training: OrdinalEncoder takes one for an unknown category.
    assert got[0].tolist() == pytest.approx([40.0, median, MISSING, MISSING, UNKNOWN])
    assert got[1].tolist() == [12.5, 7.0, UNKNOWN, 2.0, 2.0] and got[2, 4] == 1.0
    typed = frame_of.assign(store=[None, 3, 2])
    np.testing.assert_array_equal(got[[0, 2]], model[0].transform(typed.iloc[[0, 2]]).astype(np.float32))
    with pytest.raises(ValueError, match="feature 'spend' must be a number or null, got 'lots'"):
        encode(encoding, names, [["north", "pro", 1, 3.0, "lots"]])


def test_a_pipeline_of_another_make_is_refused_naming_the_supported_one():
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import StandardScaler

    scaler = ColumnTransformer([("scale", StandardScaler(), ["spend"])]).fit(customers(50))
    with pytest.raises(ValueError, match=r"'scale' transformer is a StandardScaler.*supported is a ColumnTr"):
        export(scaler)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The table trained (an MLP behind the encoding: its route runs in this environment) and
    converted, as a loop turn does."""
    from airloop.steps.conversion.convert import convert
    from airloop.steps.training.train import train

    root = tmp_path_factory.mktemp("encoding")
    store = {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_root": (root / "a").as_uri()}
    data = write_table(customers(), str(root / "customers.parquet"))
    trained = train(
        {
            **store,
            "data_uri": data,
            "label_column": LABEL,
            "categorical_features": [DECLARED],
            "estimator": "sklearn.neural_network.MLPClassifier",
            "estimator_params": MLP,
        }
    )
    result = convert(
        {
            **store,
            "run_id": trained["run_id"],
            "label_column": LABEL,
            "variants": ["fp32"],
            "benchmark_calls": 20,
        }
    )
    return {**store, "trained": trained, "result": result, "root": root}


def test_the_parity_gate_covers_the_pipeline_from_the_raw_rows(converted):
    result, trained = converted["result"], converted["trained"]
    assert trained["metrics"]["accuracy"] > 0.45  # the majority class: 0.40
    assert result["passed"] and result["family"] == "MLPClassifier", result["reason"]
    assert result["parity"]["label_agreement"] == 1.0 and result["parity"]["max_abs_diff"] < 1e-4
    assert result["parity"]["accuracy"] == pytest.approx(trained["metrics"]["accuracy"])
    assert result["native_accuracy"] == pytest.approx(trained["metrics"]["accuracy"])


def test_the_model_server_answers_raw_rows_with_nulls_and_unknown_categories(converted):
    from airloop.openvino_ir import fetch_ir
    from airloop.serving.model import OpenVinoModel
    from airloop.tracking.models import load_model

    fetched = fetch_ir(
        {
            "tracking_uri": converted["tracking_uri"],
            "ir_uri": converted["result"]["ir_uri"],
            "dst_dir": str(converted["root"] / "ir"),
        }
    )
    manifest = fetched["manifest"]
    assert manifest["feature_names"] == ["region", "plan", DECLARED, "tenure", "spend"]
    assert {i["column"] for i in manifest["encoding"]["inputs"]} == set(manifest["feature_names"])
    server = OpenVinoModel(fetched["model_dir"])
    server.load()
    rows = [
        ["north", None, 3, None, 48.0],
        ["atlantis", "pro", 9, 30.0, None],
        [None, None, None, None, None],
    ]
    answer = server.predict(rows, manifest["feature_names"])
    assert answer.shape == (3, 3) and np.allclose(answer.sum(axis=1), 1.0, atol=1e-5)
    model = load_model(converted["tracking_uri"], converted["trained"]["model_uri"])
    frame = pd.DataFrame(rows, columns=manifest["feature_names"]).astype({"tenure": float, "spend": float})
    np.testing.assert_allclose(answer, model.predict_proba(frame), atol=1e-4)
    with pytest.raises(ValueError, match="feature 'tenure' must be a number or null, got 'long'"):
        server.predict([["north", "pro", 3, "long", 48.0]], manifest["feature_names"])


def test_batch_scoring_encodes_the_raw_table_as_the_pipeline_does(converted):
    from airloop.steps.conversion.score import score
    from airloop.tracking.models import load_model

    table = customers(300, seed=7)
    data = write_table(table.drop(columns=[LABEL]), str(converted["root"] / "to-score.parquet"))
    out = converted["root"] / "scored"
    score(
        {
            "tracking_uri": converted["tracking_uri"],
            "model_name": "customers",
            "model_version": "1",
            "ir_uri": converted["result"]["ir_uri"],
            "data_uri": data,
            "output_uri": str(out),
            "chunk_rows": 128,
        }
    )
    scored = pd.concat([pd.read_parquet(part) for part in sorted(out.glob("part-*.parquet"))])
    model = load_model(converted["tracking_uri"], converted["trained"]["model_uri"])
    native = model.predict_proba(pd.read_parquet(data))
    np.testing.assert_allclose(scored[[f"probability_{c}" for c in (0, 1, 2)]], native, atol=1e-4)


def test_the_gateway_passes_strings_and_nulls_to_models_that_encode_them():
    from airloop.serving.gateway import BadRequest, check_features, v2_request

    rows = [["north", None, 3, 1.5]]
    check_features(["region", "plan", "store", "tenure"], rows, encoded=True)
    with pytest.raises(BadRequest, match="feature 'region' of row 0 must be a finite number, got \"north\""):
        check_features(["region", "plan", "store", "tenure"], rows)
    with pytest.raises(BadRequest, match="must be a finite number, a string or null, got true"):
        check_features(None, [[True]], encoded=True)
    body = json.loads(v2_request(["region", "plan", "store", "tenure"], rows, encoded=True))
    assert [t["datatype"] for t in body["inputs"]] == ["BYTES"] * 4
    assert [t["data"] for t in body["inputs"]] == [['"north"'], ["null"], ["3"], ["1.5"]]


def test_init_infers_categorical_columns_and_reports_missing_values(tmp_path):
    from airloop.loops.init import draft
    from airloop.loops.spec import load

    customers().to_csv(tmp_path / "customers.csv", index=False)
    drafted = draft(str(tmp_path / "customers.csv"), LABEL, tmp_path / "loops")
    lines = "\n".join(drafted.lines)
    assert "categorical: region, plan (the non-numeric columns, and those --categorical names" in lines
    assert "missing values: region 8.3%, plan 5.8%, tenure 11.2%" in lines
    spec = load(drafted.spec_path)
    assert spec.categorical == ["region", "plan"] and spec.evaluation["metric"] == "accuracy"
    suite = json.loads(Path(drafted.suite_path).read_text())
    assert any(e["kwargs"].get("column") == "region" for e in suite["expectations"])
    # What the column's type hides, the author declares: `airloop init ... --categorical store`.
    declared = draft(
        str(tmp_path / "customers.csv"), LABEL, tmp_path / "loops", declared=[DECLARED], force=True
    )
    assert load(declared.spec_path).categorical == ["region", "plan", DECLARED]
    with pytest.raises(ValueError, match=r"--categorical: categorical \['shop'\] are not features"):
        draft(str(tmp_path / "customers.csv"), LABEL, tmp_path / "loops", declared=["shop"], force=True)


def test_a_spec_declares_categorical_features_and_names_a_wrong_one():
    from airloop.loops.dags import loop_dags
    from airloop.loops.spec import SpecError, parse

    raw = {"name": "customers", "data": {"uri": "c.csv"}, "label": LABEL, "suite": "s.json"}
    raw["model"] = {"estimator": "sklearn.ensemble.RandomForestClassifier"}
    loop, _ = loop_dags(parse({**raw, "categorical": [DECLARED]}, base="/specs"))
    assert loop.get_task("train").categorical_features == [DECLARED]
    with pytest.raises(SpecError, match="categorical: 'segment' is not a feature"):
        parse({**raw, "categorical": [LABEL]})
    with pytest.raises(SpecError, match="categorical: 'store' is not a feature"):
        parse({**raw, "features": ["region"], "categorical": [DECLARED]})
