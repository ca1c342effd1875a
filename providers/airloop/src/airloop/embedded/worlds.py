"""What ``airloop loop`` replays: the training data a turn finds and the rows clients send, before
and after a shift.

- ``DemoWorld``: the reference loop (``airloop_loop``) on generated data (``airloop.embedded.demo``).
- ``TableWorld``: a loop spec on the user's own table. The rows before the shift (``--shift-by
  COLUMN``: at most its median; or a second file, ``--after``) train the first champion and are the
  clients' traffic until the shift; the rows after it are the next data drop, which the retrain
  trains on, and the traffic after. Each regime is split in two at random: half trains, half is sent
  by clients (with its true labels as feedback), so no model is scored on rows it learned.

Each world writes the drop into the loop's data folder and the clients' control file
(``airloop.embedded.traffic``) when it enters a regime.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from airloop.loops.spec import LoopSpec


@dataclass
class DemoWorld:
    """The generated world of the reference DAGs; ``rows`` per training drop."""

    rows: int = 4000
    name: str = "airloop-classifier"
    deployment: str = "airloop"
    loop_dag_id: str = "airloop_loop"
    monitor_dag_id: str = "airloop_drift_monitor"
    regimes: tuple[str, str] = ("0.0", "1.0")

    def prepare(self, home: Path) -> dict[str, str]:
        """Environment for Airflow's processes (none: the reference DAGs read their defaults)."""
        return {}

    def enter(self, home: Path, regime: str) -> None:
        from airloop.embedded.demo import generate
        from airloop.tables import write_table

        shift = float(regime)
        path = home / "incoming" / "training.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_table(generate(self.rows, shift=shift, seed=1 + int(shift > 0)), str(path))
        _control(home, {"shift": shift})


@dataclass
class TableWorld:
    """A loop spec's loop on the user's table, split at a shift (see the module)."""

    spec: LoopSpec
    data: str
    shift_by: str | None = None
    after: str | None = None
    seed: int = 0
    regimes: tuple[str, str] = ("before", "after")
    _parts: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if (self.shift_by is None) == (self.after is None):
            raise ValueError("give the shift one way: --shift-by COLUMN, or --after DATA (the rows after it)")
        from pandas.api import types

        from airloop.tables import read_table

        frame = read_table(self.data)
        missing = [c for c in (self.spec.label, self.shift_by) if c and c not in frame.columns]
        if missing:
            raise ValueError(f"{missing} not in {self.data}: its columns are {list(frame.columns)}")
        if self.shift_by is not None:
            column = frame[self.shift_by]
            if not types.is_numeric_dtype(column):
                raise ValueError(
                    f"--shift-by {self.shift_by!r} holds {column.dtype} values: it needs numbers"
                )
            median = column.median()
            before, after = frame[column <= median], frame[column > median]
        else:
            before, after = frame, read_table(str(self.after))
        for regime, rows in zip(self.regimes, (before, after), strict=True):
            if len(rows) < 40:
                raise ValueError(f"{len(rows)} rows {regime} the shift: too few to train on and replay")
            rows = rows.sample(frac=1.0, random_state=self.seed).reset_index(drop=True)
            self._parts[regime] = (rows.iloc[: len(rows) // 2], rows.iloc[len(rows) // 2 :])

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def deployment(self) -> str:
        return self.spec.name

    @property
    def loop_dag_id(self) -> str:
        return self.spec.loop_dag_id

    @property
    def monitor_dag_id(self) -> str:
        return self.spec.monitor_dag_id

    def prepare(self, home: Path) -> dict[str, str]:
        """The spec as the runner runs it, in a loops folder of its own: its data is the drops folder
        the world writes (its window as declared), and the canary windows are short (the simulated
        clients are busy)."""
        import yaml

        folder = home / "loops"
        folder.mkdir(parents=True, exist_ok=True)
        raw: dict[str, Any] = yaml.safe_load(Path(self.spec.source).read_text())
        raw["data"] = {"uri": str(home / "incoming" / self.name), "window": self.spec.data["window"]}
        raw["suite"] = self.spec.suite
        raw["rollout"] = {**raw.get("rollout", {}), "analysis_seconds": 4}
        (folder / f"{self.name}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        return {"AIRLOOP_LOOPS_DIR": str(folder)}

    def enter(self, home: Path, regime: str) -> None:
        from airloop.tables import write_table

        train, traffic = self._parts[regime]
        drops = home / "incoming" / self.name
        drops.mkdir(parents=True, exist_ok=True)
        write_table(train, str(drops / f"{self.regimes.index(regime)}-{regime}.parquet"))
        features = self.spec.features or [
            c for c in traffic.columns if c not in {self.spec.label, *self.spec.excluded}
        ]
        rows = home / f"traffic-{regime}.parquet"
        traffic[[*features, self.spec.label]].to_parquet(rows, index=False)
        _control(home, {"shift": regime, "rows": str(rows), "label": self.spec.label})


def _control(home: Path, world: dict[str, Any]) -> None:
    tmp = home / "world.json.tmp"
    tmp.write_text(json.dumps(world))
    os.replace(tmp, home / "world.json")
