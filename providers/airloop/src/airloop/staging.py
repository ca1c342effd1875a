"""Data behind an Airflow connection, staged where a step reads it: one function for every operator.

An operator that reads data (the Great Expectations gate, the drift monitor, Feast's training set)
takes it as a URI (a file or a folder: a local path or anything Airflow's ``ObjectStoragePath``
opens, e.g. ``s3://`` through an ``aws`` connection) or as the result of a SQL query on a database
connection. ``stage`` turns either into a local path before the step runs, so a connection's
credentials stay in the worker whichever runtime runs the step, and every operator checks its
arguments the same way with the same error texts (in the operator's own argument names).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

# Copy size when staging an object: constant memory whatever the file's size.
_COPY_BUFFER = 8 * 2**20
_LOCAL = ("", "file", "local")


@dataclass(frozen=True)
class Arguments:
    """What the operator calls its data and the three arguments that locate it, for error texts."""

    what: str = "data"
    uri: str = "data_uri"
    sql: str = "sql"
    conn_id: str = "conn_id"

    @property
    def slug(self) -> str:
        return self.what.replace(" ", "_")


class Staged(NamedTuple):
    """``path``: what the step reads; ``name``: what the data is called in results and logs."""

    path: str
    name: str


def stage(
    folder: str | Path,
    *,
    uri: str | None = None,
    sql: str | None = None,
    conn_id: str | None = None,
    arguments: Arguments = Arguments(),
    pod: bool = False,
) -> Staged:
    """Exactly one of ``uri`` and ``sql``, as a path the step reads.

    - ``uri``, through ``conn_id`` when given: must exist; a local file or folder is read in place,
      a remote one is copied under ``folder/<what>/``;
    - ``sql`` on ``conn_id`` (its hook a ``DbApiHook``): the result, as ``folder/<what>.parquet``.

    ``folder`` belongs to the caller (a scratch folder, or the task's artefact folder to keep the
    staged data on record). ``pod``: the step runs in a pod, which cannot read the worker's files:
    a ``uri`` without a connection is handed over unchanged for the pod to read, anything else raises.
    Raises ValueError naming the argument at fault.
    """
    if bool(uri) == bool(sql):
        raise ValueError(
            f"give the {arguments.what} as exactly one of {arguments.uri} and {arguments.sql}, "
            f"got {arguments.uri}={uri!r}, {arguments.sql}={sql!r}"
        )
    if pod and (sql or conn_id):
        raise ValueError(
            f"{arguments.what} read through {arguments.conn_id} is staged on the worker, where a pod "
            f"cannot read it: give the pod a {arguments.uri} it can read itself"
        )
    if uri:
        return Staged(uri if pod else _copy(uri, conn_id, Path(folder) / arguments.slug, arguments), uri)
    assert sql  # exactly one of the two, checked above
    table = _query(sql, conn_id, Path(folder) / f"{arguments.slug}.parquet", arguments)
    return Staged(table, f"sql on {conn_id}: {sql}")


def _query(sql: str, conn_id: str | None, target: Path, arguments: Arguments) -> str:
    from airflow.sdk import BaseHook

    from airloop.tables import write_table

    if not conn_id:
        raise ValueError(f"{arguments.sql} needs {arguments.conn_id}: the database connection to run it on")
    hook = BaseHook.get_connection(conn_id).get_hook()
    if not callable(getattr(hook, "get_df", None)):
        raise ValueError(
            f"connection {conn_id} ({type(hook).__name__}) is not a database connection: "
            f"{arguments.sql} runs on one whose hook is a DbApiHook (postgres, sqlite, snowflake...)"
        )
    return write_table(hook.get_df(sql, df_type="pandas"), str(target))


def _copy(uri: str, conn_id: str | None, folder: Path, arguments: Arguments) -> str:
    """The local path of ``uri``: the file or folder itself when local, else a copy under ``folder``."""
    from airflow.sdk import ObjectStoragePath

    source = ObjectStoragePath(uri, conn_id=conn_id)
    if not source.exists():
        through = f" (read through connection {conn_id})" if conn_id else ""
        raise ValueError(f"{arguments.what} {uri} does not exist{through}")
    if source.protocol in _LOCAL:
        return source.path
    target = folder / source.name
    if source.is_file():
        copies = [(source, target)]
    else:
        copies = [
            (file, target / PurePosixPath(file.path).relative_to(source.path))
            for file in source.rglob("*")
            if file.is_file()
        ]
    for file, local in copies:
        local.parent.mkdir(parents=True, exist_ok=True)
        with file.open("rb") as remote, local.open("wb") as copy:
            shutil.copyfileobj(remote, copy, _COPY_BUFFER)
    return str(target)
