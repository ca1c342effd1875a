"""What every Airloop operator shares: running a step in its runtime (and stopping it when the task is
killed), and tagging what it writes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow.sdk import BaseOperator, Context

from airloop import runtimes
from airloop.requests import StepRequest


class StepOperator(BaseOperator):
    """
    Runs one step (``module:function``, JSON-able request in, JSON-able result out).

    :param runtime: where the step runs: ``"worker"`` (in-process), the name of an isolated
        runtime built with ``airloop runtimes build`` (e.g. ``"serving"``), or ``"kubernetes"``: a pod
        started through KubernetesPodOperator (see ``airloop.runtimes.pod`` and docs/runtimes.md).
    :param pod_settings: for ``runtime="kubernetes"``: ``image`` (default ``$AIRLOOP_POD_IMAGE``),
        ``resources``, ``env``, and any KubernetesPodOperator argument (``namespace``,
        ``kubernetes_conn_id``, ``service_account_name``, ...).

    A killed task stops the step's remote work: ``on_kill`` stops the runtime's interpreter, or deletes
    the pod, through the operator that hopped there.
    """

    def __init__(
        self, *, runtime: str = runtimes.WORKER, pod_settings: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        # Results are small dicts: push each key too, so DAGs can pass ``task.output["run_id"]`` along.
        kwargs.setdefault("multiple_outputs", True)
        super().__init__(**kwargs)
        self.runtime = runtime
        self.pod_settings = pod_settings
        self._hop: BaseOperator | None = None

    def run_step(
        self,
        step: str,
        request: StepRequest | Mapping[str, Any],
        context: Context,
        runtime: str | None = None,
    ) -> Any:
        """Run ``step`` with the request (sent as a dict) in ``runtime``, by default the operator's."""
        return runtimes.run_step(
            step,
            request.to_dict() if isinstance(request, StepRequest) else dict(request),
            runtime=runtime or self.runtime,
            context=context,
            task_id=self.task_id,
            pod_settings=self.pod_settings,
            hold=self._hold,
        )

    def _hold(self, hop: BaseOperator) -> None:
        self._hop = hop

    def on_kill(self) -> None:
        """Stop the step's hop (the runtime's interpreter, or the pod); a worker step ends with the task."""
        if self._hop is not None:
            self._hop.on_kill()


def airflow_tags(context: Context) -> dict[str, str]:
    """Tags that tie an MLflow object to the task instance that made it (and find it again on retry)."""
    ti = context["ti"]
    tags = {
        "airflow.dag_id": ti.dag_id,
        "airflow.run_id": ti.run_id,
        "airflow.task_id": ti.task_id,
        "airflow.map_index": str(getattr(ti, "map_index", -1)),
        "airflow.try_number": str(ti.try_number),
    }
    return tags


def loop_trigger(context: Context) -> dict[str, Any]:
    """Why this DAG run started: the Asset events that scheduled it, or its run type."""
    events = context.get("triggering_asset_events") or {}
    consumed = [
        {
            "asset": getattr(asset, "uri", str(asset)),
            "extra": dict(event.extra or {}),
            "timestamp": event.timestamp.isoformat(),
        }
        for asset, asset_events in events.items()
        for event in asset_events
    ]
    dag_run = context["dag_run"]
    return {"run_type": str(getattr(dag_run, "run_type", "")), "asset_events": consumed}
