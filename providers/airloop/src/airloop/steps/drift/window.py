"""Gather a time window of logged serving requests into one table for the drift monitor."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airloop.steps.drift.requests import CollectRequest, Window


def collect(request: CollectRequest | Mapping[str, Any]) -> Window:
    """
    Read the gateway's JSON-lines request logs under ``log_dir`` whose ``ts`` (ISO 8601) falls in
    ``[start, end)`` and write their features to ``out_path`` (parquet), one column per feature.
    """
    import pandas as pd

    request = CollectRequest.parse(request)
    log_dir = Path(request.log_dir)
    start, end = float(request.start), float(request.end)
    days = {datetime.fromtimestamp(t, UTC).strftime("%Y%m%d") for t in (start, end)}
    files = sorted(f for day in days for f in (log_dir / day).glob("*.jsonl")) if log_dir.exists() else []
    rows: list[list[Any]] = []
    names, skipped = None, 0
    for file in files:
        for line in file.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            ts = datetime.fromisoformat(record["ts"]).timestamp()
            if not start <= ts < end or record.get("status", 200) != 200:
                continue
            names = names or record["names"]
            features = record["features"]
            rows.extend(features if isinstance(features[0], list) else [features])  # a batch or one row
    frame = pd.DataFrame(rows, columns=names) if rows else pd.DataFrame()
    out = Path(request.out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out)
    return {
        "rows": len(frame),
        "path": str(out),
        "features": list(names or []),
        "files": len(files),
        "skipped_lines": skipped,
    }
