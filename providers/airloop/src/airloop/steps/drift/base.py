"""The drift detector interface and its registry.

With a per-feature method (every backend) a detector compares one feature at a time: numeric
features with a two-sample Kolmogorov-Smirnov (``ks``) or Cramer-von Mises (``cvm``) test,
categorical features with a chi-squared test on the category counts. Missing values are dropped per
feature, so one sparse column does not cost the others their rows. A backend may offer a
multivariate method too (``joint_methods``): one test of all the features together, on the rows
complete in every feature. The multiple-testing correction across
tests lives here, once, so every backend flags drift the same way; a backend only supplies the tests.

Shaped after scikit-learn estimators: the constructor only stores its parameters, ``fit`` learns
from the reference, ``score`` judges a window. Backends are registered by name in ``DETECTORS``
(``airloop.backends.Registry``: lazy ``"module:Class"`` paths, so neither SciPy's nor alibi-detect's
backend module loads until a detection asks for it) and every one passes the conformance suite
``airloop.steps.drift.checks.check_detector``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

from airloop.backends import Registry

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from airloop.steps.drift.requests import FeatureScore

CORRECTIONS = ("bonferroni", "fdr")
PER_FEATURE = ("ks", "cvm")  # the test of numeric features; categorical ones always get chi-squared
_PARALLEL_ROWS = 20_000  # windows from this size test their features on several threads


def flag(p_values: Sequence[float], p_val: float, correction: str) -> list[bool]:
    """Per-test drift flags after correcting for testing several features at once.

    ``bonferroni`` bounds the chance of any false alarm by ``p_val``; ``fdr`` (Benjamini-Hochberg)
    bounds the expected share of false alarms among the flagged features, and flags more when many
    features move. Both use a strict ``<`` like alibi-detect, so the backends agree at the boundary.
    """
    import numpy as np

    _check_correction(correction)
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    if m == 0:
        return []
    if correction == "bonferroni":
        return (p < p_val / m).tolist()
    ranked = np.sort(p)
    below = np.nonzero(ranked < p_val * np.arange(1, m + 1) / m)[0]
    if len(below) == 0:
        return [False] * m
    return (p <= ranked[below[-1]]).tolist()


class Detector(ABC):
    """Two-sample drift tests (per feature, or of all features together) with a multiple-testing correction.

    ``min_rows`` is the fewest non-missing values a feature needs on each side to be tested (with a
    multivariate method: the fewest complete rows); a feature below it is reported with
    ``"tested": False`` instead of a p-value. ``method`` is one of the backend's ``methods``.
    ``check_params`` (also run by ``fit``) raises ``ValueError`` naming a bad parameter.

    ``name`` is what the backend is registered as; error messages use it.
    """

    name: ClassVar[str]
    joint_methods: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        p_val: float = 0.05,
        correction: str = "bonferroni",
        categorical: Sequence[str] = (),
        min_rows: int = 1,
        method: str = "ks",
    ) -> None:
        self.p_val = p_val
        self.correction = correction
        self.categorical = categorical
        self.min_rows = min_rows
        self.method = method

    def get_params(self) -> dict[str, Any]:
        return {
            "p_val": self.p_val,
            "correction": self.correction,
            "categorical": self.categorical,
            "min_rows": self.min_rows,
            "method": self.method,
        }

    def check_params(self) -> None:
        if not isinstance(self.p_val, (int, float)) or not 0 < self.p_val < 1:
            raise ValueError(f"p_val must be between 0 and 1 (exclusive), got {self.p_val!r}")
        _check_correction(self.correction)
        if not isinstance(self.min_rows, int) or self.min_rows < 1:
            raise ValueError(f"min_rows must be a positive integer, got {self.min_rows!r}")
        if isinstance(self.categorical, str):
            raise TypeError(f"categorical must be a list of column names, got {self.categorical!r}")
        if self.method not in (*PER_FEATURE, *self.joint_methods):
            raise ValueError(
                f"the {self.name!r} drift backend has no method {self.method!r}: "
                f"choose one of {[*PER_FEATURE, *self.joint_methods]}"
            )
        if self.method in self.joint_methods and self.categorical:
            raise ValueError(
                f"method {self.method!r} compares numeric features only, and "
                f"{list(self.categorical)} are categorical: leave them out of the features, "
                f"or use a per-feature method {list(PER_FEATURE)}"
            )

    def fit(self, reference: pd.DataFrame) -> Detector:
        """Learn the reference distribution of every column of ``reference``."""
        self.check_params()
        unknown = sorted(set(self.categorical) - set(reference.columns))
        if unknown:
            raise ValueError(f"categorical features not in the reference: {unknown}")
        self.features_ = list(reference.columns)
        self.categories_: dict[str, Any] = {}
        self.reference_: dict[str, dict[str, Any]] = {}
        self._fitted: dict[str, Any] = {}
        self._joint: Any = None
        for feature in self.features_:
            column = reference[feature]
            values = column.dropna().to_numpy()
            summary: dict[str, Any] = {
                "n": len(values),
                "nan_fraction": _fraction(column.isna().sum(), len(column)),
            }
            if feature in self.categorical:
                import pandas as pd

                self.categories_[feature] = pd.Index(pd.unique(values))
                values = self.categories_[feature].get_indexer(values)
            else:
                values = values.astype(float)
                summary["mean"] = float(values.mean()) if len(values) else None
            self.reference_[feature] = summary
            if self.method in PER_FEATURE and len(values) >= self.min_rows:
                self._fitted[feature] = self._fit_feature(values, feature in self.categorical)
        if self.method in self.joint_methods:
            complete = reference.dropna()
            if len(complete) >= self.min_rows:
                self._joint = self._fit_joint(complete.to_numpy(float))
        return self

    def score(self, current: pd.DataFrame) -> dict[str, FeatureScore]:
        """Test every fitted feature of ``current`` (extra columns are ignored), in the reference's order.

        With a multivariate method every feature carries the one joint test's statistic, p-value and flag.
        """
        if not hasattr(self, "features_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(reference) first")
        missing = [f for f in self.features_ if f not in current.columns]
        if missing:
            raise ValueError(f"current window lacks the features {missing}")
        scores: dict[str, FeatureScore] = {}
        # One entry per test: (the features it covers, a call returning (statistic, p_value)).
        tests: list[tuple[list[str], Callable[[], tuple[float, float]]]] = []
        for feature in self.features_:
            column = current[feature]
            values = column.dropna().to_numpy()
            categorical = feature in self.categorical
            ref = self.reference_[feature]
            entry: FeatureScore = {
                "kind": "categorical" if categorical else "numeric",
                "test": "chi2" if categorical else self.method,
                "tested": False,
                "statistic": None,
                "p_value": None,
                "drift": False,
                "ref_mean": ref.get("mean"),
                "cur_mean": None,
                "n_ref": ref["n"],
                "n_cur": len(values),
                "nan_fraction_ref": ref["nan_fraction"],
                "nan_fraction_cur": _fraction(column.isna().sum(), len(column)),
            }
            if categorical:
                values = self._encode(feature, values)
            else:
                values = values.astype(float)
                entry["cur_mean"] = float(values.mean()) if len(values) else None
            if feature in self._fitted and len(values) >= self.min_rows:
                test = partial(self._test_feature, self._fitted[feature], values, categorical)
                tests.append(([feature], test))
            scores[feature] = entry
        if self._joint is not None:
            complete = current[self.features_].dropna()
            if len(complete) >= self.min_rows:
                tests.append(
                    (self.features_, partial(self._test_joint, self._joint, complete.to_numpy(float)))
                )
        outcomes = _run([test for _, test in tests], parallel=len(current) >= _PARALLEL_ROWS)
        flags = flag([p_value for _, p_value in outcomes], self.p_val, self.correction)
        for (features, _), (statistic, p_value), drift in zip(tests, outcomes, flags, strict=True):
            for feature in features:
                scores[feature].update(
                    {"tested": True, "statistic": float(statistic), "p_value": float(p_value), "drift": drift}
                )
        return scores

    def _encode(self, feature: str, values: np.ndarray) -> np.ndarray:
        """Category codes shared with the reference; categories unseen there get new codes."""
        import pandas as pd

        categories = self.categories_[feature]
        codes = categories.get_indexer(values)
        unseen = codes < 0
        if unseen.any():
            codes[unseen] = len(categories) + pd.factorize(values[unseen])[0]
        return codes

    @abstractmethod
    def _fit_feature(self, reference: np.ndarray, categorical: bool) -> Any:
        """What the test needs about one feature's reference values (NaN-free; codes if categorical).

        The test is chi-squared for a categorical feature, else the one ``method`` names."""

    @abstractmethod
    def _test_feature(self, fitted: Any, current: np.ndarray, categorical: bool) -> tuple[float, float]:
        """``(statistic, p_value)`` of one feature's two-sample test, given what ``_fit_feature`` kept."""

    def _fit_joint(self, reference: np.ndarray) -> Any:
        """What the multivariate test needs about the reference (complete rows, one column per feature)."""
        raise NotImplementedError(f"{type(self).__name__} has no multivariate method")

    def _test_joint(self, fitted: Any, current: np.ndarray) -> tuple[float, float]:
        """``(statistic, p_value)`` of the multivariate test, given what ``_fit_joint`` kept."""
        raise NotImplementedError(f"{type(self).__name__} has no multivariate method")


# By path, imported on first use: alibi-detect lives only in the runtimes and costs seconds to import.
DETECTORS: Registry[Detector] = Registry(
    Detector,
    "drift backend",
    {"scipy": "airloop.steps.drift.scipy:ScipyDetector", "alibi": "airloop.steps.drift.alibi:AlibiDetector"},
    business_source=frozenset({"alibi"}),
)


def register(name: str, cls: type[Detector] | str) -> None:
    """Make ``get(name)`` return ``cls`` (a Detector subclass or its ``"module:Class"`` path)."""
    DETECTORS.register(name, cls)


def available() -> list[str]:
    return DETECTORS.available()


def get(name: str) -> type[Detector]:
    """The detector class registered as ``name``; ValueError lists the known ones."""
    return DETECTORS.get(name)


def _run(tests: list[Callable[[], tuple[float, float]]], parallel: bool) -> list[tuple[float, float]]:
    """Run the tests, on every core when ``parallel``: sorting and searching, the bulk of a KS test,
    release the GIL. On small windows the threads' hand-offs cost more than the tests."""
    workers = min(len(tests), os.cpu_count() or 1) if parallel else 1
    if workers < 2:
        return [test() for test in tests]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda test: test(), tests))


def _check_correction(correction: str) -> None:
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}: choose one of {list(CORRECTIONS)}")


def _fraction(part: int, whole: int) -> float:
    return float(part) / whole if whole else 0.0
