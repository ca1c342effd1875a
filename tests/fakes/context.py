"""One Airflow task context for calling ``operator.execute(context)`` without a scheduler.

What the operators read of it: the task instance's identity (MLflow tags, artefact folders, pod
labels), ``xcom_push`` (extra links) and ``xcom_pull`` (an approval task's answer), the DAG run's
type and the DAG file (code-version tags).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


class TaskInstance:
    """A task instance's identity and XComs: ``xcom`` holds what was pushed, ``pulled`` what
    ``xcom_pull(task_ids=...)`` answers, by task id."""

    def __init__(
        self,
        task_id: str = "task",
        *,
        dag_id: str = "airloop_test",
        run_id: str = "manual__1",
        try_number: int = 1,
        map_index: int = -1,
        pulled: dict[str, Any] | None = None,
    ) -> None:
        self.task_id, self.dag_id, self.run_id = task_id, dag_id, run_id
        self.try_number, self.map_index = try_number, map_index
        self.xcom: dict[str, Any] = {}
        self.pulled = pulled or {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value

    def xcom_pull(self, task_ids: str) -> Any:
        return self.pulled.get(task_ids)


def task_context(task_id: str = "task", *, dag_file: str | None = None, **ti: Any) -> dict[str, Any]:
    """The context of a manual run of ``task_id``; ``ti`` as ``TaskInstance`` takes it, ``dag_file``
    the DAG's file (``__file__`` of the test, for the operators that tag the DAG code's version)."""
    instance = TaskInstance(task_id, **ti)
    return {
        "ti": instance,
        "run_id": instance.run_id,
        "dag_run": SimpleNamespace(run_type="manual", run_id=instance.run_id),
        "dag": SimpleNamespace(fileloc=dag_file) if dag_file else None,
    }
