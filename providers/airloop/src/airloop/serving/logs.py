"""The gateway's logs: JSON lines under the artefact root, written in complete files and read back.

``requests/<deployment>/<YYYYMMDD>/*.jsonl``: one record per prediction (``request_id``, ``ts``,
``predictor`` (the arm), ``model_version``, ``features``, ``prediction``, ``classes``, ``status``);
``shadow/...``: one per mirrored request; ``labels/...``: one per truth label (``request_id``, ``ts``,
``truth``, ``source``), from the gateway's feedback endpoint or the labels ingest. ``airloop.labels``
joins labels to predictions on the id.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from pyarrow import fs as pafs

REQUESTS_FOLDER = "requests"
SHADOW_FOLDER = "shadow"
LABELS_FOLDER = "labels"
# How often the gateway writes its buffered records at most: a reader sees a record this long after it.
FLUSH_INTERVAL_S = 5.0
_COMPACT = json.JSONEncoder(separators=(",", ":"))


class RequestLog:
    """Buffers one record per request and writes complete files of JSON lines to the artefact store.

    Files go to ``<root>/<folder>/<deployment>/<YYYYMMDD>/<HHMMSS>-<uuid>.jsonl``; on a local disk
    they are written under a temporary name and renamed, so a reader never sees half a file. Records
    carry ``ts`` as epoch seconds; encoding them (``ts`` as ISO 8601) happens in ``write``, in a
    worker thread, not on the request's path.
    """

    def __init__(
        self, root_uri: str, deployment: str, batch_size: int, folder: str = REQUESTS_FOLDER
    ) -> None:
        self._fs, base = pafs.FileSystem.from_uri(root_uri)
        self._dir = f"{base.rstrip('/')}/{folder}/{deployment}"
        self._batch_size = batch_size
        self._records: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> bool:
        """Buffer a record; True when the batch is full and should be flushed."""
        self._records.append(record)
        return len(self._records) >= self._batch_size

    def take(self) -> list[dict[str, Any]]:
        records, self._records = self._records, []
        return records

    def write(self, records: list[dict[str, Any]]) -> str | None:
        if not records:
            return None
        lines = [
            _COMPACT.encode(
                {**r, "ts": datetime.fromtimestamp(r["ts"], UTC).isoformat(timespec="milliseconds")}
            )
            for r in records
        ]
        now = datetime.now(UTC)
        folder = f"{self._dir}/{now:%Y%m%d}"
        path = f"{folder}/{now:%H%M%S}-{uuid.uuid4().hex}.jsonl"
        self._fs.create_dir(folder, recursive=True)
        local = isinstance(self._fs, pafs.LocalFileSystem)
        # Object stores publish whole objects anyway; a local file is renamed once complete.
        staging = f"{folder}/.{uuid.uuid4().hex}.tmp" if local else path
        with self._fs.open_output_stream(staging) as out:
            out.write(("\n".join(lines) + "\n").encode())
        if local:
            self._fs.move(staging, path)
        return path


@dataclass(frozen=True)
class Log:
    """The records of one log (``ts`` as epoch seconds), and how many lines could not be read."""

    records: list[dict[str, Any]]
    unreadable: int


def read_log(root_uri: str, folder: str, deployment: str, since: float | None = None) -> Log:
    """The records of ``<root>/<folder>/<deployment>/`` with ``ts >= since``, oldest file first."""
    filesystem, base = pafs.FileSystem.from_uri(root_uri)
    where = f"{base.rstrip('/')}/{folder}/{deployment}"
    infos = filesystem.get_file_info(pafs.FileSelector(where, allow_not_found=True, recursive=True))
    first_day = None if since is None else datetime.fromtimestamp(since, UTC).strftime("%Y%m%d")
    files = sorted(
        info.path
        for info in infos
        if info.type == pafs.FileType.File
        and info.path.endswith(".jsonl")
        and (first_day is None or PurePosixPath(info.path).parent.name >= first_day)
    )
    records: list[dict[str, Any]] = []
    unreadable = 0
    for path in files:
        with filesystem.open_input_stream(path) as stream:
            lines = stream.read().decode().splitlines()
        for line in lines:
            try:
                record = json.loads(line)
                record["ts"] = datetime.fromisoformat(record["ts"]).timestamp()
            except (ValueError, KeyError, TypeError):
                unreadable += 1
                continue
            if since is None or record["ts"] >= since:
                records.append(record)
    return Log(records, unreadable)
