"""A search over an estimator's parameters, in rounds of mapped trials: Optuna's ask/tell.

Each round is one task that asks Optuna for the next ``trials`` parameter sets, then one mapped
training task per set. Optuna's state is not stored anywhere: every round rebuilds the study from
the rounds before it (their parameters and the trained runs' holdout ``metric``), told as finished
trials, so a retried or resumed round asks the same thing (the sampler is seeded). A round after
``patience`` rounds without a better best value asks for nothing: the search stops there and the
rounds left are skipped. The space is checked against the estimator's parameters before any round.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from airloop.steps.training.requests import SuggestRequest
from airloop.steps.training.train import TORCH_PREFIX, import_estimator


def suggest(request: SuggestRequest | Mapping[str, Any]) -> list[dict[str, Any]]:
    """The next round's parameter sets (``estimator_params`` with the suggested ones over it); ``[]``
    once the search has stopped."""
    import optuna

    request = SuggestRequest.parse(request)
    distributions = _distributions(request)
    _check_parameters(request.estimator, list(distributions))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rounds = _rounds(request.history, request.metric)
    if _stopped(rounds, request.patience):
        return []
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=request.seed + len(rounds))
    )
    for trials in rounds:
        for params, value in trials:
            chosen = {name: params[name] for name in distributions}
            study.add_trial(
                optuna.trial.create_trial(params=chosen, distributions=distributions, value=value)
            )
    asked = [study.ask(distributions).params for _ in range(int(request.trials))]
    return [{**request.estimator_params, **params} for params in asked]


def _distributions(request: SuggestRequest) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    built: dict[str, Any] = {}
    for name, spec in request.space.items():
        log = bool(spec.get("log", False))
        if "choices" in spec:
            built[name] = CategoricalDistribution(spec["choices"])
        elif "int" in spec or "float" in spec:
            kind = "int" if "int" in spec else "float"
            low, high = spec[kind]
            if not low < high or (log and low <= 0):
                raise ValueError(
                    f"search space {name}: {kind} [{low}, {high}] needs low < high (and low > 0 with log)"
                )
            built[name] = (IntDistribution if kind == "int" else FloatDistribution)(low, high, log=log)
        else:
            raise ValueError(
                f"search space {name}: give int: [low, high], float: [low, high] or choices: [...]"
            )
    return built


def _check_parameters(estimator: str, names: list[str]) -> None:
    """Every searched name is a parameter of the estimator class (or of the training function)."""
    if estimator.startswith(TORCH_PREFIX):
        return  # a torch module's parameters are its constructor's and the loop's: checked when it trains
    found, is_function = import_estimator(estimator)
    if is_function:
        signature = inspect.signature(found).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values()):
            return
        known = sorted(signature)
    else:
        known = sorted(found().get_params())
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"search space names {unknown}, not parameters of {estimator}: its parameters are {known}"
        )


def _rounds(history: list[Any], metric: str) -> list[list[tuple[dict[str, Any], float]]]:
    """``[[(params, value), ...] per round]`` from ``[params of round 0, runs of round 0, ...]``."""
    if len(history) % 2:
        raise ValueError("history holds the params and the trained runs of each round, in pairs")
    rounds = []
    for asked, trained in zip(history[::2], history[1::2], strict=True):
        asked, trained = list(asked or []), list(trained or [])
        if len(asked) != len(trained):
            raise ValueError(f"a round asked for {len(asked)} trials and trained {len(trained)}")
        rounds.append(
            [(params, float(run["metrics"][metric])) for params, run in zip(asked, trained, strict=True)]
        )
    return rounds


def _stopped(rounds: list[list[tuple[dict[str, Any], float]]], patience: int) -> bool:
    """Whether the last ``patience`` rounds all failed to beat the best value before them (or one asked
    for nothing: the search stopped already)."""
    if any(not trials for trials in rounds):
        return True
    if len(rounds) <= patience:
        return False
    best = [max(value for _, value in trials) for trials in rounds]
    before = max(best[:-patience])
    return max(best[-patience:]) <= before
