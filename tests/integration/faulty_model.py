"""A model server class that misbehaves on purpose, for the rollout fault tests.

Seldon's wrapper runs it in the serving runtime (the test puts this folder on ``PYTHONPATH`` and
names ``faulty_model.FaultyModel`` as the local target's ``model_class``). ``AIRLOOP_TEST_FAULT``
holds ``{"model_dir": ..., "kind": "crash" | "error" | "latency", "after": n, "delay_ms": ms}``: the
server of that model folder injects the fault from its ``after``-th prediction on; every other one
is a plain ``OpenVinoModel``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from airloop.serving.model import OpenVinoModel


class FaultyModel(OpenVinoModel):
    def load(self) -> None:
        super().load()
        fault = json.loads(os.environ.get("AIRLOOP_TEST_FAULT") or "{}")
        mine = Path(fault.get("model_dir") or "/nonexistent").resolve() == Path(self.model_dir).resolve()
        self.fault = fault if mine else {}
        self.calls = 0

    def predict(self, X: Any, features_names: list[str] | None = None, meta: dict | None = None) -> Any:
        self.calls += 1
        kind = self.fault.get("kind") if self.calls > self.fault.get("after", 0) else None
        if kind == "crash":
            # The whole server at once, like a pod that dies: the gateway finds the port closed.
            os.killpg(0, signal.SIGKILL)
        if kind == "error":
            from seldon_core.flask_utils import SeldonMicroserviceException

            raise SeldonMicroserviceException(
                "injected failure", status_code=500, reason="MICROSERVICE_INTERNAL_ERROR"
            )
        if kind == "latency":
            time.sleep(self.fault["delay_ms"] / 1e3)
        return super().predict(X, features_names, meta)
