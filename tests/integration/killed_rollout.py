"""Run a rollout task in this process and SIGKILL the process right after one write to the serving target.

    python -m tests.integration.killed_rollout '{"operator": {<RolloutChallengerOperator kwargs>},
                               "kill": {"method": "deploy" | "set_traffic", "weights": {"v5": 25},
                                        "delay_s": 1.0}}'

The process dies (no ``on_kill``, no ``finally``) ``delay_s`` after the first call of ``method`` whose
weights include ``weights``: what a worker lost, an OOM kill or ``kill -9`` leave behind. The test
then retries in its own process. Exits 3 if the rollout ends before the kill, 1 if it fails.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any

from airloop.serving.base import register_target
from airloop.serving.local import LocalServingTarget


class KillingTarget(LocalServingTarget):
    """The local target, killing this process after the write that ``kill`` names."""

    def __init__(self, *, kill: dict[str, Any], **options: Any) -> None:
        super().__init__(**options)
        self.kill = kill

    def deploy(self, deployment: str, predictors: list[dict[str, Any]]) -> dict[str, Any]:
        state = super().deploy(deployment, predictors)
        self._after("deploy", {p["name"]: p["weight"] for p in predictors})
        return state

    def set_traffic(
        self, deployment: str, weights: dict[str, int], *, shadow: dict[str, int] | None = None
    ) -> dict[str, Any]:
        state = super().set_traffic(deployment, weights, shadow=shadow)
        self._after("set_traffic", weights)
        return state

    def _after(self, method: str, weights: dict[str, int]) -> None:
        if method != self.kill["method"] or not self.kill["weights"].items() <= weights.items():
            return
        if self.kill.get("delay_s"):
            threading.Timer(self.kill["delay_s"], os.kill, (os.getpid(), signal.SIGKILL)).start()
        else:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    spec = json.loads(sys.argv[1])
    register_target("killing", KillingTarget)
    # The operator and the trigger it runs in the worker both build their target from this connection.
    connection = {"conn_type": "airloop_serving", "extra": {"target": "killing", "kill": spec["kill"]}}
    os.environ["AIRFLOW_CONN_AIRLOOP_SERVING_DEFAULT"] = json.dumps(connection)
    from airloop.operators.rollout import RolloutChallengerOperator
    from tests.fakes.context import task_context

    RolloutChallengerOperator(task_id="rollout", **spec["operator"]).execute(task_context("rollout"))
    sys.exit(3)


if __name__ == "__main__":
    main()
