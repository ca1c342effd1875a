"""Drift backend on alibi-detect (Business Source License): an extra, present only in the runtimes.

alibi-detect 0.13 needs numpy<2, so it cannot share Airflow's environment: run ``detect`` with this
backend in the ``serving`` runtime (or the ``torch`` runtime for ``mmd``). Methods ``ks`` and ``cvm``:
one ``KSDrift`` or ``CVMDrift`` per numeric feature and one ``ChiSquareDrift`` per categorical one
(what ``TabularDrift`` does, but missing values are dropped per feature); the correction across
features is the shared one in ``base``. Method ``mmd``: one ``MMDDrift``
(PyTorch) over all the features together, which also sees a change in how features move together
that no single feature shows.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from airloop.steps.drift.base import Detector

if TYPE_CHECKING:
    import numpy as np

MMD = "mmd"
# MMD's permutation test costs O((n + m)^2) per permutation: 2k vs 2k rows take ~6 s on 2 cores,
# 10k vs 10k ~200 s. Each side is cut to a random sample of at most this many complete rows.
MMD_MAX_ROWS = 1000
# alibi-detect's default. The p-value is the share of permutations whose distance reaches the window's.
MMD_PERMUTATIONS = 100
_SEED = 0  # fixed, so the same data always gets the same subsample and permutations


class AlibiDetector(Detector):
    """alibi-detect's ``KSDrift`` or ``CVMDrift`` / ``ChiSquareDrift`` per feature, or ``MMDDrift`` on
    all of them at once."""

    name = "alibi"
    joint_methods = (MMD,)

    def check_params(self) -> None:
        super().check_params()
        if self.method == MMD:
            import importlib.util

            if importlib.util.find_spec("torch") is None:
                raise ImportError(
                    "the 'alibi' drift backend's 'mmd' method runs MMDDrift on PyTorch, which this "
                    f"environment ({sys.prefix}) lacks: run the step in the 'torch' runtime "
                    "(`airloop runtimes build torch`), or use method 'ks' or 'cvm'"
                )

    def _fit_feature(self, reference: np.ndarray, categorical: bool) -> Any:
        if categorical:
            kind = _detector("chisquare", "ChiSquareDrift")
        else:
            kind = _detector("cvm", "CVMDrift") if self.method == "cvm" else _detector("ks", "KSDrift")
        return kind(reference.reshape(-1, 1), p_val=self.p_val)

    def _test_feature(self, detector: Any, current: np.ndarray, categorical: bool) -> tuple[float, float]:
        data = detector.predict(current.reshape(-1, 1))["data"]
        return data["distance"][0], data["p_val"][0]

    def _fit_joint(self, reference: np.ndarray) -> Any:
        import numpy as np

        # Standardised on the reference, so the kernel's one bandwidth suits features of any unit.
        mean, scale = reference.mean(axis=0), reference.std(axis=0)
        scale[scale == 0] = 1.0
        sample = _sample(reference, MMD_MAX_ROWS)
        detector = _detector("mmd", "MMDDrift")(
            ((sample - mean) / scale).astype(np.float32),
            backend="pytorch",
            device="cpu",
            p_val=self.p_val,
            n_permutations=MMD_PERMUTATIONS,
        )
        return detector, mean, scale

    def _test_joint(self, fitted: Any, current: np.ndarray) -> tuple[float, float]:
        import numpy as np
        import torch

        detector, mean, scale = fitted
        sample = ((_sample(current, MMD_MAX_ROWS) - mean) / scale).astype(np.float32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEED)
            data = detector.predict(sample)["data"]
        return data["distance"], data["p_val"]


def _sample(rows: np.ndarray, size: int) -> np.ndarray:
    import numpy as np

    if len(rows) <= size:
        return rows
    return rows[np.random.default_rng(_SEED).choice(len(rows), size, replace=False)]


def _detector(module: str, name: str) -> type:
    """One detector class from ``alibi_detect.cd.<module>``."""
    import importlib

    try:
        with _without_package_inits():
            return getattr(importlib.import_module(f"alibi_detect.cd.{module}"), name)
    except ImportError as error:
        raise ImportError(
            "the 'alibi' drift backend needs alibi-detect, which lives in the 'serving' and 'torch' "
            f"runtimes (numpy<2), not in {sys.prefix}: run the step there, or use backend='scipy'"
        ) from error


@contextmanager
def _without_package_inits() -> Iterator[None]:
    """Import detector modules without running ``alibi_detect``'s and ``alibi_detect.cd``'s ``__init__``.

    Those import every detector, the saving code (transformers) and the outlier detectors: ~2.5 s of
    a cold runtime hop, against ~0.2 s for a detector module and what it imports. While loading, the
    two packages are empty modules with the real search path; they are removed afterwards (the loaded
    detector modules stay), so a later ``import alibi_detect`` still runs the real ones.
    """
    import importlib.util

    if "alibi_detect" in sys.modules:  # the whole package is already there
        yield
        return
    placed = []
    try:
        for package in ("alibi_detect", "alibi_detect.cd"):
            spec = importlib.util.find_spec(package)
            if spec is None:
                raise ImportError(f"No module named {package!r}")
            sys.modules[package] = importlib.util.module_from_spec(spec)
            placed.append(package)
        yield
    finally:
        for package in placed:
            sys.modules.pop(package, None)
