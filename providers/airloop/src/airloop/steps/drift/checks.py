"""The drift detector conformance suite, as scikit-learn's ``check_estimator``: what ``detect`` relies on.

``check_detector(ScipyDetector)`` (or a registered name, ``check_detector("alibi")``) runs every
check and raises AssertionError naming the first that fails; it returns the names of the checks
run. Every backend passes it (tests/unit/test_detector_conformance.py runs it over SciPy here and
over alibi-detect in the ``serving`` runtime). The contract:

- the constructor only stores its parameters; ``check_params`` names a bad one; ``score`` before
  ``fit`` raises;
- for every per-feature method (``ks``, ``cvm``): no drift on a window from the reference's
  distribution; a shifted numeric feature, and a categorical one whose shares moved (with a category
  the reference never saw), are flagged alone; one entry per reference feature, in order, with the
  documented keys; flags are the shared multiple-testing correction (``base.flag``) of its p-values;
  the same data always gives the same scores;
- missing values are dropped per feature; a feature left with fewer than ``min_rows`` values is
  reported untested; a window that lacks a feature raises, naming it; extra columns are ignored;
- each multivariate method (``joint_methods``) whose dependencies are present: no drift without a
  shift, and a shift flags every feature with the one joint p-value.

The data are seeded and small (1,000 reference rows, 600 in a window, 300 of each for a
multivariate method): the suite runs in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from airloop.steps.drift.base import CORRECTIONS, PER_FEATURE, Detector, flag, get
from airloop.steps.drift.requests import FeatureScore

if TYPE_CHECKING:
    import pandas as pd

_SEED = 20240611
_REFERENCE_ROWS, _WINDOW_ROWS, _JOINT_ROWS = 1000, 600, 300
NUMERIC = ["x0", "x1", "x2"]
CATEGORICAL = ["colour", "flag"]
FEATURES = [*NUMERIC, *CATEGORICAL]
# A shift every test must see: 0.5 standard deviations on 600 rows (p ~ 1e-15).
_SHIFT = 0.5
_SCORE_KEYS = FeatureScore.__required_keys__


def check_detector(detector: type[Detector] | str) -> list[str]:
    """Run the conformance suite on a Detector subclass or a registered backend's name."""
    cls = get(detector) if isinstance(detector, str) else detector
    _expect(isinstance(cls, type) and issubclass(cls, Detector), f"{cls!r} is not a Detector subclass")
    passed = []
    for name, check in _checks(cls):
        try:
            check()
        except AssertionError as failure:
            raise AssertionError(f"{cls.__name__} fails check {name!r}: {failure}") from failure
        passed.append(name)
    return passed


def _checks(cls: type[Detector]) -> list[tuple[str, Callable[[], None]]]:
    """``(name, check)`` for every check of ``cls``: per-feature checks once per method."""
    found: list[tuple[str, Callable[[], None]]] = [
        ("constructor_only_stores_parameters", partial(_constructor_only_stores_parameters, cls)),
        ("bad_parameters_are_named", partial(_bad_parameters_are_named, cls)),
    ]
    for method in PER_FEATURE:
        found.extend(
            (f"{method}: {name}", partial(check, cls, method)) for name, check in _PER_FEATURE.items()
        )
    for method in cls.joint_methods:
        try:
            cls(method=method).check_params()
        except ImportError:  # its library is not in this environment: the check runs where it is
            continue
        found.append((f"{method}: joint_test", partial(_joint_test, cls, method)))
    return found


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _frames(
    *, shift: float = 0.0, colours: tuple[float, float, float] = (0.5, 0.3, 0.2), seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A reference and a window, three standard normal features (x0 moved by ``shift`` in the window),
    a colour (the window's shares ``colours`` of red, green, blue) and a flag."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(_SEED + seed)

    def frame(rows: int, moved: float, shares: tuple[float, ...]) -> pd.DataFrame:
        table = pd.DataFrame({name: rng.normal(0.0, 1.0, rows) for name in NUMERIC})
        table["x0"] += moved
        table["colour"] = rng.choice(["red", "green", "blue"], rows, p=list(shares))
        table["flag"] = rng.random(rows) < 0.3
        return table

    return frame(_REFERENCE_ROWS, 0.0, (0.5, 0.3, 0.2)), frame(_WINDOW_ROWS, shift, colours)


def _scores(
    cls: type[Detector], method: str, reference: pd.DataFrame, window: pd.DataFrame, **params: Any
) -> dict[str, FeatureScore]:
    detector = cls(method=method, categorical=CATEGORICAL, **params)
    return detector.fit(reference).score(window)


def _drifted(scores: dict[str, FeatureScore]) -> list[str]:
    return [feature for feature, score in scores.items() if score["drift"]]


def _constructor_only_stores_parameters(cls: type[Detector]) -> None:
    _expect(isinstance(getattr(cls, "name", None), str), "the class has no registered 'name'")
    params: dict[str, Any] = {
        "p_val": 0.01,
        "correction": "fdr",
        "categorical": ["colour"],
        "min_rows": 7,
        "method": "cvm",
    }
    detector = cls(**params)
    _expect(detector.get_params() == params, f"get_params() gave {detector.get_params()}, not {params}")
    _expect(not hasattr(detector, "features_"), "the constructor fitted something")
    try:
        detector.score(_frames()[1])
    except RuntimeError as error:
        _expect("not fitted" in str(error), f"score before fit raised {error!r}, not 'not fitted'")
    else:
        raise AssertionError("score before fit did not raise")


def _bad_parameters_are_named(cls: type[Detector]) -> None:
    reference = _frames()[0]
    bad: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"p_val": 1.5}, ValueError, "p_val"),
        ({"p_val": 0}, ValueError, "p_val"),
        ({"correction": "holm"}, ValueError, "correction"),
        ({"min_rows": 0}, ValueError, "min_rows"),
        ({"method": "nope"}, ValueError, "nope"),
        ({"categorical": "colour"}, TypeError, "list of column names"),
        ({"categorical": ["shade"]}, ValueError, "shade"),
    ]
    for params, kind, named in bad:
        try:
            cls(**params).fit(reference)
        except kind as error:
            _expect(
                named in str(error), f"{params}: {type(error).__name__} {error!r} does not name {named!r}"
            )
        else:
            raise AssertionError(f"{params} was accepted")


def _no_drift_without_a_shift(cls: type[Detector], method: str) -> None:
    reference, window = _frames()
    scores = _scores(cls, method, reference, window.assign(extra="ignored"))
    _expect(list(scores) == FEATURES, f"entries {list(scores)}, expected one per feature {FEATURES}")
    for feature, score in scores.items():
        _expect(set(score) == _SCORE_KEYS, f"{feature}: keys {sorted(score)}, expected {sorted(_SCORE_KEYS)}")
        categorical = feature in CATEGORICAL
        kind, test = ("categorical", "chi2") if categorical else ("numeric", method)
        _expect((score["kind"], score["test"]) == (kind, test), f"{feature}: {score['kind']}/{score['test']}")
        _expect(score["tested"] and score["p_value"] is not None, f"{feature} was not tested")
        _expect((score["n_ref"], score["n_cur"]) == (_REFERENCE_ROWS, _WINDOW_ROWS), f"{feature}: sizes")
        _expect((score["ref_mean"] is None) == categorical, f"{feature}: ref_mean {score['ref_mean']}")
    _expect(not _drifted(scores), f"drift without a shift: {_drifted(scores)}")


def _a_numeric_shift_is_flagged_alone(cls: type[Detector], method: str) -> None:
    scores = _scores(cls, method, *_frames(shift=_SHIFT))
    _expect(_drifted(scores) == ["x0"], f"a shift of x0 flagged {_drifted(scores)}")
    x0 = scores["x0"]
    _expect(x0["p_value"] is not None and x0["p_value"] < 1e-6, f"x0's p-value {x0['p_value']}")
    moved = (x0["cur_mean"] or 0.0) - (x0["ref_mean"] or 0.0)
    _expect(abs(moved - _SHIFT) < 0.15, f"x0's means moved by {moved}, not about {_SHIFT}")


def _a_categorical_shift_is_flagged_alone(cls: type[Detector], method: str) -> None:
    reference, window = _frames(colours=(0.3, 0.3, 0.4))
    window.loc[window.index[:30], "colour"] = "purple"  # never seen in the reference
    scores = _scores(cls, method, reference, window)
    _expect(_drifted(scores) == ["colour"], f"a shift of colour flagged {_drifted(scores)}")


def _flags_are_the_shared_correction(cls: type[Detector], method: str) -> None:
    reference, window = _frames(shift=0.12, seed=1)  # a mild shift: p-values on both sides of the bounds
    for correction in CORRECTIONS:
        scores = _scores(cls, method, reference, window, correction=correction, p_val=0.2)
        p_values = [float(score["p_value"] or 1.0) for score in scores.values()]
        expected = flag(p_values, 0.2, correction)
        _expect(
            [score["drift"] for score in scores.values()] == expected,
            f"{correction}: flags {[s['drift'] for s in scores.values()]} for p-values {p_values}",
        )


def _the_same_data_gives_the_same_scores(cls: type[Detector], method: str) -> None:
    reference, window = _frames(shift=0.2)
    detector = cls(method=method, categorical=CATEGORICAL).fit(reference)
    first = detector.score(window)
    _expect(detector.score(window) == first, "scoring the same window twice gave different scores")
    again = _scores(cls, method, reference.copy(), window.copy())
    _expect(again == first, "a detector fitted again on the same reference scored differently")


def _missing_values_are_dropped_per_feature(cls: type[Detector], method: str) -> None:
    import numpy as np

    reference, window = _frames()
    window.loc[window.index[:180], "x1"] = np.nan
    window["x2"] = np.nan
    window["flag"] = window["flag"].astype(object)
    window.loc[window.index[:150], "flag"] = None
    scores = _scores(cls, method, reference, window, min_rows=50)
    sparse, empty = scores["x1"], scores["x2"]
    _expect(sparse["tested"] and sparse["n_cur"] == _WINDOW_ROWS - 180, f"x1: {sparse}")
    _expect(
        math.isclose(sparse["nan_fraction_cur"], 0.3), f"x1's nan_fraction_cur {sparse['nan_fraction_cur']}"
    )
    _expect(
        (empty["tested"], empty["p_value"], empty["drift"], empty["nan_fraction_cur"])
        == (False, None, False, 1.0),
        f"an empty x2 was scored {empty}",
    )
    _expect(
        scores["flag"]["tested"] and scores["flag"]["n_cur"] == _WINDOW_ROWS - 150, f"flag: {scores['flag']}"
    )
    _expect(all(scores[f]["tested"] for f in ("x0", "colour")), "a feature without holes lost its test")
    _expect(not _drifted(scores), f"holes made drift: {_drifted(scores)}")
    few = _scores(cls, method, reference, window.head(40), min_rows=50)
    _expect(not any(score["tested"] for score in few.values()), "features below min_rows were tested")


def _a_window_without_a_feature_is_refused(cls: type[Detector], method: str) -> None:
    reference, window = _frames()
    detector = cls(method=method, categorical=CATEGORICAL).fit(reference)
    try:
        detector.score(window.drop(columns=["x2"]))
    except ValueError as error:
        _expect("x2" in str(error), f"the error {error!r} does not name x2")
    else:
        raise AssertionError("a window without x2 was scored")


_PER_FEATURE: dict[str, Callable[[type[Detector], str], None]] = {
    "no_drift_without_a_shift": _no_drift_without_a_shift,
    "a_numeric_shift_is_flagged_alone": _a_numeric_shift_is_flagged_alone,
    "a_categorical_shift_is_flagged_alone": _a_categorical_shift_is_flagged_alone,
    "flags_are_the_shared_correction": _flags_are_the_shared_correction,
    "the_same_data_gives_the_same_scores": _the_same_data_gives_the_same_scores,
    "missing_values_are_dropped_per_feature": _missing_values_are_dropped_per_feature,
    "a_window_without_a_feature_is_refused": _a_window_without_a_feature_is_refused,
}


def _joint_test(cls: type[Detector], method: str) -> None:
    """A multivariate method on the numeric features: one test, its p-value on every feature."""
    for shift, drifts in ((0.0, False), (1.0, True)):
        reference, window = _frames(shift=shift)
        # Fewer rows: a permutation test costs O((n + m)^2) per permutation.
        sample = reference[NUMERIC].head(_JOINT_ROWS), window[NUMERIC].head(_JOINT_ROWS)
        scores = cls(method=method).fit(sample[0]).score(sample[1])
        p_values = {score["p_value"] for score in scores.values()}
        _expect(len(p_values) == 1, f"features carry different p-values {p_values}, not the one joint test")
        _expect(all(score["test"] == method for score in scores.values()), f"tests {scores}")
        _expect(
            all(score["drift"] is drifts for score in scores.values()),
            f"shift {shift}: flags {[s['drift'] for s in scores.values()]}, expected all {drifts}",
        )
