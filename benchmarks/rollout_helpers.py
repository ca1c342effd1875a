"""What the rollout benchmarks share: the rollout tests' module (it trains, converts and registers
versions with the real steps and runs the embedded loop's simulated clients), and report times."""

from __future__ import annotations

import importlib.util
from datetime import datetime
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def rollout_tests() -> ModuleType:
    path = REPO / "tests" / "integration" / "test_rollout.py"
    spec = importlib.util.spec_from_file_location("test_rollout", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seconds(start: str, end: str) -> float:
    """Seconds between two ISO times of a rollout report."""
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
