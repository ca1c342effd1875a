"""Deprecated: the rollout's trigger waits on any serving target, so it lives in
``airloop.triggers.rollout`` as ``RolloutTrigger``."""

from __future__ import annotations

import warnings

from airloop.triggers.rollout import RolloutTrigger

warnings.warn(
    "airloop.triggers.seldon is deprecated: import RolloutTrigger from airloop.triggers.rollout",
    DeprecationWarning,
    stacklevel=2,
)

SeldonCanaryAnalysisTrigger = RolloutTrigger
