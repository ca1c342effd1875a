"""``airloop init DATA --label COLUMN``: draft a loop spec and its data suite from a data file.

What it infers, it prints for review: each column's kind (the suite profiler's rule), the categorical
features (the non-numeric ones, which the model encodes, ``airloop.encoding``) and the features with
missing values, the task from the label (classes, their shares), the metric and an estimator whose
conversion to OpenVINO is supported. What the loop cannot do with this data yet (a continuous label)
fails here, naming the column, rather than at the first task.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airloop.encoding import categorical_columns
from airloop.loops.spec import URI, parse
from airloop.steps.data.profile import MAX_CATEGORIES, profile
from airloop.steps.data.requests import ProfileRequest

# Trees convert to OpenVINO through hummingbird-ml and need no feature scaling: a sound first model
# on any numeric table. The estimator and its params are the spec's to change.
ESTIMATOR = "sklearn.ensemble.RandomForestClassifier"
PARAMS = {"n_estimators": 100, "max_depth": 12, "min_samples_leaf": 2}
# A class under this fraction of an even share of the rows (1 / classes): accuracy says little about
# it, so the draft's metric is balanced accuracy (the mean recall of the classes), which weighs it alike.
MINORITY_SHARE = 0.5
# The drift monitor tests windows of at least this many distinct rows; a small table gets an eighth of
# its rows instead, and a note: a window of a small world holds few distinct rows, and the reference
# sample is three quarters of a training split.
DRIFT_MIN_ROWS = 200


@dataclass(frozen=True)
class Drafted:
    spec_path: Path
    suite_path: Path
    spec: dict[str, Any]
    lines: list[str]


def draft(
    data: str,
    label: str,
    out: str | Path = "loops",
    name: str | None = None,
    key: str | None = None,
    timestamp: str | None = None,
    declared: Sequence[str] = (),
    force: bool = False,
) -> Drafted:
    """Write ``<out>/<name>.yaml`` and ``<out>/<name>.suite.json`` for ``data``; nothing is written when
    the data cannot make a loop, or (without ``force``) over existing files. ``declared``: features to
    encode (and profile) as categories though they are numeric (the non-numeric ones always are)."""
    from pandas.api import types

    from airloop.tables import read_table

    frame = read_table(data)
    for role, column in (("label", label), ("key", key), ("timestamp", timestamp)):
        if column is not None and column not in frame.columns:
            raise ValueError(
                f"--{role} {column!r} is not a column of {data}: its columns are {list(frame.columns)}"
            )
    name = name or re.sub(r"[^a-z0-9_-]+", "_", Path(data).name.split(".")[0].lower()).strip("_-") or "loop"
    if not re.fullmatch(r"[a-z][a-z0-9_-]{0,48}", name):
        raise ValueError(f"--name {name!r}: a loop name starts with a letter: a-z, 0-9, _ and - (up to 49)")
    out = Path(out)
    spec_path, suite_path = out / f"{name}.yaml", out / f"{name}.suite.json"
    existing = [str(p) for p in (spec_path, suite_path) if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)} exist: pass --force to replace them, or another --name")

    target = frame[label]
    classes = target.value_counts()
    if target.isna().any():
        raise ValueError(
            f"label {label!r} is missing on {int(target.isna().sum())} rows: label them or drop them"
        )
    continuous = types.is_float_dtype(target) and not (target == target.round()).all()
    if types.is_numeric_dtype(target) and (continuous or len(classes) > MAX_CATEGORIES):
        raise ValueError(
            f"label {label!r} looks continuous ({len(classes)} distinct numbers): regression is not "
            f"supported yet; supported task: classification (of up to {MAX_CATEGORIES} numeric classes, or"
            " of string labels)"
        )
    if len(classes) < 2:
        raise ValueError(f"label {label!r} has one value ({classes.index[0]!r}): nothing to classify")
    shares = classes / len(target)
    rare = shares.min() < MINORITY_SHARE / len(shares)
    metric = "balanced_accuracy" if rare else "accuracy"
    excluded = {label, *(c for c in (key, timestamp) if c)}
    features = [str(c) for c in frame.columns if c not in excluded]
    try:
        categorical = categorical_columns(frame[features], declared)
    except ValueError as exc:
        raise ValueError(f"--categorical: {exc}") from None

    out.mkdir(parents=True, exist_ok=True)
    profiled = profile(
        ProfileRequest(
            data_uri=data,
            out=str(suite_path),
            name=f"{name}_training_data",
            key=key,
            label=label,
            categorical=list(declared),
        )
    )
    uri = data if URI.match(data) else os.path.relpath(Path(data).resolve(), out.resolve())
    spec: dict[str, Any] = {
        "name": name,
        "data": {"uri": uri, "window": "latest"},
        "label": label,
        **({"keys": [key]} if key else {}),
        **({"timestamp": timestamp} if timestamp else {}),
        **({"categorical": categorical} if categorical else {}),
        "task": "classification",
        "model": {"estimator": ESTIMATOR, "params": dict(PARAMS)},
        "evaluation": {"metric": metric, "margin": 0.0, "alpha": 0.05},
        "suite": suite_path.name,
        "rollout": {"steps": [10, 25, 50, 100], "mode": "canary", "analysis_seconds": 30, "approval": False},
        "drift": {
            "method": "ks",
            "backend": "scipy",
            "schedule": "@hourly",
            "cooldown_minutes": 60,
            "min_rows": min(DRIFT_MIN_ROWS, max(30, len(frame) // 8)),
        },
    }
    parse(spec, base=out, source=str(spec_path))  # what it writes, it validates
    _write_spec(spec_path, spec)

    lines = [f"{len(frame)} rows, {len(frame.columns)} columns in {data}"]
    width = max(len(c["column"]) for c in profiled["columns"])
    lines += [f"  {c['column']:<{width}}  {c['kind']:<11}  {c['why']}" for c in profiled["columns"]]
    listed = ", ".join(f"{_plain(value)!r} {share:.1%}" for value, share in shares.items())
    lines.append(f"task: classification of {label!r}, {len(classes)} classes: {listed}")
    lines.append(
        f"features: {len(features)} ({', '.join(features[:8])}{', ...' if len(features) > 8 else ''})"
    )
    if categorical:
        lines.append(
            f"categorical: {', '.join(categorical)} (the non-numeric columns, and those --categorical"
            " names: the model encodes each category as its index in the training vocabulary, an unseen one"
            " as unknown; key and timestamp columns are left out with --key and --timestamp)"
        )
    missing = frame[features].isna().mean()
    if missing.any():
        listed = ", ".join(f"{column} {share:.1%}" for column, share in missing[missing > 0].items())
        lines.append(
            f"missing values: {listed} (the model fills a number with the training median and gives a"
            " category its own code; a request may leave any feature null)"
        )
    test = "McNemar's test" if metric == "accuracy" else "a paired bootstrap"
    lines.append(
        f"metric: {metric} (the search chooses by it; the offline gate tests it by {test}, margin 0)"
    )
    if rare:
        lines.append(
            f"note: class {_plain(shares.idxmin())!r} is {shares.min():.1%} of the rows: accuracy says little"
            " about it, so the metric is balanced_accuracy (the mean of the classes' recalls); f1_macro is"
            " the other macro metric"
        )
    lines.append(f"estimator: {ESTIMATOR} {PARAMS} (converts to OpenVINO through hummingbird-ml)")
    if spec["drift"]["min_rows"] < DRIFT_MIN_ROWS:
        lines.append(
            f"note: {len(frame)} rows: the drift monitor tests windows of {spec['drift']['min_rows']}+"
            f" distinct rows (drift.min_rows; {DRIFT_MIN_ROWS} for larger data), so its tests have less power"
        )
    lines.append(
        f"wrote {spec_path} and {suite_path} ({profiled['expectations']} expectations): review both,"
        " then commit them to the loops folder"
    )
    return Drafted(spec_path, suite_path, spec, lines)


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (``1``, not ``np.int64(1)``)."""
    return value.item() if hasattr(value, "item") else value


def _write_spec(path: Path, spec: dict[str, Any]) -> None:
    import yaml

    header = "# A loop spec (airloop/loops/loop.schema.json; docs/loops.md), drafted by airloop init.\n"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(header + yaml.safe_dump(spec, sort_keys=False))
    os.replace(tmp, path)
