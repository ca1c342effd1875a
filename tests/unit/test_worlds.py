"""The embedded runner's worlds: the user's table split at a shift into training drops and client
traffic, and the clients' rows read from either world."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from airloop.embedded.traffic import _rows
from airloop.embedded.worlds import DemoWorld, TableWorld
from airloop.loops.spec import load


@pytest.fixture
def spec(tmp_path):
    from sklearn.datasets import load_wine

    frame = load_wine(as_frame=True).frame.assign(bottle=range(178))
    data = tmp_path / "wine.csv"
    frame.to_csv(data, index=False)
    raw = {
        "name": "wine",
        "data": {"uri": "wine.csv"},
        "label": "target",
        "keys": ["bottle"],
        "model": {"estimator": "sklearn.ensemble.RandomForestClassifier"},
        "suite": "wine.suite.json",
        "rollout": {"analysis_seconds": 300, "steps": [50, 100]},
    }
    (tmp_path / "wine.yaml").write_text(yaml.safe_dump(raw))
    return load(tmp_path / "wine.yaml"), frame, str(data)


def test_a_shift_by_a_column_splits_at_its_median_into_drops_and_traffic(spec, tmp_path):
    loop, frame, data = spec
    world = TableWorld(loop, data, shift_by="alcohol")
    home = tmp_path / "home"
    env = world.prepare(home)
    ran = yaml.safe_load((home / "loops" / "wine.yaml").read_text())
    assert env == {"AIRLOOP_LOOPS_DIR": str(home / "loops")}
    assert ran["data"] == {"uri": str(home / "incoming" / "wine"), "window": "latest"}  # as declared
    assert ran["rollout"] == {"analysis_seconds": 4, "steps": [50, 100]} and ran["suite"] == loop.suite

    median = frame["alcohol"].median()
    seen = []
    for regime in world.regimes:
        world.enter(home, regime)
        control = json.loads((home / "world.json").read_text())
        assert control["shift"] == regime and control["label"] == "target"
        traffic = pd.read_parquet(control["rows"])
        drops = sorted((home / "incoming" / "wine").iterdir())
        trained = pd.read_parquet(drops[-1])
        assert "bottle" not in traffic.columns and list(traffic.columns)[-1] == "target"
        below = (trained["alcohol"] <= median).all() and (traffic["alcohol"] <= median).all()
        assert below == (regime == "before")
        # Half trains, half is replayed: no row is both (wine's rows are distinct).
        features = [c for c in traffic.columns if c != "target"]
        assert not set(map(tuple, trained[features].values)) & set(map(tuple, traffic[features].values))
        assert abs(len(trained) - len(traffic)) <= 1
        seen.append(len(trained) + len(traffic))
    assert sum(seen) == len(frame) and [p.name for p in drops] == ["0-before.parquet", "1-after.parquet"]


def test_the_clients_replay_the_table_with_its_labels(spec, tmp_path):
    loop, frame, data = spec
    world = TableWorld(loop, data, after=data)  # the same rows after: still two regimes
    world.enter(tmp_path, "after")
    rows = _rows(json.loads((tmp_path / "world.json").read_text()), seed=3)
    names, features, label = rows[0]
    assert names == [c for c in frame.columns if c not in ("target", "bottle")]
    assert len(rows) == len(frame) - len(frame) // 2 and label in (0, 1, 2) and len(features) == 13
    demo = _rows({"shift": "0.0"}, seed=3)
    assert len(demo) == 2000 and demo[0][0] == [f"f{i}" for i in range(8)]


def test_bad_replay_arguments_name_the_problem(spec):
    loop, _, data = spec
    with pytest.raises(ValueError, match="--shift-by COLUMN, or --after DATA"):
        TableWorld(loop, data)
    with pytest.raises(ValueError, match=r"\['colour'\] not in"):
        TableWorld(loop, data, shift_by="colour")
    assert DemoWorld().regimes == ("0.0", "1.0")
