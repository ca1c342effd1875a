"""Async wait for one rollout analysis window (canary or shadow), without holding a worker slot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class SeldonCanaryAnalysisTrigger(BaseTrigger):
    """
    Wait ``window_seconds`` after a traffic change, then poll the serving target's metrics until the
    window holds enough data for a verdict, or ``max_wait_seconds`` pass.

    ``mode`` is the analysis (``airloop.steps.rollout.canary.analyse``): ``canary`` for a challenger taking a
    share of the traffic, ``shadow`` for one receiving mirrored requests.

    Yields one event: ``{"status": "ready" | "timeout" | "error", "message", "after": metrics}``;
    "timeout" means the data stayed insufficient, which the operator treats as a failed step.
    """

    def __init__(
        self,
        *,
        target_config: dict[str, Any],
        deployment: str,
        champion: str,
        challenger: str,
        before: dict[str, Any],
        criteria: dict[str, Any],
        window_seconds: float,
        max_wait_seconds: float,
        poll_interval: float = 1.0,
        mode: str = "canary",
    ) -> None:
        super().__init__()
        self.target_config = target_config
        self.deployment = deployment
        self.champion = champion
        self.challenger = challenger
        self.before = before
        self.criteria = criteria
        self.window_seconds = window_seconds
        self.max_wait_seconds = max_wait_seconds
        self.poll_interval = poll_interval
        self.mode = mode

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "target_config": self.target_config,
                "deployment": self.deployment,
                "champion": self.champion,
                "challenger": self.challenger,
                "before": self.before,
                "criteria": self.criteria,
                "window_seconds": self.window_seconds,
                "max_wait_seconds": self.max_wait_seconds,
                "poll_interval": self.poll_interval,
                "mode": self.mode,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airloop.serving.base import get_target
        from airloop.steps.rollout.canary import analyse

        options = dict(self.target_config)
        target = get_target(options.pop("target"), **options)
        deadline = time.monotonic() + max(self.max_wait_seconds, self.window_seconds)
        await asyncio.sleep(self.window_seconds)
        while True:
            try:
                after = await target.ametrics(self.deployment)
            except Exception as e:
                yield TriggerEvent({"status": "error", "message": f"cannot read metrics: {e}", "after": None})
                return
            verdict = analyse(
                {
                    "mode": self.mode,
                    "before": self.before,
                    "after": after,
                    "champion": self.champion,
                    "challenger": self.challenger,
                    "criteria": self.criteria,
                }
            )
            if verdict["verdict"] != "wait":
                yield TriggerEvent({"status": "ready", "message": verdict["verdict"], "after": after})
                return
            if time.monotonic() >= deadline:
                yield TriggerEvent(
                    {
                        "status": "timeout",
                        "after": after,
                        "message": f"not enough data after {self.max_wait_seconds:.0f}s: "
                        + "; ".join(verdict["reasons"]),
                    }
                )
                return
            await asyncio.sleep(self.poll_interval)
