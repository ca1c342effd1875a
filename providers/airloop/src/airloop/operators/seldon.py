"""Deprecated: the rollout operators drive any serving target, so they live in ``airloop.operators.rollout``
as ``RolloutChallengerOperator`` and ``RolloutFinishOperator``."""

from __future__ import annotations

import warnings

from airloop.operators.rollout import RolloutChallengerOperator, RolloutFinishOperator

warnings.warn(
    "airloop.operators.seldon is deprecated: import RolloutChallengerOperator and RolloutFinishOperator "
    "from airloop.operators.rollout",
    DeprecationWarning,
    stacklevel=2,
)

SeldonRolloutChallengerOperator = RolloutChallengerOperator
SeldonFinishRolloutOperator = RolloutFinishOperator
