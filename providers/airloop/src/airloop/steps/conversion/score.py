"""Batch scoring: a data set scored in chunks by a model version's OpenVINO IR, resumably.

The IR is the one the conversion step selected and stored with the version's run (``openvino/``);
its files are checked against their SHA-256 once, as it is fetched, and it is compiled and called as
the model server does (``airloop.openvino_ir.ir_predictor``), so a batch score equals a served one.

The data set is a parquet file (read one record batch of ``chunk_rows`` at a time) or a CSV file
(read in chunks of ``chunk_rows``), local or at any fsspec URL (``s3://...``) with ``storage_options``.
A Feast training set is scored by writing its retrieval to parquet and passing that URI.

Output, under ``output_uri``: ``part-00000.parquet``... (one per chunk: the passthrough columns,
``prediction``, ``probability_<class>``, ``model_name``, ``model_version``) and ``_manifest.json``,
rewritten after each part: the model version, IR checksums, data set, chunk size and each finished
part's row count. A re-run with the same request skips the parts the manifest lists whose files hold
the listed rows, and scores the rest; a manifest for another model version, IR, data set (or a
changed file at the same URI) or chunk size is refused instead of mixed with. The run ends with a
row count check (rows read == rows in the parts on storage) and marks the manifest ``complete``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from airloop.openvino_ir import IR_PATH, fetch_ir, ir_predictor, table_rows
from airloop.steps.conversion.requests import ScoreRequest, ScoreResult
from airloop.tables import is_csv, parquet_table, write_table
from airloop.tracking.session import mlflow_step

if TYPE_CHECKING:
    import pandas as pd

MANIFEST = "_manifest.json"
PREDICTION = "prediction"


class RowCountError(RuntimeError):
    """The parts on storage do not hold as many rows as the data set."""


@mlflow_step
def score(request: ScoreRequest | Mapping[str, Any]) -> ScoreResult:
    """The data set scored into ``output_uri`` -> ``{"output_uri", "manifest_uri", "model_name",
    "model_version", "variant", "rows_in", "rows_out", "parts", "chunks_scored", "chunks_skipped"}``;
    see docs/openvino.md."""
    import fsspec
    import mlflow
    import numpy as np

    request = ScoreRequest.parse(request)
    for key in ("model_name", "model_version", "data_uri", "output_uri"):
        if not getattr(request, key):
            raise ValueError(f"request is missing {key!r}")
    name, version = str(request.model_name), str(request.model_version)
    chunk_rows = int(request.chunk_rows)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    passthrough = list(request.passthrough_columns)
    options = request.storage_options
    ir_uri = request.ir_uri
    if not ir_uri:
        client = mlflow.MlflowClient(tracking_uri=request.tracking_uri)
        run_id = client.get_model_version(name, version).run_id
        ir_uri = f"runs:/{run_id}/{IR_PATH}"

    output_uri = request.output_uri.rstrip("/")
    out_fs, out_dir = fsspec.core.url_to_fs(output_uri, **options)
    with tempfile.TemporaryDirectory() as tmp:
        # The request's MLflow settings too: the block this step runs in has them.
        fetched = fetch_ir({**request.to_dict(), "ir_uri": ir_uri, "dst_dir": tmp})
        manifest_of_ir = fetched["manifest"]
        # Probabilities as the server returns them (float64), from the IR verified just now.
        predict = ir_predictor(f"{fetched['model_dir']}/model.xml", np.float64)
        features = list(manifest_of_ir["feature_names"])
        classes = [str(c) for c in manifest_of_ir["classes"]]
        identity = {
            "model_name": name,
            "model_version": version,
            "ir_files": fetched["files"],
            "data_uri": request.data_uri,
            "chunk_rows": chunk_rows,
            "data_version": _data_version(request.data_uri, options),
        }
        manifest = _resume(out_fs, out_dir, identity)
        scored = skipped = rows_in = chunks = 0
        for index, chunk in enumerate(_chunks(request.data_uri, chunk_rows, options)):
            rows_in, chunks = rows_in + len(chunk), index + 1
            part = _part(index)
            if _part_rows(out_fs, f"{out_dir}/{part}") == manifest["parts"].get(part, -1) == len(chunk):
                skipped += 1
                continue
            missing = sorted(set(features + passthrough) - set(chunk.columns))
            if missing:
                raise ValueError(f"data set {request.data_uri} lacks columns {missing}")
            probabilities = predict(table_rows(manifest_of_ir, chunk))
            write_table(
                _predictions(chunk[passthrough], probabilities, classes, name, version),
                f"{output_uri}/{part}",
                options,
            )
            manifest["parts"][part] = len(chunk)
            _write_manifest(out_fs, out_dir, manifest)
            scored += 1

    # The check reads the parts back from storage: a lost or truncated part is caught here.
    stale = sorted(set(manifest["parts"]) - {_part(i) for i in range(chunks)})
    rows_out = sum(_part_rows(out_fs, f"{out_dir}/{_part(i)}") or 0 for i in range(chunks))
    if stale or rows_out != rows_in:
        raise RowCountError(
            f"row count check failed for {request.output_uri}: {rows_in} rows in {request.data_uri}, "
            f"{rows_out} rows in its {chunks} prediction parts on storage"
            + (f", and parts beyond the data set {stale}" if stale else "")
            + "; the output is not marked complete"
        )
    manifest.update(complete=True, rows=rows_in)
    _write_manifest(out_fs, out_dir, manifest)
    return {
        "output_uri": request.output_uri,
        "manifest_uri": f"{output_uri}/{MANIFEST}",
        "model_name": name,
        "model_version": version,
        "ir_uri": ir_uri,
        "variant": manifest_of_ir["precision"],
        "rows_in": rows_in,
        "rows_out": rows_out,
        "parts": chunks,
        "chunks_scored": scored,
        "chunks_skipped": skipped,
    }


def _data_version(uri: str, options: dict[str, Any]) -> str:
    """A key that changes when the file does (fsspec's ``ukey``: size and mtime, or the S3 ETag)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **options)
    if not fs.isfile(path):
        raise ValueError(f"data set {uri} does not exist or is not a file")
    return str(fs.ukey(path))


def _part(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _chunks(uri: str, chunk_rows: int, options: dict[str, Any]) -> Iterator[pd.DataFrame]:
    """The data set in chunks of ``chunk_rows`` rows (the last may be shorter), the same on every run;
    each chunk is indexed by its row numbers."""
    import fsspec
    import pandas as pd

    if is_csv(uri):
        fs, path = fsspec.core.url_to_fs(uri, **options)
        with fs.open(path, "rb") as handle:
            compression = "gzip" if uri.endswith(".gz") else None
            yield from pd.read_csv(handle, chunksize=chunk_rows, compression=compression)
        return
    with parquet_table(uri, options) as table:
        yield from table.batches(chunk_rows)


def _predictions(
    passthrough: pd.DataFrame, probabilities: Any, classes: list[str], name: str, version: str
) -> pd.DataFrame:
    frame = passthrough.reset_index(drop=True).copy()
    frame[PREDICTION] = [classes[i] for i in probabilities.argmax(axis=1)]
    for i, label in enumerate(classes):
        frame[f"probability_{label}"] = probabilities[:, i]
    frame["model_name"], frame["model_version"] = name, version
    return frame


def _part_rows(fs: Any, path: str) -> int | None:
    """Rows in the parquet part at ``path`` (from its footer), ``None`` when missing or unreadable."""
    import pyarrow.parquet as pq

    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    except Exception:  # a truncated part is as good as a missing one: it is scored again
        return None


def _resume(fs: Any, out_dir: str, identity: dict[str, Any]) -> dict[str, Any]:
    """The manifest to continue from: the stored one when it is for the same request, else a new one."""
    path = f"{out_dir}/{MANIFEST}"
    if not fs.exists(path):
        return {**identity, "parts": {}, "complete": False}
    with fs.open(path, "rb") as handle:
        stored = json.load(handle)
    differs = sorted(key for key, value in identity.items() if stored.get(key) != value)
    if differs:
        raise ValueError(
            f"{out_dir} holds predictions of another request (its {', '.join(differs)} differ): "
            "score into a new output_uri, or remove that folder first"
        )
    return {**stored, "complete": False}


def _write_manifest(fs: Any, out_dir: str, manifest: dict[str, Any]) -> None:
    """Write the manifest whole or not at all, as ``write_table`` writes the parts: a local file is
    renamed into place; an object store publishes an object only once its upload completes."""
    from fsspec.implementations.local import LocalFileSystem

    path = f"{out_dir}/{MANIFEST}"
    local = isinstance(fs, LocalFileSystem)
    if local:
        fs.makedirs(out_dir, exist_ok=True)
    with fs.open(f"{path}.tmp" if local else path, "w") as handle:
        json.dump(manifest, handle, indent=2)
    if local:
        fs.mv(f"{path}.tmp", path)
