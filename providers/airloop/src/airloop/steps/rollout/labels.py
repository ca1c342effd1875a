"""Ingest ground truth that lands as files or tables: join each label to its logged prediction on the
request id, count what cannot be used, and append the rest to the labels log.

Each row of the ground truth (``id_column``, ``label_column``, optionally ``time_column``: when the
label became known) ends in exactly one count, decided in this order:

- ``invalid``: no id or no label, an unreadable time, a label before its prediction, or a request
  of several rows (one row of ground truth labels one prediction);
- ``duplicates``: the request already has a label (in the labels log: feedback, or an earlier
  ingest; or an earlier row of this batch that was not invalid), so a retried ingest counts its
  rows again as duplicates and writes nothing twice;
- ``unknown``: no answered prediction with this id in the request log of the last
  ``lookback_hours``;
- ``too_late``: the label came more than ``max_label_delay_hours`` after the prediction;
- ``matched``: written to the labels log (``airloop.serving.logs``) with the arm, model version,
  label lag and whether the prediction was right.

``quality`` then summarises the whole labels log per predictor: the first label of each request,
joined to the request log (``airloop.labels.matured``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from airloop.labels import matured, outcome, served
from airloop.serving.logs import LABELS_FOLDER, REQUESTS_FOLDER, RequestLog, read_log
from airloop.steps.rollout.requests import Arm, IngestLabelsRequest, IngestResult
from airloop.tables import read_table, table_files

if TYPE_CHECKING:
    import pandas as pd

COUNTS = ("duplicates", "unknown", "too_late", "invalid")
_EXAMPLES = 5


def ingest(request: IngestLabelsRequest | Mapping[str, Any]) -> IngestResult:
    """Join the ground truth to the request log; see the module's docstring for the counts."""
    from airloop.serving.model import label_value

    request = IngestLabelsRequest.parse(request)
    now = time.time() if request.now is None else float(request.now)
    max_delay = _hours(request.max_label_delay_hours, "max_label_delay_hours") * 3600
    since = now - _hours(request.lookback_hours, "lookback_hours") * 3600
    source = request.source or request.labels_path
    truth = _ground_truth(request, source)
    ids, labels = truth[request.id_column].tolist(), truth[request.label_column].tolist()
    times = _label_times(truth, request, now)

    requests = read_log(request.artefact_root, REQUESTS_FOLDER, request.deployment, since)
    labels_log = read_log(request.artefact_root, LABELS_FOLDER, request.deployment, since)
    predictions = served(requests.records)
    seen = {record["request_id"] for record in labels_log.records}
    counts = dict.fromkeys(COUNTS, 0)
    examples: dict[str, list[str]] = {name: [] for name in COUNTS}
    matched: list[dict[str, Any]] = []
    for row, (request_id, label, at) in enumerate(zip(ids, labels, times, strict=True)):
        key = None if _missing(request_id) else str(request_id)
        prediction = predictions.get(key) if key is not None else None
        if key is None or _missing(label) or math.isnan(at):
            kind = "invalid"
        elif key in seen:
            kind = "duplicates"
        elif prediction is None:
            kind = "unknown"
        elif at < prediction["ts"] or len(prediction["prediction"]) != 1:
            kind = "invalid"
        elif at - prediction["ts"] > max_delay:
            kind = "too_late"
        else:
            kind = None
        if key is not None and kind != "invalid":
            seen.add(key)  # the first usable row of an id decides; later rows of it are duplicates
        if kind is not None:
            counts[kind] += 1
            if len(examples[kind]) < _EXAMPLES:
                examples[kind].append(key if key is not None else f"row {row}")
            continue
        assert prediction is not None
        value = [label_value(label)]
        matched.append(
            {
                **outcome(prediction, value, at),
                "ts": at,
                "deployment": request.deployment,
                "truth": value,
                "reward": None,
                "source": "ingest",
            }
        )
    written = RequestLog(request.artefact_root, request.deployment, len(matched) + 1, LABELS_FOLDER).write(
        matched
    )
    # The labels log as it now stands, read back: the same figures whoever reads it next.
    arms, unresolved = matured(
        read_log(request.artefact_root, LABELS_FOLDER, request.deployment, since).records, predictions
    )
    return {
        "source": source,
        "rows": len(ids),
        "matched": len(matched),
        "duplicates": counts["duplicates"],
        "unknown": counts["unknown"],
        "too_late": counts["too_late"],
        "invalid": counts["invalid"],
        "examples": {name: found for name, found in examples.items() if found},
        "written": written,
        "unreadable_log_lines": requests.unreadable + labels_log.unreadable,
        "unresolved": unresolved,
        "quality": cast(dict[str, Arm], arms),
    }


def _ground_truth(request: IngestLabelsRequest, source: str) -> pd.DataFrame:
    import pandas as pd

    # Ids as written: a CSV reader would turn an id of digits into a number and drop its leading zeros.
    ids = {request.id_column: str}
    frames = [
        read_table(uri, csv_dtype=ids) for _, uri in table_files(request.labels_path, what="ground truth")
    ]
    truth = pd.concat(frames, ignore_index=True)
    wanted = [
        request.id_column,
        request.label_column,
        *([request.time_column] if request.time_column else []),
    ]
    missing = [column for column in wanted if column not in truth.columns]
    if missing:
        raise ValueError(
            f"ground truth {source} has no column {missing} (it has {list(truth.columns)}): "
            "set id_column, label_column and time_column to its names"
        )
    return truth


def _label_times(truth: pd.DataFrame, request: IngestLabelsRequest, now: float) -> list[float]:
    """Epoch seconds per row (NaN where unreadable): the time column, or the time of the ingest."""
    import pandas as pd

    if not request.time_column:
        return [now] * len(truth)
    column = truth[request.time_column]
    if pd.api.types.is_numeric_dtype(column):
        return [float(t) for t in column]
    parsed = pd.to_datetime(column, utc=True, errors="coerce")
    return [math.nan if pd.isna(t) else t.timestamp() for t in parsed]


def _missing(value: Any) -> bool:
    import pandas as pd

    return value == "" or bool(pd.isna(value))


def _hours(value: Any, name: str) -> float:
    try:
        hours = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of hours, got {value!r}") from None
    if not math.isfinite(hours) or hours <= 0:
        raise ValueError(f"{name} must be a positive number of hours, got {value!r}")
    return hours
