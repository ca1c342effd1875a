"""Pick the best of a hyperparameter search's training runs and nest them under one parent run.

The request is a ``SelectBestRequest`` (``airloop.steps.training.requests``). Each candidate is a run
that ``airloop.steps.training.train.train`` logged (one per mapped Airflow task).
The search itself is recorded as a parent run: the candidates carry its id in ``mlflow.parentRunId``
(MLflow's UI shows them as its children), and it holds the metric, the mode, every candidate's
score and the winner.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airloop.steps.training.requests import Candidate, SelectBestRequest, SelectResult
from airloop.tracking.artifacts import PARENT_RUN_TAG, run_result, task_run
from airloop.tracking.session import mlflow_step

if TYPE_CHECKING:
    import mlflow

MODES = ("max", "min")
BEST_RUN_TAG = "airloop.best_run_id"
SEARCH_TAG = "airloop.search"


@mlflow_step
def select_best(request: SelectBestRequest | Mapping[str, Any]) -> SelectResult:
    """The candidate run with the best ``metric``: the ``train`` result of the best run plus
    ``{"parent_run_id", "metric", "mode", "candidates": [{"run_id", "value"}, ...]}``. Ties go to the
    earliest candidate in ``run_ids``; see docs/steps.md."""
    import mlflow

    request = SelectBestRequest.parse(request)
    run_ids = [str(run_id) for run_id in request.run_ids]
    if not run_ids:
        raise ValueError("request needs 'run_ids': the candidate runs to choose from")
    metric, mode = request.metric, request.mode
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    client = mlflow.MlflowClient(tracking_uri=request.tracking_uri)
    runs = [client.get_run(run_id) for run_id in run_ids]
    unfinished = [run.info.run_id for run in runs if run.info.status != "FINISHED"]
    if unfinished:
        raise ValueError(f"candidate runs {unfinished} are not FINISHED")
    missing = [run.info.run_id for run in runs if metric not in run.data.metrics]
    if missing:
        raise ValueError(f"candidate runs {missing} have no metric {metric!r}")
    experiments = {run.info.experiment_id for run in runs}
    if len(experiments) > 1:
        raise ValueError(f"candidate runs span experiments {sorted(experiments)}; a search lives in one")

    scores = [run.data.metrics[metric] for run in runs]
    pick = max if mode == "max" else min
    best = runs[scores.index(pick(scores))]
    candidates: list[Candidate] = [
        {"run_id": run.info.run_id, "value": value} for run, value in zip(runs, scores, strict=True)
    ]
    tags = {str(k): str(v) for k, v in request.tags.items()}
    parent, reused = _parent_run(client, experiments.pop(), runs, tags)
    parent_id = parent.info.run_id
    for run in runs:
        if PARENT_RUN_TAG not in run.data.tags:
            client.set_tag(run.info.run_id, PARENT_RUN_TAG, parent_id)
    _record_search(client, parent_id, metric, mode, candidates, best.info.run_id)
    return {
        **run_result(client, best, reused=reused),
        "parent_run_id": parent_id,
        "metric": metric,
        "mode": mode,
        "candidates": candidates,
    }


def _parent_run(
    client: mlflow.MlflowClient, experiment_id: str, runs: list[mlflow.entities.Run], tags: dict[str, str]
) -> tuple[mlflow.entities.Run, bool]:
    """The search's parent run and whether it existed already.

    The candidates' common parent when they were trained under one (``parent_run_id``); else the
    run this select task made on an earlier try (running or finished); else a new one.
    """
    parents = {run.data.tags.get(PARENT_RUN_TAG) for run in runs}
    common = parents.pop() if len(parents) == 1 else None
    if common is not None:
        return client.get_run(common), True
    previous = task_run(client, experiment_id, tags, finished=False)
    if previous is not None and previous.data.tags.get(SEARCH_TAG) == "true":
        return previous, True
    return client.create_run(experiment_id, tags={**tags, SEARCH_TAG: "true"}, run_name="search"), False


def _record_search(
    client: mlflow.MlflowClient,
    parent_id: str,
    metric: str,
    mode: str,
    candidates: list[Candidate],
    best_run_id: str,
) -> None:
    from mlflow.entities import Metric, Param

    parent = client.get_run(parent_id)
    best = next(c["value"] for c in candidates if c["run_id"] == best_run_id)
    # Params cannot change once logged: a retried task logs only those still missing.
    params = {"search.metric": metric, "search.mode": mode, "search.candidates": str(len(candidates))}
    client.log_batch(
        parent_id,
        metrics=[Metric(f"best.{metric}", best, 0, 0)],
        params=[Param(k, v) for k, v in params.items() if k not in parent.data.params],
    )
    client.set_tag(parent_id, BEST_RUN_TAG, best_run_id)
    client.log_dict(
        parent_id,
        {"metric": metric, "mode": mode, "best_run_id": best_run_id, "candidates": candidates},
        "search/candidates.json",
    )
    if parent.info.status != "FINISHED":
        client.set_terminated(parent_id, status="FINISHED")
