"""Async wait for one rollout analysis window (canary or shadow), without holding a worker slot."""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airloop.steps.rollout.requests import AnalysisRequest, WindowEvent


class RolloutTrigger(BaseTrigger):
    """
    Wait ``window_seconds`` after a traffic change, then poll the serving target's metrics until the
    window holds enough data for a verdict, or ``max_wait_seconds`` pass.

    ``mode`` is the analysis (``airloop.steps.rollout.canary.analyse``): ``canary`` for a challenger taking a
    share of the traffic, ``shadow`` for one receiving mirrored requests.

    With ``labels_root`` (the artefact root the gateway writes its logs to) the accuracy check counts
    the labels log's labels for the requests answered since ``labels_since`` (epoch seconds), read in a
    thread: labels that came after the gateway forgot their predictions, or were ingested, count too.

    Yields one event (``WindowEvent``): ``{"status": "ready" | "timeout" | "error", "message",
    "after": metrics, "verdict": the analysis}``. It carries the whole verdict, so the window is
    analysed once, here; "timeout" means the data stayed insufficient (the last "wait" verdict,
    e.g. labels that have not come yet), which the rollout records as ``inconclusive``.
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
        labels_root: str | None = None,
        labels_since: float | None = None,
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
        self.labels_root = labels_root
        self.labels_since = labels_since

    def serialize(self) -> tuple[str, dict[str, Any]]:
        # The class's own path, also when built through a deprecated alias.
        return (
            f"{RolloutTrigger.__module__}.{RolloutTrigger.__qualname__}",
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
                "labels_root": self.labels_root,
                "labels_since": self.labels_since,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent(await self.wait())

    async def wait(self) -> WindowEvent:
        """The window's event: what ``run`` yields, and what the worker awaits when not deferring."""
        from airloop.labels import window_quality
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
                return _error(f"cannot read metrics: {e}", None)
            labels = None
            if self.labels_root:
                try:
                    labels = await asyncio.to_thread(
                        window_quality, self.labels_root, self.deployment, float(self.labels_since or 0)
                    )
                except Exception as e:
                    return _error(f"cannot read the labels log: {e}", after)
            try:
                verdict = analyse(
                    AnalysisRequest(
                        mode=self.mode,
                        before=self.before,
                        after=after,
                        champion=self.champion,
                        challenger=self.challenger,
                        criteria=self.criteria,
                        labels=labels,
                    )
                )
            except ValueError as e:  # e.g. a predictor no longer deployed
                return _error(f"cannot analyse the window: {e}", after)
            if verdict["verdict"] != "wait":
                return {"status": "ready", "message": verdict["verdict"], "after": after, "verdict": verdict}
            if time.monotonic() >= deadline:
                message = f"not enough data after {self.max_wait_seconds:.0f}s: " + "; ".join(
                    verdict["reasons"]
                )
                return {"status": "timeout", "message": message, "after": after, "verdict": verdict}
            await asyncio.sleep(self.poll_interval)


def __getattr__(name: str) -> Any:
    if name == "SeldonCanaryAnalysisTrigger":
        warnings.warn(
            "SeldonCanaryAnalysisTrigger is deprecated: use RolloutTrigger (it waits on any serving target)",
            DeprecationWarning,
            stacklevel=2,
        )
        return RolloutTrigger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _error(message: str, after: Any) -> WindowEvent:
    """The event of a window that could not be judged: no verdict, the rollout decides what follows."""
    return {"status": "error", "message": message, "after": after, "verdict": None}
