"""What the data gate costs over bare Great Expectations, and what a large file costs in memory.

(a) 1M rows x 10 columns, one suite profiled from the data (41 expectations: columns, row count,
    dtypes, nulls, ranges, the label's value set, key uniqueness, label-leakage guards). Side by
    side in one process, alternating: bare GX (ephemeral context, the in-memory frame as a batch,
    ``batch.validate(suite)``; or a checkpoint that also builds Data Docs) against the gate
    (``validate``: read the parquet file, fingerprint, validate, summarise, with or without Data
    Docs) and the gate on the same in-memory frame (``validate_frame``). Target: <= 1.2x.
(b) 10M rows x 10 columns in parquet, validated in row batches (the default above 2M rows), in a
    fresh process: peak RSS against the table's in-memory size, and against a whole-table run.

    .venv/bin/python benchmarks/validation.py [--rows 1000000] [--large-rows 10000000] [--repeat 5]
        [--skip-large] [--skip-whole-large]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from airloop.embedded.demo import generate
from airloop.steps.data.profile import profile_suite
from airloop.steps.data.validate import validate, validate_frame
from airloop.tables import fingerprint, read_table, write_table

TARGET = 1.2
# Peak RSS from /proc (VmHWM): getrusage's ru_maxrss survives exec on Linux, so a child would report
# the benchmark process's own size at fork.
_IN_CHILD = """
import json, sys, time
request = json.loads(sys.argv[1])
from airloop.steps.data.validate import validate
import great_expectations, pandas, pyarrow.parquet
def peak_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
before = peak_mb()
start = time.perf_counter()
result = validate(request)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_mb": peak_mb(), "imports_mb": before,
                  "success": result["success"], "batches": result["batches"], "rows": result["rows"],
                  "failed": [f["expectation"] for f in result["failed"]]}))
"""


def _table(rows: int, seed: int, start: int = 0):
    frame = generate(rows, seed=seed)
    frame.insert(0, "id", np.arange(start, start + rows, dtype="int64"))
    return frame


def _bare_gx(frame, suite: dict, docs_dir: str | None = None) -> bool:
    """What a user writes with GX alone: ephemeral context, the frame as a batch, the suite; with
    ``docs_dir``, a checkpoint whose UpdateDataDocsAction builds a Data Docs site there."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    import airloop.expectations  # noqa: F401 (the leakage guard, so both sides run the same suite)

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    definition = (
        context.data_sources.add_pandas("bare")
        .add_dataframe_asset("frame")
        .add_batch_definition_whole_dataframe("whole")
    )
    suite_gx = gx.ExpectationSuite(
        name=suite["name"],
        expectations=[
            ExpectationConfiguration(type=e["type"], kwargs=e["kwargs"]).to_domain_obj()
            for e in suite["expectations"]
        ],
    )
    if not docs_dir:
        batch = definition.get_batch(batch_parameters={"dataframe": frame})
        return bool(batch.validate(suite_gx, result_format="SUMMARY").success)
    context.add_data_docs_site(
        "bare",
        {
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": docs_dir},
        },
    )
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name="bare", data=definition, suite=context.suites.add(suite_gx))
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="bare",
            validation_definitions=[validation],
            result_format="SUMMARY",
            actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["bare"])],
        )
    )
    return bool(checkpoint.run(batch_parameters={"dataframe": frame}).success)


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def gate_overhead(folder: Path, rows: int, repeat: int) -> None:
    path = write_table(_table(rows, seed=0), str(folder / "table.parquet"))
    # The frame as read from the file: generate()'s own frame holds its columns strided in one 2-D block,
    # which makes every column operation of GX several times slower than on the contiguous columns read.
    frame = read_table(path)
    suite = profile_suite(frame, "bench", key="id", label="label")
    print(
        f"(a) {rows:,} rows x {frame.shape[1]} columns, {len(suite['expectations'])} expectations, "
        f"{Path(path).stat().st_size / 1e6:.0f} MB parquet, "
        f"{frame.memory_usage().sum() / 1e6:.0f} MB in memory; best of {repeat}, alternating"
    )
    assert _bare_gx(frame, suite) and validate_frame(frame, suite)["success"]  # warm-up; both pass
    calls = {
        "bare": lambda i: _bare_gx(frame, suite),
        "bare_docs": lambda i: _bare_gx(frame, suite, str(folder / f"bare-docs-{i}")),
        "gate": lambda i: validate({"data_uri": path, "suite": suite, "docs_dir": str(folder / f"docs-{i}")}),
        "gate_no_docs": lambda i: validate({"data_uri": path, "suite": suite}),
        "frame": lambda i: validate_frame(frame, suite),
        "read": lambda i: read_table(path),
        "fingerprint": lambda i: fingerprint(frame),
    }
    times: dict[str, list[float]] = {key: [] for key in calls}
    for i in range(repeat):
        for key, call in calls.items():
            times[key].append(_timed(lambda: call(i)))  # noqa: B023 (called at once)
    best = {key: min(values) for key, values in times.items()}
    labels = {
        "bare": "bare GX: validate the in-memory frame",
        "bare_docs": "bare GX: checkpoint with Data Docs",
        "gate": "gate end to end: parquet, fingerprint, Data Docs",
        "gate_no_docs": "gate: parquet, fingerprint, no Data Docs",
        "frame": "gate on the in-memory frame, no Data Docs",
    }
    for key, label in labels.items():
        print(f"  {label:<50} {best[key]:6.2f} s")
    print(
        f"  parts of the gate: parquet read {best['read']:.2f} s, fingerprint {best['fingerprint']:.2f} s;"
        f" Data Docs (a fixed cost, mostly Jinja compiling GX's templates)"
        f" ~{best['gate'] - best['gate_no_docs']:.2f} s,"
        f" bare GX's ~{best['bare_docs'] - best['bare']:.2f} s"
    )
    for name, ours, theirs in (
        ("end to end, both with Data Docs", "gate", "bare_docs"),
        ("without Data Docs", "gate_no_docs", "bare"),
        ("on the same in-memory frame", "frame", "bare"),
    ):
        ratio = best[ours] / best[theirs]
        print(
            f"  ratio gate / bare GX, {name:<32} {ratio:.2f}x (target <= {TARGET}x)"
            f" {'OK' if ratio <= TARGET else 'OVER'}"
        )


def _child(request: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _IN_CHILD, json.dumps(request)], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def large_file(folder: Path, rows: int, whole: bool) -> None:
    path = folder / "large.parquet"
    chunk = 1_000_000
    suite = profile_suite(_table(chunk, seed=0), "bench-large", key="id", label="label")
    with pq.ParquetWriter(path, pa.Schema.from_pandas(_table(1, seed=0), preserve_index=False)) as writer:
        for start in range(0, rows, chunk):
            part = _table(min(chunk, rows - start), seed=start // chunk + 1, start=start)
            writer.write_table(pa.Table.from_pandas(part, preserve_index=False))
    suite["expectations"][1]["kwargs"]["max_value"] = rows  # the profile saw 1M rows; this file has more
    file = pq.ParquetFile(path)
    in_memory = rows * sum(field.type.bit_width // 8 for field in file.schema_arrow)
    print(
        f"(b) {rows:,} rows x {len(file.schema_arrow)} columns, {path.stat().st_size / 1e6:.0f} MB parquet "
        f"({file.metadata.num_row_groups} row groups), {in_memory / 1e6:.0f} MB in memory as a DataFrame"
    )
    suite_path = folder / "large-suite.json"
    suite_path.write_text(json.dumps(suite))
    batched = _child({"data_uri": str(path), "suite_path": str(suite_path)})
    runs = {f"batched ({batched['batches']} batches of 1M rows)": batched}
    if whole:
        runs["whole table at once"] = _child(
            {"data_uri": str(path), "suite_path": str(suite_path), "batch_rows": 0}
        )
    table_mb = in_memory / 2**20
    for label, run in runs.items():
        above = run["peak_mb"] - run["imports_mb"]
        print(
            f"  {label}: {run['seconds']:.1f} s, success {run['success']}, peak RSS {run['peak_mb']:.0f} MB"
            f" = {run['imports_mb']:.0f} MB after imports + {above:.0f} MB"
            f" ({above / table_mb:.2f}x the table)"
        )
    if whole:
        full = runs["whole table at once"]
        same = (full["success"], full["failed"]) == (batched["success"], batched["failed"])
        print(
            f"  batched peak / whole peak: {batched['peak_mb'] / full['peak_mb']:.2f}x; same verdict and"
            f" failures: {same}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--large-rows", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--skip-whole-large", action="store_true", help="skip the whole-table run of (b)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="airloop-bench-") as tmp:
        gate_overhead(Path(tmp), args.rows, args.repeat)
        if not args.skip_large:
            large_file(Path(tmp), args.large_rows, whole=not args.skip_whole_large)


if __name__ == "__main__":
    main()
