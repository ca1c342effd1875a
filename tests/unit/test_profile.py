"""Suites that are right on real data: profiling on scikit-learn's data sets, and the label leakage guard.

A suite profiled on one random half of a real data set must pass the other half (same distribution);
categories are told from integer measurements; every drafted suite and the reference suite refuse a
feature that equals, or almost perfectly predicts, the label, naming the column.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer, load_digits, load_wine

from airloop.cli import main as cli
from airloop.embedded.demo import generate
from airloop.expectations import label_skill
from airloop.steps.data.profile import profile_suite
from airloop.steps.data.validate import load_suite, validate_frame
from airloop.tables import write_table

SUITE = str(Path(__file__).resolve().parents[2] / "dags" / "expectations" / "training_data.json")
PREDICTS = "expect_column_to_not_predict_label"
BETWEEN = "expect_column_values_to_be_between"
VALUE_SET = "expect_column_values_to_be_in_set"


@functools.cache
def _real(name: str) -> pd.DataFrame:
    loader = {"digits": load_digits, "wine": load_wine, "breast_cancer": load_breast_cancer}
    frame = loader[name.removesuffix("_int")](as_frame=True).frame.rename(columns={"target": "label"})
    # The digits as a CSV reader gives them: integer pixel intensities, the case of integer measurements.
    return frame.astype("int64") if name.endswith("_int") else frame


def _halves(name: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = _real(name)
    order = np.random.default_rng(seed).permutation(len(frame))
    half = len(frame) // 2
    return (
        frame.iloc[order[:half]].reset_index(drop=True),
        frame.iloc[order[half:]].reset_index(drop=True),
    )


def _failed(result: dict) -> list[tuple[str, str | None]]:
    return [(item["expectation"], item["column"]) for item in result["failed"]]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["digits", "digits_int", "wine", "breast_cancer"])
def test_a_suite_profiled_on_half_of_a_real_data_set_passes_the_other_half(name, seed):
    first, second = _halves(name, seed)
    suite = profile_suite(first, name, label="label")
    result = validate_frame(second, suite)
    assert result["success"] is True, result["failed"]
    assert result["evaluated"] == len(suite["expectations"])
    # Still a gate: a value far out of range and a label class never seen fail, named.
    broken = second.copy()
    broken.loc[0, first.columns[1]] = 1e9
    broken.loc[1, "label"] = 99
    assert _failed(validate_frame(broken, suite)) == [(BETWEEN, str(first.columns[1])), (VALUE_SET, "label")]


def test_a_column_almost_constant_in_the_sample_keeps_a_range():
    # digits, seed 0: pixel_2_0 is 0 on all but 2 of the first half's rows (at most 1) and 2 in the other.
    first, second = _halves("digits", 0)
    assert first["pixel_2_0"].max() == 1 and second["pixel_2_0"].max() == 2
    suite = profile_suite(first, "digits")
    (pixel,) = [
        e for e in suite["expectations"] if e["type"] == BETWEEN and e["kwargs"]["column"] == "pixel_2_0"
    ]
    assert (pixel["kwargs"]["min_value"], pixel["kwargs"]["max_value"]) == (-10.0, 11.0)
    assert (
        suite["meta"]["columns"]["pixel_2_0"]["rule"]
        == "between -10 and 11 (observed 0 to 1, widened by 10 x its span)"
    )
    # Constant columns: widened by the value itself, or by 1 around 0, never by nothing.
    constant = profile_suite(pd.DataFrame({"zero": [0.0] * 50, "five": [5.0] * 50}), "c")
    ranges = {
        e["kwargs"]["column"]: (e["kwargs"]["min_value"], e["kwargs"]["max_value"])
        for e in constant["expectations"]
        if e["type"] == BETWEEN
    }
    assert ranges == {"zero": (-10.0, 10.0), "five": (-45.0, 55.0)}


def _kinds_table(rows: int = 2000) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    pixel = np.zeros(rows, dtype="int64")
    pixel[:3] = [1, 1, 4]
    return pd.DataFrame(
        {
            "id": np.arange(rows, dtype="int64"),
            "visits": rng.poisson(3, rows),  # a count: 12 values, its tail seen on few rows
            "store": rng.integers(0, 4, rows),  # a code: 4 values, each on ~500 rows
            "pixel": pixel,  # an intensity, 0 on all but 3 rows
            "blank": np.zeros(rows, dtype="int64"),
            "score": rng.normal(size=rows),
            "plan": rng.choice(["basic", "plus", "pro"], rows),
            "when": pd.date_range("2025-01-01", periods=rows, freq="min"),
            "label": rng.integers(0, 2, rows),
        }
    )


def test_profiling_tells_categories_from_integer_measurements():
    suite = profile_suite(_kinds_table(), "kinds", key="id", label="label")
    decided = suite["meta"]["columns"]
    assert {column: d["kind"] for column, d in decided.items()} == {
        "id": "key",
        "visits": "numeric",
        "store": "categorical",
        "pixel": "numeric",
        "blank": "numeric",
        "score": "numeric",
        "plan": "categorical",
        "when": "other",
        "label": "categorical",
    }
    assert decided["store"]["why"] == "4 integer values, each on 10+ rows"
    assert decided["visits"]["why"] == "11 integer values, the rarest on 2 rows"
    assert decided["pixel"]["why"] == "3 integer values, the rarest on 1 row"
    assert decided["blank"]["why"] == "integers, one value"
    assert (
        decided["blank"]["rule"] == "between -10 and 10 (constant 0, widened by 10); does not predict 'label'"
    )
    assert decided["when"]["rule"] == "type and nulls only; does not predict 'label'"
    sets = {
        e["kwargs"]["column"]: e["kwargs"]["value_set"]
        for e in suite["expectations"]
        if e["type"] == VALUE_SET
    }
    assert sets == {"store": [0, 1, 2, 3], "plan": ["basic", "plus", "pro"], "label": [0, 1]}
    guarded = [e["kwargs"]["column"] for e in suite["expectations"] if e["type"] == PREDICTS]
    assert guarded == ["visits", "store", "pixel", "blank", "score", "plan", "when"]  # not the key

    given = profile_suite(_kinds_table(), "kinds", categorical=["visits"], numeric=["store"], mostly=0.99)
    decided = given["meta"]["columns"]
    assert (decided["visits"]["kind"], decided["visits"]["why"]) == ("categorical", "given")
    assert (decided["store"]["kind"], decided["store"]["why"]) == ("numeric", "given")
    checks = {(e["type"], e["kwargs"].get("column")): e["kwargs"] for e in given["expectations"]}
    assert checks[(VALUE_SET, "visits")]["mostly"] == 0.99 and checks[(BETWEEN, "store")]["mostly"] == 0.99
    assert "mostly" not in checks[("expect_column_values_to_not_be_null", "store")]
    assert decided["store"]["rule"].endswith(", mostly 0.99")
    with pytest.raises(ValueError, match="'plan' holds object values, not numbers"):
        profile_suite(_kinds_table(), "k", numeric=["plan"])
    with pytest.raises(ValueError, match=r"categorical columns \['nope'\] are not among"):
        profile_suite(_kinds_table(), "k", categorical=["nope"])
    with pytest.raises(ValueError, match="mostly must be in"):
        profile_suite(_kinds_table(), "k", mostly=0)


def test_the_cli_prints_what_it_decided_per_column(tmp_path, capsys):
    data = write_table(_kinds_table(), str(tmp_path / "reference.parquet"))
    out = tmp_path / "suite.yaml"
    arguments = ["suites", "profile", data, "--out", str(out), "--key", "id", "--label", "label"]
    assert cli([*arguments, "--categorical", "visits", "--numeric", "store", "--mostly", "0.99"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["column", "kind", "rule"]
    lines = {line.split()[0]: line for line in printed[1:-1]}
    assert list(lines) == list(_kinds_table().columns)
    assert "categorical (given)" in lines["visits"] and "mostly 0.99" in lines["visits"]
    assert "numeric (given)" in lines["store"] and "between" in lines["store"]
    assert "key (the key)" in lines["id"] and "unique" in lines["id"]
    assert "wrote suite 'suite'" in printed[-1]
    suite = load_suite(str(out))
    assert suite["meta"]["columns"]["visits"]["kind"] == "categorical"


def test_label_skill_tells_a_leak_from_a_strong_feature():
    frame = _real("breast_cancer")
    label = frame["label"]
    # The strongest honest feature of breast_cancer fixes about three quarters of the guess's errors.
    assert max(label_skill(frame[c], label)["skill"] for c in frame.columns if c != "label") < 0.8
    rng = np.random.default_rng(0)
    flipped = label.where(rng.random(len(label)) > 0.01, 1 - label)  # 1% of the rows flipped
    for leak in (label, label * 3.0 + 1.0, flipped, label.astype(str)):
        assert label_skill(leak, label)["skill"] > 0.95
    assert (
        label_skill(pd.Series(rng.permutation(len(label))), label)["skill"] < 0.1
    )  # unique values: no skill
    target = pd.Series(rng.normal(size=2000))  # a regression label, binned like a feature
    assert label_skill(target * 2, target)["skill"] == 1.0
    assert label_skill(pd.Series(rng.normal(size=2000)), target)["skill"] < 0.1
    assert label_skill(pd.Series([1.0, np.nan]), pd.Series([0, 1]))["skill"] == 0.0


def test_a_feature_overwritten_with_the_label_fails_the_gate_naming_it():
    # The reference suite on the loop's own data: the trial's leak fails, an honest table passes.
    honest = generate(500, seed=3)
    assert validate_frame(honest, SUITE)["success"] is True
    leaked = validate_frame(honest.assign(f3=honest["label"].astype("float64")), SUITE)
    assert _failed(leaked) == [(PREDICTS, "f3")]
    assert leaked["failed"][0]["observed"]["skill"] == 1.0
    # A suite profiled on half of breast_cancer: the other half passes; overwritten or recoded, it fails.
    first, second = _halves("breast_cancer", 0)
    suite = profile_suite(first, "cancer", label="label")
    assert validate_frame(second, suite)["success"] is True
    for leak in (second["label"].astype("float64"), 1.0 - second["label"] * 0.5):
        assert _failed(validate_frame(second.assign(**{"mean texture": leak}), suite)) == [
            (PREDICTS, "mean texture")
        ]


def test_profiling_refuses_a_reference_that_almost_predicts_its_label():
    first, _ = _halves("breast_cancer", 0)
    rng = np.random.default_rng(1)
    noisy = first["label"].where(rng.random(len(first)) > 0.01, 1 - first["label"])
    with pytest.raises(ValueError, match=r"'mean texture' predicts the label 'label' with skill 0\.9"):
        profile_suite(first.assign(**{"mean texture": noisy * 10.0}), "leaky", label="label")
