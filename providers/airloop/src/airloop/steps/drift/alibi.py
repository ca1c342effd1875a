"""Drift backend on alibi-detect (Business Source License): an extra, present only in the serving runtime.

alibi-detect 0.13 needs numpy<2, so it cannot share Airflow's environment; run ``detect`` with this
backend in the ``serving`` runtime. One univariate detector per feature (``KSDrift`` or
``ChiSquareDrift``) lets missing values be dropped per feature; the correction across features is
the shared one in ``base``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airloop.steps.drift.base import Detector, register

if TYPE_CHECKING:
    import numpy as np


@register("alibi")
class AlibiDetector(Detector):
    """alibi-detect's ``KSDrift`` for numeric features and ``ChiSquareDrift`` for categorical ones."""

    def _fit_feature(self, reference: np.ndarray, categorical: bool) -> Any:
        try:
            from alibi_detect.cd import ChiSquareDrift, KSDrift
        except ImportError as error:
            raise ImportError(
                "the 'alibi' drift backend needs alibi-detect, which lives in the 'serving' runtime "
                "(numpy<2): run the step there, or use backend='scipy'"
            ) from error
        kind = ChiSquareDrift if categorical else KSDrift
        return kind(reference.reshape(-1, 1), p_val=self.p_val)

    def _test_feature(self, detector: Any, current: np.ndarray, categorical: bool) -> tuple[float, float]:
        data = detector.predict(current.reshape(-1, 1))["data"]
        return data["distance"][0], data["p_val"][0]
