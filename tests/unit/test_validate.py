"""The Great Expectations gate step: suites from files and code, the bad-input corpus, batches, profiling."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from airloop.cli import main as cli
from airloop.embedded.demo import generate
from airloop.steps.data import validate as step
from airloop.steps.data.profile import profile_suite
from airloop.steps.data.requests import ValidateRequest
from airloop.steps.data.validate import FINGERPRINT_CHECK, load_suite, validate, validate_frame
from airloop.tables import fingerprint, read_table, write_table
from airloop.validation import gated_run_tags

COLUMNS = "expect_table_columns_to_match_set"
ORDERED = "expect_table_columns_to_match_ordered_list"
TYPES = "expect_column_values_to_be_in_type_list"
VALUE_SET = "expect_column_values_to_be_in_set"
NOT_NULL = "expect_column_values_to_not_be_null"
BETWEEN = "expect_column_values_to_be_between"
ROWS = "expect_table_row_count_to_be_between"
UNIQUE = "expect_column_values_to_be_unique"
DIFFER = "expect_column_pair_values_to_differ"
PREDICTS = "expect_column_to_not_predict_label"
SUITE = str(Path(__file__).resolve().parents[2] / "dags" / "expectations" / "training_data.json")


def _run(tmp_path: Path, frame: pd.DataFrame, suite: object = SUITE, **extra: object) -> dict:
    uri = write_table(frame, str(tmp_path / "data.parquet"))
    return validate({"data_uri": uri, "suite": suite, **extra})


def _failed(result: dict) -> set[tuple[str, str | None]]:
    return {(item["expectation"], item["column"]) for item in result["failed"]}


def test_reference_data_passes_and_data_docs_are_built(tmp_path):
    result = _run(tmp_path, generate(500, seed=1), docs_dir=str(tmp_path / "docs"))
    assert result["success"] is True, result["failed"]
    assert result["evaluated"] == result["successful"] == len(load_suite(SUITE)["expectations"])
    assert (result["suite"], result["rows"], result["batches"]) == ("training_data", 500, 1)
    assert result["fingerprint"] == fingerprint(generate(500, seed=1))
    assert json.loads(json.dumps(result)) == result
    index = Path(result["docs_index"])
    assert index.is_file() and "training_data" in index.read_text()
    (page,) = (tmp_path / "docs" / "validations").rglob("*.html")
    assert "training_data" in page.read_text()


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


# The reference loop's own suite (dags/expectations/training_data.json) on its own kind of data.
REFERENCE_CORPUS: dict[str, tuple[Callable[[pd.DataFrame], pd.DataFrame], tuple[str, str | None]]] = {
    "column missing": (lambda f: f.drop(columns=["f5"]), (COLUMNS, None)),
    "column renamed": (lambda f: f.rename(columns={"f1": "F1"}), (COLUMNS, None)),
    "label copied into a new column": (_leak, (COLUMNS, None)),
    "label written over a feature": (lambda f: f.assign(f3=f["label"].astype("float64")), (PREDICTS, "f3")),
    "strings": (lambda f: f.assign(f3=f["f3"].astype(str)), (TYPES, "f3")),
    "nans": (_nans, (NOT_NULL, "f2")),
    "out of range": (_out_of_range, (BETWEEN, "f4")),
    "label not binary": (lambda f: f.assign(label=f["label"] * 2), (VALUE_SET, "label")),
    "too few rows": (lambda f: f.head(20), (ROWS, None)),
}


@pytest.mark.parametrize("case", list(REFERENCE_CORPUS))
def test_reference_suite_stops_bad_input_with_the_named_expectation(tmp_path, case):
    corrupt, expected = REFERENCE_CORPUS[case]
    result = _run(tmp_path, corrupt(generate(300, seed=4)))
    assert result["success"] is False
    assert expected in _failed(result)
    assert result["successful"] < result["evaluated"]
    json.dumps(result)


def _reference(rows: int = 600, seed: int = 0) -> pd.DataFrame:
    """The reference data plus what the loop's own lacks: a key, a category, a feature with some nulls."""
    frame = generate(rows, seed=seed)
    rng = np.random.default_rng(seed)
    frame.insert(0, "id", np.arange(rows, dtype="int64") + 1000 * seed)
    frame["segment"] = rng.choice(["retail", "online", "partner"], rows)
    frame.loc[rng.choice(rows, rows // 50, replace=False), "f6"] = np.nan  # 2% missing
    return frame


@pytest.fixture(scope="module")
def profiled(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("suite") / "profiled.yaml"
    assert (
        cli(
            [
                "suites",
                "profile",
                write_table(_reference(2000), str(path.with_suffix(".parquet"))),
                "--out",
                str(path),
                "--key",
                "id",
                "--label",
                "label",
            ]
        )
        == 0
    )
    return str(path)


def _duplicate_keys(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[len(frame) - 1, "id"] = frame.loc[0, "id"]
    return frame


def _more_nans(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[::10, "f6"] = np.nan  # 10% missing where the reference had 2%
    return frame


# Every case of the corpus, against a suite profiled from the reference: the named reason.
CORPUS: dict[str, tuple[Callable[[pd.DataFrame], pd.DataFrame], tuple[str, str | None]]] = {
    "column missing": (lambda f: f.drop(columns=["f5"]), (ORDERED, None)),
    "column renamed": (lambda f: f.rename(columns={"f1": "F1"}), (ORDERED, None)),
    "new column": (lambda f: f.assign(extra=1.0), (ORDERED, None)),
    "wrong dtype": (lambda f: f.assign(f3=f["f3"].astype(str)), (TYPES, "f3")),
    "NaNs above the allowed fraction": (_more_nans, (NOT_NULL, "f6")),
    "values out of range": (_out_of_range, (BETWEEN, "f4")),
    "unseen category": (
        lambda f: f.assign(segment=f["segment"].replace("partner", "wholesale")),
        (VALUE_SET, "segment"),
    ),
    "duplicated keys": (_duplicate_keys, (UNIQUE, "id")),
    "label leakage: the target among the features": (
        lambda f: f.assign(f5=f["label"].astype("float64")),
        (PREDICTS, "f5"),
    ),
    "too few rows": (lambda f: f.head(50), (ROWS, None)),
    "no rows": (lambda f: f.head(0), (ROWS, None)),
}


@pytest.mark.parametrize("batch_rows", [0, 128], ids=["whole", "batched"])
@pytest.mark.parametrize("case", list(CORPUS))
def test_corpus_stops_at_the_gate_with_a_named_reason(tmp_path, profiled, case, batch_rows):
    corrupt, expected = CORPUS[case]
    result = _run(tmp_path, corrupt(_reference(600, seed=1)), suite=profiled, batch_rows=batch_rows)
    assert result["success"] is False
    assert expected in _failed(result), result["failed"]
    json.dumps(result)


def test_profiled_suite_passes_its_reference_and_fresh_data_from_the_same_source(tmp_path, profiled):
    suite = load_suite(profiled)
    types = {item["type"] for item in suite["expectations"]}
    assert {ORDERED, ROWS, NOT_NULL, TYPES, BETWEEN, VALUE_SET, UNIQUE, PREDICTS} <= types
    f6 = next(e for e in suite["expectations"] if e["type"] == NOT_NULL and e["kwargs"]["column"] == "f6")
    assert f6["kwargs"]["mostly"] == pytest.approx(0.97)  # 2% nulls seen, 3% allowed
    sets = {
        e["kwargs"]["column"]: e["kwargs"]["value_set"]
        for e in suite["expectations"]
        if e["type"] == VALUE_SET
    }
    assert sets == {"segment": ["online", "partner", "retail"], "label": [0, 1]}
    assert not any(e["kwargs"].get("column") == "id" for e in suite["expectations"] if e["type"] == BETWEEN)
    reference = Path(profiled).with_suffix(".parquet")
    assert validate({"data_uri": str(reference), "suite_path": profiled})["success"] is True
    fresh = _run(tmp_path, _reference(600, seed=1), suite=profiled)
    assert fresh["success"] is True, fresh["failed"]


def test_profiling_refuses_a_reference_that_leaks_its_label():
    with pytest.raises(ValueError, match="'f5' equals the label"):
        profile_suite(_reference().assign(f5=lambda f: f["label"]), "leaky", label="label")
    with pytest.raises(ValueError, match="key column 'nope'"):
        profile_suite(_reference(), "s", key="nope")


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
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(Path(data).read_bytes()[:-100])
    for batch_rows in (0, 50):
        with pytest.raises(ValueError, match="truncated.parquet is not a readable parquet file"):
            validate({"data_uri": str(truncated), "suite_path": SUITE, "batch_rows": batch_rows})
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        validate({"data_uri": data, "suite_path": str(broken)})
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("name: s\nexpectations:\n  - type: expect_the_moon\n    kwargs: {}\n")
    with pytest.raises(ValueError, match="invalid expectation"):
        validate({"data_uri": data, "suite_path": str(unknown)})
    with pytest.raises(ValueError, match="batch_rows needs a parquet file"):
        generate(200).to_csv(tmp_path / "d.csv", index=False)
        validate({"data_uri": str(tmp_path / "d.csv"), "suite_path": SUITE, "batch_rows": 10})


@pytest.fixture
def suites_module(tmp_path, monkeypatch):
    (tmp_path / "team_suites.py").write_text(
        textwrap.dedent(f"""
        import json
        import great_expectations as gx

        def as_dict():
            with open({SUITE!r}) as handle:
                return json.load(handle)

        def as_gx():
            return gx.ExpectationSuite(name="coded", expectations=[
                gx.expectations.ExpectColumnValuesToNotBeNull(column="f0"),
                gx.expectations.ExpectColumnValuesToBeBetween(column="f1", min_value=-50, max_value=50),
            ])

        def broken():
            raise RuntimeError("no suite today")
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "team_suites"
    sys.modules.pop("team_suites", None)


def test_suites_as_code_yaml_and_json_agree(tmp_path, suites_module):
    frame = _out_of_range(generate(300, seed=4))
    as_yaml = tmp_path / "suite.yaml"
    as_yaml.write_text(yaml.safe_dump(load_suite(SUITE)))
    results = [
        _run(tmp_path, frame, suite=source)
        for source in (SUITE, str(as_yaml), f"{suites_module}:as_dict", load_suite(SUITE))
    ]
    assert all(r["failed"] == results[0]["failed"] and r["evaluated"] == 37 for r in results)
    coded = _run(tmp_path, frame.assign(f1=frame["f1"] * 100), suite=f"{suites_module}:as_gx")
    assert (coded["suite"], coded["evaluated"]) == ("coded", 2)
    assert _failed(coded) == {(BETWEEN, "f1")}
    with pytest.raises(ValueError, match="team_suites:broken cannot be loaded: RuntimeError: no suite today"):
        load_suite(f"{suites_module}:broken")
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_suite("team_suites:missing")


def test_a_dataframe_is_validated_in_process():
    frame = generate(400, seed=9)
    result = validate_frame(frame, SUITE)
    assert result["success"] is True and result["data"] == "dataframe"
    assert result["fingerprint"] == fingerprint(frame)
    counts = frame["label"].value_counts()
    assert result["statistics"]["label_counts"] == {str(k): int(v) for k, v in counts.items()}
    bad = validate_frame(frame.drop(columns=["f2"]), load_suite(SUITE))
    assert (COLUMNS, None) in _failed(bad)


def test_feast_training_set_is_checked_against_its_producers_fingerprint(tmp_path):
    """A training set (as a Feast retrieval writes it): a parquet URI plus its producer's fingerprint."""
    produced = generate(300, seed=5)
    uri = write_table(produced, str(tmp_path / "training_set.parquet"))
    said = fingerprint(produced)
    ok = validate({"data_uri": uri, "suite_path": SUITE, "expected_fingerprint": said})
    assert ok["success"] is True and ok["evaluated"] == 38
    assert validate({"data_uri": uri, "suite_path": SUITE, "expected_fingerprint": said["sha256"]})["success"]
    write_table(produced.assign(f0=produced["f0"] + 1e-6), uri)  # rewritten after the producer finished
    changed = validate({"data_uri": uri, "suite_path": SUITE, "expected_fingerprint": said})
    assert changed["success"] is False
    (failure,) = changed["failed"]
    assert failure["expectation"] == FINGERPRINT_CHECK
    assert failure["kwargs"]["sha256"] == said["sha256"] != failure["observed"]["sha256"]


# Expectations of every kind the batched path treats differently, most of them failing on this data
# so that counts, percentages, samples and observed values are compared, not just verdicts.
BATCH_SUITE = {
    "name": "batches",
    "expectations": [
        {"type": ORDERED, "kwargs": {"column_list": ["id", "f0", "f1", "n", "flag", "segment", "label"]}},
        {"type": "expect_table_column_count_to_equal", "kwargs": {"value": 7}},
        {"type": ROWS, "kwargs": {"min_value": 10, "max_value": 900}},
        {"type": "expect_column_to_exist", "kwargs": {"column": "missing"}},
        {"type": NOT_NULL, "kwargs": {"column": "n", "mostly": 0.99}},
        {"type": NOT_NULL, "kwargs": {"column": "f1"}},
        {"type": TYPES, "kwargs": {"column": "n", "type_list": ["int64"]}},
        {"type": TYPES, "kwargs": {"column": "flag", "type_list": ["bool"]}},
        {"type": BETWEEN, "kwargs": {"column": "f0", "min_value": -1.5, "max_value": 1.5, "mostly": 0.9}},
        {"type": BETWEEN, "kwargs": {"column": "n", "min_value": 0, "max_value": 50}},
        {"type": BETWEEN, "kwargs": {"column": "missing", "min_value": 0, "max_value": 1}},
        {"type": VALUE_SET, "kwargs": {"column": "segment", "value_set": ["a", "b"]}},
        {"type": "expect_column_values_to_match_regex", "kwargs": {"column": "segment", "regex": "^[ab]$"}},
        {"type": UNIQUE, "kwargs": {"column": "id"}},
        {"type": "expect_column_values_to_be_increasing", "kwargs": {"column": "id"}},
        {
            "type": "expect_column_mean_to_be_between",
            "kwargs": {"column": "f0", "min_value": 0.5, "max_value": 1},
        },
        {
            "type": "expect_column_quantile_values_to_be_between",
            "kwargs": {
                "column": "f1",
                "quantile_ranges": {
                    "quantiles": [0.1, 0.5, 0.9],
                    "value_ranges": [[None, None], [0.5, 1], [None, None]],
                },
            },
        },
        {
            "type": "expect_column_unique_value_count_to_be_between",
            "kwargs": {"column": "segment", "max_value": 2},
        },
        {
            "type": "expect_column_proportion_of_unique_values_to_be_between",
            "kwargs": {"column": "n", "min_value": 0.5},
        },
        {
            "type": "expect_column_pair_values_a_to_be_greater_than_b",
            "kwargs": {"column_A": "f0", "column_B": "f1", "mostly": 0.6},
        },
        {"type": "expect_compound_columns_to_be_unique", "kwargs": {"column_list": ["segment", "label"]}},
        {
            "type": "expect_multicolumn_sum_to_equal",
            "kwargs": {"column_list": ["id", "label"], "sum_total": 0},
        },
        {"type": DIFFER, "kwargs": {"column_A": "flag", "column_B": "label", "mostly": 0.6}},
        # Needs a column and the label whole: batched validation reads the two alone.
        {"type": PREDICTS, "kwargs": {"column": "segment", "label": "label"}},
        {"type": PREDICTS, "kwargs": {"column": "f0", "label": "label", "max_skill": -1.0}},
    ],
}


def _mixed(rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(
        {
            "id": np.arange(rows, dtype="int64"),
            "f0": rng.normal(size=rows),
            "f1": rng.normal(size=rows),
            "n": rng.integers(0, 60, rows),
            "flag": rng.random(rows) < 0.5,
            "segment": rng.choice(["a", "b", "c"], rows, p=[0.45, 0.45, 0.1]),
            "label": rng.integers(0, 2, rows),
        }
    )
    frame.loc[rows - 3, "id"] = 17  # a duplicate key far from its twin: in another batch
    frame.loc[[5, 6], "f1"] = np.nan
    return frame


def test_batches_give_exactly_the_whole_table_result(tmp_path, monkeypatch):
    frame = _mixed(1000)
    path = tmp_path / "mixed.parquet"
    table = pa.Table.from_pandas(frame, preserve_index=False)
    # n is a plain int64 column whose only null sits in the last row group: whole, it reads as float64.
    n = pa.array(frame["n"].tolist()[:-1] + [None], pa.int64())
    pq.write_table(table.set_column(table.schema.get_field_index("n"), "n", n), path, row_group_size=300)
    whole = validate(
        {"data_uri": str(path), "suite": BATCH_SUITE, "batch_rows": 0, "docs_dir": str(tmp_path / "whole")}
    )
    batched = validate(
        {"data_uri": str(path), "suite": BATCH_SUITE, "batch_rows": 97, "docs_dir": str(tmp_path / "batched")}
    )
    assert (whole["batches"], batched["batches"]) == (1, 11)
    failing = {item["expectation"] for item in whole["failed"]}
    assert len(whole["failed"]) >= 15 and {UNIQUE, "expect_column_values_to_be_increasing", TYPES} <= failing
    assert [f["column"] for f in whole["failed"] if f["expectation"] == PREDICTS] == ["f0"]
    assert {k: v for k, v in batched.items() if k not in ("batches", "docs_index")} == {
        k: v for k, v in whole.items() if k not in ("batches", "docs_index")
    }
    assert whole["fingerprint"] == fingerprint(read_table(str(path)))
    assert Path(batched["docs_index"]).is_file()
    (page,) = (tmp_path / "batched" / "validations").rglob("*.html")
    assert "unexpected" in page.read_text()
    monkeypatch.setattr(step, "AUTO_BATCH_ABOVE", 500)
    monkeypatch.setattr(step, "AUTO_BATCH_ROWS", 400)
    auto = validate({"data_uri": str(path), "suite": BATCH_SUITE})
    assert auto["batches"] == 3 and auto["failed"] == whole["failed"]


def test_the_gated_run_refuses_data_that_changed_after_validation(tmp_path):
    frame = generate(300, seed=2)
    uri = write_table(frame, str(tmp_path / "train.parquet"))
    summary = {**validate({"data_uri": uri, "suite_path": SUITE}), "data_uri": uri, "docs_uri": "s3://d"}
    tags = gated_run_tags(summary, uri, fingerprint(frame))
    assert tags == {
        "airloop.validation.success": "true",
        "airloop.validation.suite": "training_data",
        "airloop.validation.expectations": "37/37",
        "airloop.validation.docs": "s3://d",
    }
    with pytest.raises(ValueError, match="changed since it was validated"):
        gated_run_tags(summary, uri, fingerprint(frame.head(299)))
    assert gated_run_tags(None, uri, fingerprint(frame)) == {}


def test_the_typed_request_and_its_dict_validate_alike(tmp_path):
    uri = write_table(generate(300, seed=8), str(tmp_path / "data.parquet"))
    typed = ValidateRequest(data_uri=uri, suite_path=SUITE, label_column="f0", data_name="lake/t.parquet")
    result = validate(typed)
    assert result == validate(typed.to_dict()) and result["data"] == "lake/t.parquet"
    assert len(result["statistics"]["label_counts"]) == 300  # counted per value of the label_column
    with pytest.raises(ValueError, match=r"ValidateRequest: unknown field\(s\) \['label'\]"):
        validate({"data_uri": uri, "suite_path": SUITE, "label": "f0"})
