"""The serving-target conformance suite: what every ``ServingTarget`` must do, as scikit-learn's
``check_estimator`` is for estimators.

``check_target(make_target, model_dirs)`` takes one deployment through its whole life on a target:
refused names and predictors, deploy, add and keep predictors, traffic weights, a shadow that is
mirrored, promoted to live and removed (or refused, by a target whose ``supports_shadow`` is False),
metrics (and, given ``send``, that they count requests),
remove, delete, deploy again. Every call goes through a new ``make_target()``, as each Airflow task
builds its own target: a target keeps nothing about a deployment in memory. After each change, the
state the call returned must be what a new instance reads; after each refused call (``ValueError``
naming the problem), the state must be unchanged.

The first broken rule raises ``AssertionError`` naming the call and what was expected. The deployment
is deleted before and after the run.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from typing import Any

from airloop.serving.base import ServingTarget

# The counters of ``ServingTarget.metrics()`` every target reports for every predictor.
COUNTS = ("requests", "errors", "feedback", "feedback_correct")
REQUESTS = 200  # per call of ``send``: a 20 % predictor misses all of them with probability 1e-19

Roles = dict[str, tuple[str, int, bool]]


def check_target(
    make_target: Callable[[], ServingTarget],
    model_dirs: Sequence[str],
    *,
    deployment: str = "airloop-conformance",
    send: Callable[[dict[str, Any], int], None] | None = None,
) -> None:
    """Raise AssertionError unless the targets ``make_target()`` builds keep the ServingTarget contract.

    :param make_target: builds the target (with its configuration), called once per operation.
    :param model_dirs: three model folders the target can serve, for predictors ``v1``-``v3``
        (OpenVINO IR folders for the local target, paths in the pods for Seldon).
    :param deployment: the deployment the suite creates and deletes.
    :param send: ``send(state, n)`` sends ``n`` prediction requests to the deployment as a client
        would; with it, the suite checks that ``metrics()`` counts them per predictor.
    """
    if len(model_dirs) < 3:
        raise ValueError(f"check_target needs three model folders, got {list(model_dirs)}")
    run = _Run(make_target, deployment, list(model_dirs))
    run.target().delete(deployment)
    try:
        _check_bad_names(run)
        _check_unknown_deployment(run)
        _check_bad_predictors(run)
        _check_deploy(run)
        _check_traffic(run)
        _check_shadow(run)
        _check_metrics(run, send)
        _check_remove(run)
        _check_delete(run)
    finally:
        run.target().delete(deployment)


class _Run:
    """One run of the suite: how to reach the target and the predictors it deploys."""

    def __init__(self, make_target: Callable[[], ServingTarget], deployment: str, model_dirs: list[str]):
        self.make_target = make_target
        self.deployment = deployment
        self.model_dirs = model_dirs
        self.name = ""

    def target(self) -> ServingTarget:
        target = self.make_target()
        if not isinstance(target, ServingTarget):
            raise AssertionError(f"make_target() returned {target!r}, not a ServingTarget")
        self.name = type(target).__name__
        return target

    def predictor(self, version: int, weight: Any, **changes: Any) -> dict[str, Any]:
        return {
            "name": f"v{version}",
            "model_version": str(version),
            "model_dir": self.model_dirs[version - 1],
            "weight": weight,
            **changes,
        }

    def roles(self) -> Roles:
        """``{predictor: (model_version, weight, shadow)}`` as a new instance reads it."""
        return _roles(self.target().state(self.deployment), f"{self.name}.state()")

    def roles_if_deployed(self) -> Roles | None:
        """``roles()``, or None where ``state()`` says (ValueError) that nothing is deployed."""
        try:
            return self.roles()
        except ValueError:
            return None
        except AssertionError:
            raise
        except Exception as exc:
            raise AssertionError(
                f"{self.name}.state() raised {exc!r}; expected a state or a ValueError"
            ) from exc

    def changed(self, call: str, state: dict[str, Any], expected: Roles) -> None:
        """The state a change returned, and the one read afterwards, are ``expected``."""
        got = _roles(state, f"{self.name}.{call}")
        _expect(got == expected, f"{self.name}.{call} returned predictors {got}, expected {expected}")
        try:
            read = self.roles()
        except ValueError as exc:
            raise AssertionError(f"after {self.name}.{call}, a new instance cannot read it: {exc}") from exc
        _expect(read == expected, f"after {self.name}.{call}, state() reads {read}, expected {expected}")

    def refused(self, why: str, says: str | None, method: str, *args: Any, **kwargs: Any) -> None:
        """``target.method(*args, **kwargs)`` raises ValueError saying ``says`` and leaves the deployment
        as it was; ``why`` names the problem in the call."""
        call = f"{self.name}.{method}() {why}"
        before = self.roles_if_deployed()
        try:
            answer = getattr(self.target(), method)(*args, **kwargs)
            if asyncio.iscoroutine(answer):
                asyncio.run(answer)
        except ValueError as exc:
            if says is not None and says not in str(exc):
                raise AssertionError(f"{call} was refused with {exc!r}, which does not say {says!r}") from exc
        except Exception as exc:
            raise AssertionError(f"{call} raised {exc!r}; expected a ValueError") from exc
        else:
            raise AssertionError(f"{call} was accepted; expected a ValueError saying {says!r}")
        after = self.roles_if_deployed()
        _expect(after == before, f"{call} was refused but changed the deployment: {before} -> {after}")


def _roles(state: dict[str, Any], where: str) -> Roles:
    """A state's predictors as ``{name: (model_version, weight, shadow)}``, checking its shape."""
    _expect(
        isinstance(state, dict) and {"deployment", "endpoint", "predictors"} <= state.keys(),
        f"{where} returned {state!r}: a state has 'deployment', 'endpoint' and 'predictors'",
    )
    found: Roles = {}
    for name, predictor in state["predictors"].items():
        for key, kind in (("model_version", str), ("weight", int), ("shadow", bool), ("healthy", bool)):
            _expect(
                isinstance(predictor.get(key), kind),
                f"{where}: predictor {name!r} has {key}={predictor.get(key)!r}, expected a {kind.__name__}",
            )
        found[name] = (predictor["model_version"], predictor["weight"], predictor["shadow"])
    return found


def _expect(condition: bool, message: str) -> None:
    # Not ``assert``: the suite must hold under ``python -O`` too.
    if not condition:
        raise AssertionError(message)


def _check_bad_names(run: _Run) -> None:
    good = [run.predictor(1, 100)]
    for bad in ("Churn", "churn_v2", "-churn", "x" * 64, ""):
        why, says = f"of deployment {bad!r}", "invalid deployment name"
        run.refused(why, says, "deploy", bad, good)
        run.refused(why, says, "set_traffic", bad, {"v1": 100})
        run.refused(why, says, "remove", bad, "v1")
        for method in ("state", "metrics", "ametrics", "delete"):
            run.refused(why, says, method, bad)


def _check_unknown_deployment(run: _Run) -> None:
    d, why = run.deployment, "of a deployment that is not deployed"
    for method in ("state", "metrics", "ametrics"):
        run.refused(why, "not deployed", method, d)
    run.refused(why, "not deployed", "set_traffic", d, {"v1": 100})
    run.refused(why, "not deployed", "remove", d, "v1")
    run.target().delete(d)  # nothing to stop: a no-op


def _check_bad_predictors(run: _Run) -> None:
    p = run.predictor
    lacking = {k: v for k, v in p(1, 100).items() if k != "model_dir"}
    for problem, predictors, says in [
        ("no predictor", [], None),
        ("weights summing to 90", [p(1, 90)], "sum to 100"),
        ("a name listed twice", [p(1, 100), p(1, 0)], "listed twice"),
        ("no model_dir", [lacking], "lacks"),
        ("an upper-case name", [p(1, 100, name="V1")], "invalid predictor name"),
        ("a float weight", [p(1, 100.0)], "integer from 0 to 100"),
        ("a boolean weight", [p(1, 0), p(2, True)], "integer from 0 to 100"),
        ("a weight over 100", [p(1, 101)], "integer from 0 to 100"),
        ("shadow not a boolean", [p(1, 100), p(2, 10, shadow="yes")], "true or false"),
        ("a shadow alone", [p(2, 50, shadow=True)], "sum to 100"),
        ("two shadows", [p(1, 100), p(2, 10, shadow=True), p(3, 10, shadow=True)], "at most one shadow"),
        ("a shadow mirroring 0 %", [p(1, 100), p(2, 0, shadow=True)], "1 to 100"),
    ]:
        run.refused(f"with {problem}", says, "deploy", run.deployment, predictors)


def _check_deploy(run: _Run) -> None:
    d, p = run.deployment, run.predictor
    state = run.target().deploy(d, [p(1, 100)])
    run.changed("deploy(v1 at 100)", state, {"v1": ("1", 100, False)})
    _expect(state["deployment"] == d, f"{run.name}.deploy() returned the state of {state['deployment']!r}")
    # Predictors not listed keep running with their weight.
    state = run.target().deploy(d, [p(2, 0)])
    run.changed("deploy(v2 at 0)", state, {"v1": ("1", 100, False), "v2": ("2", 0, False)})
    state = run.target().deploy(d, [p(1, 100)])
    run.changed("deploy(v1 again, unchanged)", state, {"v1": ("1", 100, False), "v2": ("2", 0, False)})
    run.refused(
        "of another model version under a running predictor's name",
        "already serves model version",
        "deploy",
        d,
        [p(3, 100, name="v1")],
    )
    run.refused("making the weights sum to 150", "sum to 100", "deploy", d, [p(3, 50)])


def _check_traffic(run: _Run) -> None:
    d = run.deployment
    state = run.target().set_traffic(d, {"v1": 90, "v2": 10})
    run.changed("set_traffic(v1 90, v2 10)", state, {"v1": ("1", 90, False), "v2": ("2", 10, False)})
    for problem, weights, shadow, says in [
        ("weights summing to 110", {"v1": 90, "v2": 20}, None, "sum to 100"),
        ("an unknown predictor", {"v1": 90, "v9": 10}, None, "unknown predictors"),
        ("weights out of range", {"v1": 101, "v2": -1}, None, "integer from 0 to 100"),
        ("a float weight", {"v1": 90.0, "v2": 10}, None, "integer from 0 to 100"),
        ("a predictor both live and shadow", {"v1": 100}, {"v1": 10}, "both live and shadow"),
        ("a shadow mirroring 0 %", {"v1": 100}, {"v2": 0}, "1 to 100"),
    ]:
        run.refused(f"with {problem}", says, "set_traffic", d, weights, shadow=shadow)


def _check_shadow(run: _Run) -> None:
    d, p = run.deployment, run.predictor
    if not run.target().supports_shadow:
        return _check_without_shadow(run)
    state = run.target().deploy(d, [p(3, 50, shadow=True)])
    run.changed(
        "deploy(v3 as a shadow mirroring 50 %)",
        state,
        {"v1": ("1", 90, False), "v2": ("2", 10, False), "v3": ("3", 50, True)},
    )
    state = run.target().set_traffic(d, {"v1": 100, "v2": 0})
    run.changed(
        "set_traffic(v1 100, v2 0) with a shadow",
        state,
        {"v1": ("1", 100, False), "v2": ("2", 0, False), "v3": ("3", 50, True)},
    )
    state = run.target().set_traffic(d, {"v1": 100}, shadow={"v3": 20})
    run.changed(
        "set_traffic(v1 100, shadow v3 20)",
        state,
        {"v1": ("1", 100, False), "v2": ("2", 0, False), "v3": ("3", 20, True)},
    )
    run.refused(
        "making a second shadow", "at most one shadow", "set_traffic", d, {"v1": 100}, shadow={"v2": 10}
    )
    # Named among the live weights, the shadow answers clients at its weight.
    state = run.target().set_traffic(d, {"v1": 80, "v3": 20})
    run.changed(
        "set_traffic(v1 80, v3 20) of a shadow",
        state,
        {"v1": ("1", 80, False), "v2": ("2", 0, False), "v3": ("3", 20, False)},
    )


def _check_without_shadow(run: _Run) -> None:
    """A target that mirrors nothing refuses a shadow, and gets to _check_shadow's end with live
    predictors."""
    d, p = run.deployment, run.predictor
    run.refused("of a shadow on a target without shadows", "shadow", "deploy", d, [p(3, 50, shadow=True)])
    run.refused(
        "making a shadow on a target without shadows",
        "shadow",
        "set_traffic",
        d,
        {"v1": 100},
        shadow={"v2": 10},
    )
    state = run.target().set_traffic(d, {"v1": 100, "v2": 0})
    run.changed("set_traffic(v1 100, v2 0)", state, {"v1": ("1", 100, False), "v2": ("2", 0, False)})
    state = run.target().deploy(d, [p(3, 0)])
    run.changed(
        "deploy(v3 at 0)", state, {"v1": ("1", 100, False), "v2": ("2", 0, False), "v3": ("3", 0, False)}
    )
    state = run.target().set_traffic(d, {"v1": 80, "v3": 20})
    run.changed(
        "set_traffic(v1 80, v3 20)",
        state,
        {"v1": ("1", 80, False), "v2": ("2", 0, False), "v3": ("3", 20, False)},
    )


def _check_metrics(run: _Run, send: Callable[[dict[str, Any], int], None] | None) -> None:
    d = run.deployment
    state = run.target().state(d)
    before = _metrics(run, state)
    again = asyncio.run(run.target().ametrics(d))
    _expect(again == before, f"{run.name}.ametrics() returned {again}, metrics() {before}")
    if send is None:
        return
    send(state, REQUESTS)
    after = _metrics(run, state)
    sent = {name: after[name]["requests"] - before[name]["requests"] for name in state["predictors"]}
    _expect(
        sum(sent.values()) == REQUESTS,
        f"{run.name}.metrics() counted {sent} requests after {REQUESTS} were sent",
    )
    for name, predictor in state["predictors"].items():
        served = sent[name] > 0
        _expect(
            served == (predictor["weight"] > 0),
            f"{run.name}.metrics(): predictor {name!r} at weight {predictor['weight']} served {sent[name]}",
        )
        for key in COUNTS:
            _expect(
                after[name][key] >= before[name][key],
                f"{run.name}.metrics(): {name}.{key} went from {before[name][key]} to {after[name][key]}",
            )
        _expect(
            after[name]["errors"] == before[name]["errors"],
            f"{run.name}.metrics(): {name} counted errors for healthy requests",
        )


def _metrics(run: _Run, state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``metrics()`` from a new instance, checking its shape for every predictor in ``state``."""
    stats = run.target().metrics(run.deployment)
    where = f"{run.name}.metrics()"
    for name in state["predictors"]:
        entry = stats.get(name)
        if not isinstance(entry, dict):
            raise AssertionError(f"{where} has no entry for predictor {name!r}: {stats}")
        for key in COUNTS:
            value = entry.get(key)
            _expect(
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                f"{where}: {name}.{key} is {value!r}",
            )
        _expect(entry["errors"] <= entry["requests"], f"{where}: {name} has more errors than requests")
        _expect(
            entry["feedback_correct"] <= entry["feedback"],
            f"{where}: {name} has more correct feedback than feedback",
        )
        total = entry.get("latency_ms_sum")
        _expect(isinstance(total, int | float) and total >= 0, f"{where}: {name}.latency_ms_sum is {total!r}")
        buckets = entry.get("latency_ms_buckets")
        if not isinstance(buckets, dict):
            raise AssertionError(f"{where}: {name}.latency_ms_buckets is {buckets!r}")
        if buckets:  # cumulative counts by upper bound (ms), "+Inf" counting every request
            counts = [n for _, n in sorted(buckets.items(), key=lambda item: float(item[0]))]
            _expect(
                counts == sorted(counts), f"{where}: {name}.latency_ms_buckets are not cumulative: {buckets}"
            )
            _expect(
                buckets.get("+Inf") == entry["requests"],
                f"{where}: {name}.latency_ms_buckets['+Inf'] is not its {entry['requests']} requests",
            )
            _expect(
                all(math.isfinite(float(bound)) for bound in buckets if bound != "+Inf"),
                f"{where}: {name}.latency_ms_buckets has bounds that are not numbers: {sorted(buckets)}",
            )
        predicted = entry.get("predicted")
        _expect(
            isinstance(predicted, dict) and all(isinstance(n, int) for n in predicted.values()),
            f"{where}: {name}.predicted is {predicted!r}, expected rows per class",
        )
    return stats


def _check_remove(run: _Run) -> None:
    d = run.deployment
    run.refused("of a predictor at weight 80", "weight to 0 first", "remove", d, "v1")
    run.refused("of an unknown predictor", "has no predictor", "remove", d, "v9")
    state = run.target().remove(d, "v2")
    run.changed("remove(v2 at weight 0)", state, {"v1": ("1", 80, False), "v3": ("3", 20, False)})
    if run.target().supports_shadow:
        run.target().set_traffic(d, {"v1": 100}, shadow={"v3": 10})
    else:
        run.target().set_traffic(d, {"v1": 100, "v3": 0})
    state = run.target().remove(d, "v3")  # a shadow answers no client: it may go at once
    run.changed("remove(the shadow v3)", state, {"v1": ("1", 100, False)})


def _check_delete(run: _Run) -> None:
    d = run.deployment
    run.target().delete(d)
    for method in ("state", "metrics"):
        run.refused("after delete()", "not deployed", method, d)
    run.target().delete(d)  # again: a no-op
    # The name is free again.
    state = run.target().deploy(d, [run.predictor(2, 100)])
    run.changed("deploy() after delete()", state, {"v2": ("2", 100, False)})
