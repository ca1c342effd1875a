"""A search's rounds: the next trials' parameters, asked of Optuna from the rounds before."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context

from airloop.operators.base import StepOperator
from airloop.steps.training.requests import SuggestRequest


class OptunaSuggestTrialsOperator(StepOperator):
    """
    Suggest one round of a search: ``trials`` parameter sets for ``estimator`` from ``space``, with
    Optuna's TPE sampler told the earlier rounds (``airloop.steps.training.search``). Map a training
    task over the result (``MlflowTrainModelOperator.partial(...).expand(estimator_params=...)``),
    and pass this round's and that task's outputs to the next round's ``history``. After ``patience``
    rounds without a better best value it returns ``[]``: the mapped trials after it are skipped
    (give the next rounds ``trigger_rule="none_failed"``). The space is checked against the
    estimator's parameters first: a name it does not take fails the task before anything trains.

    :param estimator: the estimator the trials train (as ``MlflowTrainModelOperator`` takes it).
    :param space: ``{param: {"int": [low, high]} | {"float": [low, high]} | {"choices": [...]}}``,
        ``"log": true`` for a log scale.
    :param estimator_params: fixed parameters, under the suggested ones.
    :param trials: parameter sets per round.
    :param patience: rounds without improvement before the search stops.
    :param metric: the holdout metric a trained run is judged by (higher is better).
    :param history: the earlier rounds: ``[suggest_0.output, trial_0.output, suggest_1.output, ...]``.
    """

    template_fields: Sequence[str] = ("history",)

    def __init__(
        self,
        *,
        estimator: str,
        space: dict[str, dict[str, Any]],
        estimator_params: dict[str, Any] | None = None,
        trials: int = SuggestRequest.trials,
        patience: int = SuggestRequest.patience,
        metric: str = SuggestRequest.metric,
        seed: int = SuggestRequest.seed,
        history: Sequence[Any] = (),
        **kwargs: Any,
    ) -> None:
        # A list, not a dict of results: the trials are mapped over it as a whole.
        super().__init__(multiple_outputs=False, **kwargs)
        self.estimator, self.space = estimator, space
        self.estimator_params = dict(estimator_params or {})
        self.trials, self.patience, self.metric, self.seed = trials, patience, metric, seed
        self.history = list(history)

    def execute(self, context: Context) -> list[dict[str, Any]]:
        request = SuggestRequest(
            estimator=self.estimator,
            space=self.space,
            estimator_params=self.estimator_params,
            trials=self.trials,
            patience=self.patience,
            metric=self.metric,
            seed=self.seed,
            history=[list(item or []) for item in self.history],
        )
        suggested: list[dict[str, Any]] = self.run_step(
            "airloop.steps.training.search:suggest", request, context
        )
        if suggested:
            self.log.info("round %d: %d trials %s", len(self.history) // 2, len(suggested), suggested)
        else:
            self.log.info("the search stopped after %d rounds: no better best value", len(self.history) // 2)
        return suggested
