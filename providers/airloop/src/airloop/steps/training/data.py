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
from airloop.tables import fingerprint, read_table, write_table

TABLE_SUFFIXES = (".parquet", ".csv", ".csv.gz")
WINDOW = re.compile(r"all|latest(?::([1-9][0-9]*))?")


def build_training_set(request: BuildTrainingSetRequest | Mapping[str, Any]) -> TrainingSet:
    """The window of ``data_uri`` as one parquet table at ``out_path`` -> ``{"uri", "source", "window",
    "files", "rows", "columns", "sha256"}``; see docs/steps.md."""
    import fsspec
    import pandas as pd

    request = BuildTrainingSetRequest.parse(request)
    window = WINDOW.fullmatch(request.window)
    if window is None:
        raise ValueError(f"window {request.window!r} is not 'all', 'latest' or 'latest:<n>' (n >= 1)")
    options = request.storage_options or {}
    fs, root = fsspec.core.url_to_fs(request.data_uri, **options)
    if not fs.exists(root):
        raise ValueError(f"training data {request.data_uri} does not exist")
    if fs.isdir(root):
        names = sorted(
            path[len(root.rstrip("/")) + 1 :]
            for path in fs.find(root)
            if path.lower().endswith(TABLE_SUFFIXES) and not _hidden(path[len(root.rstrip("/")) + 1 :])
        )
        if not names:
            raise ValueError(f"training data folder {request.data_uri} holds no parquet or CSV file")
        if request.window != "all":
            names = names[-int(window.group(1) or 1) :]
        uris = [f"{request.data_uri.rstrip('/')}/{name}" for name in names]
    else:
        names, uris = [root.rstrip("/").rsplit("/", 1)[-1]], [request.data_uri]

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


def _hidden(name: str) -> bool:
    """Files that writers leave beside the data (``_SUCCESS``, ``.part`` files) are not drops."""
    return any(part.startswith((".", "_")) for part in name.split("/"))
