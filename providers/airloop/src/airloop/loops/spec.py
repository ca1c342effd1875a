"""The loop spec: one YAML file that declares a loop (``loop.schema.json``; docs/loops.md).

``load`` reads and validates a spec file, ``parse`` a mapping (relative paths resolve against
``base``); both return a ``LoopSpec`` with every default filled in, or raise ``SpecError`` naming
each field that is wrong. PyYAML and jsonschema only (Airflow's own dependencies): the DAG file that
turns a folder of specs into DAGs imports this at parse time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from airloop import settings

SCHEMA_PATH = Path(__file__).with_name("loop.schema.json")
SPEC_SUFFIXES = (".yaml", ".yml")
# A URI with a scheme (s3://, gs://, file://) is taken as it is; anything else is a path.
URI = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


class SpecError(ValueError):
    """A spec that does not validate; ``problems`` holds one ``"field: what is wrong"`` per error."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source, self.problems = source, problems
        super().__init__(f"loop spec {source} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True, kw_only=True)
class LoopSpec:
    """A validated loop spec; ``raw`` is the mapping it came from, with the schema's defaults."""

    name: str
    data: dict[str, Any]
    label: str
    suite: str
    estimator: str
    params: dict[str, Any] = field(default_factory=dict)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    # An Optuna search: ``space``, ``rounds``, ``trials`` a round, ``patience``, ``seed`` (defaults in).
    search: dict[str, Any] | None = None
    features: list[str] | None = None
    # Features encoded as categories besides the non-numeric ones (``airloop.encoding``).
    categorical: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    timestamp: str | None = None
    task: str = "classification"
    evaluation: dict[str, Any] = field(default_factory=dict)
    conversion: dict[str, Any] = field(default_factory=dict)
    rollout: dict[str, Any] = field(default_factory=dict)
    drift: dict[str, Any] = field(default_factory=dict)
    # Ground truth that lands later, ingested by ``<name>_labels``; ``None``: labels come as feedback.
    labels: dict[str, Any] | None = None
    description: str = ""
    source: str = "<mapping>"

    @property
    def loop_dag_id(self) -> str:
        return f"{self.name}_loop"

    @property
    def monitor_dag_id(self) -> str:
        return f"{self.name}_drift_monitor"

    @property
    def labels_dag_id(self) -> str:
        return f"{self.name}_labels"

    @property
    def excluded(self) -> list[str]:
        """Columns of the data that are not model inputs: the keys and the timestamp."""
        return [*self.keys, *([self.timestamp] if self.timestamp else [])]


@cache
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return loaded


def load(path: str | Path) -> LoopSpec:
    """Read and validate the spec at ``path``."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise SpecError(str(path), [f"not valid YAML: {exc}"]) from exc
    return parse(raw, base=path.parent, source=str(path))


def load_folder(folder: str | Path) -> list[LoopSpec]:
    """Every spec in ``folder`` (``*.yaml``, ``*.yml``), in name order; one ``SpecError`` for all the
    bad ones, and for two specs with one name (their DAGs, models and deployments would collide)."""
    specs: list[LoopSpec] = []
    problems: list[str] = []
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix in SPEC_SUFFIXES and p.is_file())
    for path in paths:
        try:
            specs.append(load(path))
        except SpecError as exc:
            problems += [f"{path.name}: {problem}" for problem in exc.problems]
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen:
            problems.append(f"{Path(spec.source).name}: name: {spec.name!r} is taken by {seen[spec.name]}")
        seen.setdefault(spec.name, Path(spec.source).name)
    if problems:
        raise SpecError(str(folder), problems)
    return specs


def parse(raw: Any, base: str | Path | None = None, source: str = "<mapping>") -> LoopSpec:
    """Validate ``raw`` against the schema and resolve its paths against ``base`` (default: the
    working directory)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(raw), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        raise SpecError(source, [_problem(error) for error in errors])
    assert isinstance(raw, Mapping)
    spec = dict(raw)
    problems = _cross_checks(spec)
    if problems:
        raise SpecError(source, problems)
    root = Path(base) if base is not None else Path.cwd()
    data = {"window": "latest", **spec["data"]}
    if "uri" in data:
        data["uri"] = _resolve(data["uri"], root)
    if "feast" in data:
        data["feast"] = {**data["feast"], "entity_rows": _resolve(data["feast"]["entity_rows"], root)}
    model = spec["model"]
    return LoopSpec(
        name=spec["name"],
        description=spec.get("description", ""),
        data=data,
        label=spec["label"],
        features=spec.get("features"),
        categorical=list(spec.get("categorical", [])),
        keys=list(spec.get("keys", [])),
        timestamp=spec.get("timestamp"),
        task=spec.get("task", "classification"),
        estimator=model["estimator"],
        params=dict(model.get("params", {})),
        candidates=[dict(c) for c in model.get("candidates", [])],
        search=_search(model.get("search")),
        evaluation=_defaults("evaluation", spec),
        suite=_resolve(spec["suite"], root),
        conversion=_defaults("conversion", spec),
        rollout=_defaults("rollout", spec),
        drift=_defaults("drift", spec),
        labels=_labels(spec, root),
        source=source,
    )


def _cross_checks(spec: dict[str, Any]) -> list[str]:
    """What one schema rule cannot say: the roles of columns do not overlap, the rollout climbs."""
    problems = []
    label, features = spec["label"], spec.get("features") or []
    others = [*spec.get("keys", []), *([spec["timestamp"]] if "timestamp" in spec else [])]
    if label in features:
        problems.append(f"features: the label {label!r} cannot be a feature")
    if label in others:
        problems.append(f"label: {label!r} is also a key or the timestamp")
    for column in sorted(set(features) & set(others)):
        problems.append(f"features: {column!r} is also a key or the timestamp")
    categorical = spec.get("categorical", [])
    for column in [c for c in categorical if c == label or c in others or (features and c not in features)]:
        problems.append(f"categorical: {column!r} is not a feature")
    model = spec["model"]
    if "candidates" in model and "search" in model:
        problems.append("model: give candidates (a list) or search (a space), not both")
    for name, space in model.get("search", {}).get("space", {}).items():
        bounds = space.get("int") or space.get("float")
        if bounds and not bounds[0] < bounds[1]:
            problems.append(f"model.search.space.{name}: low {bounds[0]} must be under high {bounds[1]}")
        elif bounds and space.get("log") and bounds[0] <= 0:
            problems.append(f"model.search.space.{name}: a log scale needs low > 0")
    steps = spec.get("rollout", {}).get("steps", [])
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        problems.append(f"rollout.steps: {steps} must rise step by step (traffic percent to the challenger)")
    drift = spec.get("drift", {})
    if drift.get("method") == "mmd" and drift.get("backend", "scipy") != "alibi":
        problems.append("drift.method: 'mmd' needs drift.backend 'alibi' (the scipy backend has ks and cvm)")
    if drift.get("backend") == "alibi" and settings.licence_clean():
        problems.append(
            f"drift.backend: 'alibi' (alibi-detect) is published under the Business Source License, which "
            f"the {settings.LICENCE_CLEAN} profile ({settings.PROFILE_ENV}) leaves out: use 'scipy'"
        )
    return problems


def _search(search: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if search is None:
        return None
    properties = schema()["properties"]["model"]["properties"]["search"]["properties"]
    return {**{key: p["default"] for key, p in properties.items() if "default" in p}, **search}


def _labels(spec: Mapping[str, Any], root: Path) -> dict[str, Any] | None:
    if "labels" not in spec:
        return None
    labels = {"label_column": spec["label"], **_defaults("labels", spec)}
    if "uri" in labels:
        labels["uri"] = _resolve(labels["uri"], root)
    return labels


def _defaults(section: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The section as given, over the schema's defaults for its properties."""
    properties = schema()["properties"][section]["properties"]
    defaults = {key: prop["default"] for key, prop in properties.items() if "default" in prop}
    return {**defaults, **spec.get(section, {})}


def _resolve(path: str, root: Path) -> str:
    if URI.match(path) or Path(path).is_absolute():
        return path
    return str((root / path).resolve())


def _problem(error: Any) -> str:
    """``field.path[0]: message`` (the root's problems as ``spec``)."""
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    message = error.message
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        message += f"; known fields: {', '.join(allowed)}"
    elif error.validator == "enum":
        message = (
            f"{error.instance!r} is not supported; supported: {', '.join(map(repr, error.validator_value))}"
        )
    elif error.validator == "required":
        missing = next(name for name in error.validator_value if name not in error.instance)
        return f"{where + '.' if where else ''}{missing}: required, missing"
    elif error.validator == "oneOf" and where == "data":
        message = "give one source: uri (a file or folder), sql with conn_id, or feast"
    elif error.validator == "oneOf" and where in ("labels", "drift.window"):
        message = "give one source: uri (a file or folder), or sql with conn_id"
    return f"{where or 'spec'}: {message}"
