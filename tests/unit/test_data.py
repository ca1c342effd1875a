from __future__ import annotations

import os

import pandas as pd
import pytest
from sklearn.neural_network import MLPClassifier

from airloop.embedded.demo import FEATURES, LABEL, generate
from airloop.tables import fingerprint, read_table, write_table


def _fit(frame: pd.DataFrame) -> MLPClassifier:
    model = MLPClassifier((32, 16), max_iter=300, early_stopping=True, random_state=0)
    return model.fit(frame[FEATURES], frame[LABEL])


def _accuracy(model: MLPClassifier, frame: pd.DataFrame) -> float:
    return float(model.score(frame[FEATURES], frame[LABEL]))


def test_generate_is_deterministic_and_shaped():
    first, again = generate(300, shift=0.4, seed=7), generate(300, shift=0.4, seed=7)
    pd.testing.assert_frame_equal(first, again)
    assert list(first.columns) == [*FEATURES, LABEL]
    assert set(first[LABEL].unique()) == {0, 1}
    assert first[LABEL].dtype == "int64" and all(first[f].dtype == "float64" for f in FEATURES)
    assert not generate(300, shift=0.4, seed=8).equals(first)


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="shift"):
        generate(10, shift=1.5)
    with pytest.raises(ValueError, match="n_rows"):
        generate(0)


def test_shift_degrades_a_stale_model_and_retraining_recovers():
    stale = _fit(generate(3000, shift=0.0, seed=0))
    shifted_eval = generate(2000, shift=1.0, seed=2)
    assert _accuracy(stale, generate(2000, shift=0.0, seed=1)) >= 0.88
    assert _accuracy(stale, shifted_eval) <= 0.78
    assert _accuracy(_fit(generate(3000, shift=1.0, seed=3)), shifted_eval) >= 0.88
    # The covariates move too, so a drift monitor has something to see.
    assert shifted_eval["f0"].mean() - generate(2000, seed=1)["f0"].mean() > 1.0


def test_fingerprint_is_stable_and_content_sensitive():
    frame = generate(200, seed=1)
    print_ = fingerprint(frame)
    assert print_ == fingerprint(generate(200, seed=1))
    assert print_["rows"] == 200 and print_["columns"]["label"] == "int64"
    changed = frame.copy()
    changed.loc[5, "f3"] += 1e-9
    assert fingerprint(changed)["sha256"] != print_["sha256"]
    assert fingerprint(frame.rename(columns={"f0": "g0"}))["sha256"] != print_["sha256"]


def test_write_then_read_parquet_csv_and_fsspec(tmp_path):
    frame = generate(50, seed=3)
    target = tmp_path / "nested" / "data.parquet"
    assert write_table(frame, str(target)) == str(target)
    assert os.listdir(target.parent) == ["data.parquet"]  # no temporary file left behind
    pd.testing.assert_frame_equal(read_table(str(target)), frame)
    pd.testing.assert_frame_equal(read_table(target.as_uri()), frame)
    frame.to_csv(tmp_path / "data.csv", index=False)
    pd.testing.assert_frame_equal(read_table(str(tmp_path / "data.csv")), frame)
    write_table(frame, "memory://airloop-test/data.parquet")
    pd.testing.assert_frame_equal(read_table("memory://airloop-test/data.parquet"), frame)


def test_read_table_names_the_file_and_the_problem(tmp_path):
    missing = tmp_path / "missing.parquet"
    with pytest.raises(ValueError, match=f"{missing}.*does not exist"):
        read_table(str(missing))
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.parquet is empty"):
        read_table(str(empty))
    whole = tmp_path / "whole.parquet"
    write_table(generate(500), str(whole))
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.parquet is not a readable parquet file"):
        read_table(str(truncated))
