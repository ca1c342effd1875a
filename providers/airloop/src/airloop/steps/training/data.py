"""The training set of a loop turn: the rows of the declared source that the declared window selects,
written once as one table that the data gate validates and training reads.

A source is a parquet or CSV file, or a folder of them: data drops, one file per delivery, named so
that they sort in the order they arrived (``2026-05-01.parquet``, ...). The window picks drops: all of
them, the latest, or the latest n, optionally with a seeded sample of each earlier drop's rows
(``latest+history:0.2``: the new regime whole, and a fifth of the old one so it is not forgotten).
The table it writes is the exact data a turn trains on: the audit record names it by URI, SHA-256
and rows, with the files it came from, whatever later lands in the source.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airloop.steps.training.requests import WINDOW_PATTERN, BuildTrainingSetRequest, DataFile, TrainingSet
from airloop.tables import fingerprint, read_table, table_files, write_table

if TYPE_CHECKING:
    import pandas as pd

WINDOW = re.compile(WINDOW_PATTERN)


def build_training_set(request: BuildTrainingSetRequest | Mapping[str, Any]) -> TrainingSet:
    """The window of ``data_uri`` as one parquet table at ``out_path`` -> ``{"uri", "source", "window",
    "files", "rows", "columns", "sha256"}``; see docs/steps.md."""
    import pandas as pd

    request = BuildTrainingSetRequest.parse(request)
    window = WINDOW.fullmatch(request.window)
    if window is None:
        raise ValueError(
            f"window {request.window!r} is not 'all', 'latest' or 'latest:<n>' (n >= 1), optionally with"
            " '+history:<share>' (0 < share <= 1)"
        )
    history = float(window.group(4)) if window.group(4) else 0.0
    options = request.storage_options or {}
    drops = table_files(request.data_uri, options, what="training data")
    latest = len(drops) if request.window == "all" else int(window.group(2)[1:] if window.group(2) else 1)
    # The earlier drops come first, sampled (a sample of history), then the latest window whole; a
    # file is its own window.
    shares = [history] * max(len(drops) - latest, 0) + [1.0] * min(latest, len(drops))
    kept = [(drop, share) for drop, share in zip(drops, shares, strict=True) if share > 0]
    names, uris, shares = [d[0] for d, _ in kept], [d[1] for d, _ in kept], [share for _, share in kept]

    frames: list[pd.DataFrame] = []
    files: list[DataFile] = []
    for name, uri, share in zip(names, uris, shares, strict=True):
        frame = read_table(uri, options)
        if frames and list(frame.columns) != list(frames[0].columns):
            raise ValueError(
                f"{uri} has columns {list(frame.columns)}, unlike {uris[0]}'s {list(frames[0].columns)}: "
                "the drops of one training set must share their columns"
            )
        file = DataFile(name=name, rows=len(frame))
        if share < 1.0:  # seeded by the file's name: a retry takes the same sample
            frame = frame.sample(frac=share, random_state=zlib.crc32(name.encode()))
            file["rows"], file["sampled"] = len(frame), share
        frames.append(frame)
        files.append(file)
    write_table(_columns(pd.concat(frames, ignore_index=True), request), request.out_path)
    # Fingerprinted as read back: what the gate and training will read.
    written = fingerprint(read_table(request.out_path))
    return {
        "uri": request.out_path,
        "source": request.data_uri,
        "window": request.window,
        "files": files,
        "rows": written["rows"],
        "columns": written["columns"],
        "sha256": written["sha256"],
    }


def _columns(frame: pd.DataFrame, request: BuildTrainingSetRequest) -> pd.DataFrame:
    """The inputs, then the label: what the model trains on, in the order it is served."""
    if request.label_column is None and request.features is None and not request.exclude:
        return frame
    have = list(frame.columns)
    roles = {
        "label column": [request.label_column] if request.label_column else [],
        "feature columns": request.features or [],
        "key/timestamp columns": request.exclude,
    }
    for role, named in roles.items():
        missing = [column for column in named if column not in have]
        if missing:
            raise ValueError(
                f"{role} {missing} not in the training data {request.data_uri}: its columns are {have}"
            )
    label = roles["label column"]
    features = request.features or [c for c in have if c not in {*label, *request.exclude}]
    if not features:
        raise ValueError(
            f"the training data {request.data_uri} has no feature column besides {label + request.exclude}"
        )
    return frame[[*features, *label]]
