"""The training set of a loop turn: the rows of the declared source that the declared window selects,
written once as one table that the data gate validates and training reads.

A source is a parquet or CSV file, or a folder of them: data drops, one file per delivery, named so
that they sort in the order they arrived (``2026-05-01.parquet``, ...). The window picks drops: all of
them, the latest, or the latest n. The table it writes is the exact data a turn trains on: the audit
record names it by URI, SHA-256 and rows, with the files it came from, whatever later lands in the
source.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from airloop.steps.training.requests import BuildTrainingSetRequest, DataFile, TrainingSet
from airloop.tables import fingerprint, read_table, table_files, write_table

WINDOW = re.compile(r"all|latest(?::([1-9][0-9]*))?")


def build_training_set(request: BuildTrainingSetRequest | Mapping[str, Any]) -> TrainingSet:
    """The window of ``data_uri`` as one parquet table at ``out_path`` -> ``{"uri", "source", "window",
    "files", "rows", "columns", "sha256"}``; see docs/steps.md."""
    import pandas as pd

    request = BuildTrainingSetRequest.parse(request)
    window = WINDOW.fullmatch(request.window)
    if window is None:
        raise ValueError(f"window {request.window!r} is not 'all', 'latest' or 'latest:<n>' (n >= 1)")
    options = request.storage_options or {}
    drops = table_files(request.data_uri, options, what="training data")
    if request.window != "all":
        drops = drops[-int(window.group(1) or 1) :]  # a file is its own window
    names, uris = [name for name, _ in drops], [uri for _, uri in drops]

    frames: list[pd.DataFrame] = []
    files: list[DataFile] = []
    for name, uri in zip(names, uris, strict=True):
        frame = read_table(uri, options)
        if frames and list(frame.columns) != list(frames[0].columns):
            raise ValueError(
                f"{uri} has columns {list(frame.columns)}, unlike {uris[0]}'s {list(frames[0].columns)}: "
                "the drops of one training set must share their columns"
            )
        frames.append(frame)
        files.append(DataFile(name=name, rows=len(frame)))
    write_table(pd.concat(frames, ignore_index=True), request.out_path)
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
