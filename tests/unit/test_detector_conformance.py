"""The drift detector conformance suite (``airloop.steps.drift.checks.check_detector``) over every backend.

SciPy's backend runs in this process; alibi-detect's in the ``serving`` runtime (per-feature methods)
and the ``torch`` runtime (its ``mmd`` method too), each in one subprocess, skipped with the reason
when the runtime is missing. Detectors broken on purpose show that the suite fails, naming the check.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import numpy as np
import pandas as pd
import pytest

from airloop import runtimes
from airloop.steps.drift.base import DETECTORS, PER_FEATURE
from airloop.steps.drift.checks import check_detector
from airloop.steps.drift.scipy import ScipyDetector

GENERAL = ["constructor_only_stores_parameters", "bad_parameters_are_named"]
PER_METHOD = [
    "no_drift_without_a_shift",
    "a_numeric_shift_is_flagged_alone",
    "a_categorical_shift_is_flagged_alone",
    "flags_are_the_shared_correction",
    "the_same_data_gives_the_same_scores",
    "missing_values_are_dropped_per_feature",
    "a_window_without_a_feature_is_refused",
]
ALL_PER_FEATURE = GENERAL + [f"{method}: {name}" for method in PER_FEATURE for name in PER_METHOD]
_IN_RUNTIME = (
    "import json, warnings; warnings.simplefilter('ignore'); "
    "from airloop.steps.drift.checks import check_detector; print(json.dumps(check_detector('alibi')))"
)


def test_the_scipy_backend_conforms() -> None:
    assert check_detector("scipy") == ALL_PER_FEATURE
    assert check_detector(ScipyDetector) == ALL_PER_FEATURE


def _runtime_python(name: str) -> str:
    try:
        return runtimes.python(name)
    except (runtimes.RuntimeMissingError, ValueError) as error:
        pytest.skip(f"alibi backend not checked in the {name!r} runtime: {error}")


@pytest.mark.parametrize(("runtime", "joint"), [("serving", []), ("torch", ["mmd: joint_test"])])
def test_the_alibi_backend_conforms_in_its_runtimes(runtime: str, joint: list[str]) -> None:
    # The serving runtime has no PyTorch, so alibi's mmd is checked where it runs: the torch runtime.
    done = subprocess.run(
        [_runtime_python(runtime), "-c", _IN_RUNTIME], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ALL_PER_FEATURE + joint


def test_every_registered_backend_is_checked() -> None:
    assert DETECTORS.available() == ["alibi", "scipy"]  # each has its test above


class _Blind(ScipyDetector):
    """Never sees a change."""

    def _test_feature(self, fitted: Any, current: np.ndarray, categorical: bool) -> tuple[float, float]:
        return 0.0, 0.5


class _Eager(ScipyDetector):
    """Does work in its constructor."""

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.features_: list[str] = []


class _Uncorrected(ScipyDetector):
    """Flags every p-value under p_val: no correction for testing several features."""

    def score(self, current: pd.DataFrame) -> dict[str, Any]:
        scores = super().score(current)
        for entry in scores.values():
            entry["drift"] = entry["p_value"] is not None and entry["p_value"] < self.p_val
        return scores


@pytest.mark.parametrize(
    ("broken", "check"),
    [
        (_Blind, "ks: a_numeric_shift_is_flagged_alone"),
        (_Eager, "constructor_only_stores_parameters"),
        (_Uncorrected, "ks: flags_are_the_shared_correction"),
    ],
)
def test_a_detector_that_breaks_the_contract_fails_naming_the_check(broken: type, check: str) -> None:
    with pytest.raises(AssertionError, match=rf"{broken.__name__} fails check '{check}'"):
        check_detector(broken)


def test_only_detectors_are_checked() -> None:
    with pytest.raises(AssertionError, match="not a Detector subclass"):
        check_detector(dict)
    with pytest.raises(ValueError, match=r"unknown drift backend 'nope'.*\['alibi', 'scipy'\]"):
        check_detector("nope")
