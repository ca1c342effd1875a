"""What the steps that reach MLflow send and hand back: the connection settings every such request
carries (``MlflowRequest``), and a training run as the later steps name it (``TrainedRun``).

Standard library only, like every request module: operator modules import it at the top.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypedDict

from airloop.requests import StepRequest


@dataclass(frozen=True, kw_only=True)
class MlflowRequest(StepRequest):
    """The MLflow server and the settings a step reaches it with (``MlflowHook.step_config()``; see
    ``airloop.tracking.session``). Credentials stay out of ``repr``, and so out of logs."""

    tracking_uri: str
    artifact_root: str | None = None
    auth: dict[str, str] | None = field(default=None, repr=False)
    http: dict[str, Any] | None = None
    s3: dict[str, str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.tracking_uri:
            raise ValueError(f"{type(self).__name__}: 'tracking_uri' must not be empty")


class TrainedRun(TypedDict):
    """A finished training run: what ``train`` returns, and ``select_best`` for the winner."""

    run_id: str
    model_uri: str
    metrics: dict[str, float]
    holdout_uri: str
    reference_uri: str
    fingerprint: dict[str, Any]
    reused: bool
