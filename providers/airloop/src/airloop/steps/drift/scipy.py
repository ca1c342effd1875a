"""Drift backend on SciPy alone: runs wherever Airloop runs, with no Business-Source-licensed dependency."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airloop.steps.drift.base import Detector

if TYPE_CHECKING:
    import numpy as np


class ScipyDetector(Detector):
    """Kolmogorov-Smirnov or Cramer-von Mises for numeric features, chi-squared on category counts for
    categorical ones."""

    name = "scipy"

    def _fit_feature(self, reference: np.ndarray, categorical: bool) -> np.ndarray:
        return reference

    def _test_feature(
        self, reference: np.ndarray, current: np.ndarray, categorical: bool
    ) -> tuple[float, float]:
        import numpy as np
        from scipy.stats import chi2_contingency, cramervonmises_2samp, ks_2samp

        if categorical:
            # Every code occurs on at least one side, so no column of the table is empty.
            size = int(max(reference.max(), current.max())) + 1
            table = np.vstack([np.bincount(reference, minlength=size), np.bincount(current, minlength=size)])
            result = chi2_contingency(table)
            return result.statistic, result.pvalue
        if self.method == "cvm":  # "auto" as alibi-detect: exact on tiny samples, else asymptotic
            result = cramervonmises_2samp(reference, current, method="auto")
            return result.statistic, result.pvalue
        # The asymptotic distribution, as alibi-detect uses: exact p-values cost seconds on large windows.
        result = ks_2samp(reference, current, method="asymp")
        return result.statistic, result.pvalue
