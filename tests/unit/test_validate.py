from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from airloop.steps.data import generate, write_table
from airloop.steps.validate import load_suite, profile_suite, validate

COLUMNS = "expect_table_columns_to_match_set"
TYPES = "expect_column_values_to_be_in_type_list"
VALUE_SET = "expect_column_values_to_be_in_set"
SUITE = str(Path(__file__).resolve().parents[2] / "dags" / "expectations" / "training_data.json")


def _run(tmp_path: Path, frame: pd.DataFrame, **extra: object) -> dict:
    uri = write_table(frame, str(tmp_path / "data.parquet"))
    return validate({"data_uri": uri, "suite_path": SUITE, **extra})


def _failed(result: dict) -> set[tuple[str, str | None]]:
    return {(item["expectation"], item["column"]) for item in result["failed"]}


def test_reference_data_passes_and_data_docs_are_built(tmp_path):
    result = _run(tmp_path, generate(500, seed=1), docs_dir=str(tmp_path / "docs"))
    assert result["success"] is True, result["failed"]
    assert result["evaluated"] == result["successful"] == len(load_suite(SUITE)["expectations"])
    assert result["suite"] == "training_data"
    assert result["fingerprint"]["rows"] == 500
    assert json.loads(json.dumps(result)) == result
    index = Path(result["docs_index"])
    assert index.is_file() and "training_data" in index.read_text()
    assert list((tmp_path / "docs" / "validations").rglob("*.html"))


def test_shifted_data_is_still_accepted(tmp_path):
    result = _run(tmp_path, generate(2000, shift=1.0, seed=2))
    assert result["success"] is True, result["failed"]
    assert result["docs_index"] is None


def _leak(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(f8=frame["label"])


def _nans(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[::10, "f2"] = np.nan
    return frame


def _out_of_range(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[3, "f4"] = 1e6
    return frame


BAD_INPUTS: dict[str, tuple[Callable[[pd.DataFrame], pd.DataFrame], tuple[str, str | None]]] = {
    "column missing": (lambda f: f.drop(columns=["f5"]), (COLUMNS, None)),
    "column renamed": (lambda f: f.rename(columns={"f1": "F1"}), (COLUMNS, None)),
    "label leaked as a feature": (_leak, (COLUMNS, None)),
    "strings": (lambda f: f.assign(f3=f["f3"].astype(str)), (TYPES, "f3")),
    "nans": (_nans, ("expect_column_values_to_not_be_null", "f2")),
    "out of range": (_out_of_range, ("expect_column_values_to_be_between", "f4")),
    "label not binary": (lambda f: f.assign(label=f["label"] * 2), (VALUE_SET, "label")),
    "too few rows": (lambda f: f.head(20), ("expect_table_row_count_to_be_between", None)),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_with_the_named_expectation(tmp_path, case):
    corrupt, expected = BAD_INPUTS[case]
    result = _run(tmp_path, corrupt(generate(300, seed=4)))
    assert result["success"] is False
    assert expected in _failed(result)
    assert result["successful"] < result["evaluated"]
    json.dumps(result)


def test_failure_reports_what_was_observed(tmp_path):
    result = _run(tmp_path, _out_of_range(generate(300, seed=4)))
    (failure,) = result["failed"]
    assert failure["kwargs"] == {"column": "f4", "min_value": -50.0, "max_value": 50.0}
    assert failure["observed"]["unexpected_count"] == 1
    assert failure["observed"]["sample"] == [1e6]


def test_unreadable_data_and_bad_suites_raise(tmp_path):
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        validate({"data_uri": str(empty), "suite_path": SUITE})
    data = write_table(generate(200), str(tmp_path / "ok.parquet"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        validate({"data_uri": data, "suite_path": str(broken)})
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("name: s\nexpectations:\n  - type: expect_the_moon\n    kwargs: {}\n")
    with pytest.raises(ValueError, match="invalid expectation"):
        validate({"data_uri": data, "suite_path": str(unknown)})


def test_profiled_suite_accepts_its_source_and_rejects_a_new_column(tmp_path):
    suite = profile_suite(generate(1000, seed=5), "profiled")
    types = {item["type"] for item in suite["expectations"]}
    assert {"expect_column_values_to_be_between", "expect_column_values_to_be_in_set"} <= types
    path = tmp_path / "profiled.json"
    path.write_text(json.dumps(suite))
    good = write_table(generate(500, seed=6), str(tmp_path / "good.parquet"))
    assert validate({"data_uri": good, "suite_path": str(path)})["success"] is True
    bad = write_table(_leak(generate(500, seed=6)), str(tmp_path / "bad.parquet"))
    result = validate({"data_uri": bad, "suite_path": str(path)})
    assert (COLUMNS, None) in _failed(result)
