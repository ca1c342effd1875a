"""The whole reference loop through Airflow itself: ``airloop loop`` on a small data set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airloop import runtimes

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    try:
        runtimes.python("serving")
    except runtimes.RuntimeMissingError as e:
        pytest.skip(str(e))
    home = tmp_path_factory.mktemp("loop")
    report = home / "report.json"
    env = {**os.environ, "AIRLOOP_HOME": str(home / "airloop")}
    for key in [k for k in env if k.startswith("AIRFLOW")]:
        del env[key]  # the runner configures its own Airflow
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "airloop"),
            "loop",
            "--dags",
            str(REPO / "dags"),
            "--rows",
            "3000",
            "--report",
            str(report),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(done.stdout[-6000:], done.stderr[-6000:])
    assert report.exists(), done.stderr[-3000:]
    return json.loads(report.read_text()), home / "airloop"


def test_loop_ends_with_a_new_champion(loop):
    report, _ = loop
    assert report["ok"], report
    champion = report["champion"]
    assert champion["before"] == "1" and champion["after"] == "2"
    assert report["runs"]["retrain_turn"]["run_type"] == "asset_triggered"
    assert report["runs"]["retrain_turn"]["state"] == "success"


def test_drift_verdicts(loop):
    verdicts = loop[0]["verdicts"]
    assert verdicts["drift_control"]["verdict"] == "no_drift"
    assert verdicts["drift_after_shift"]["verdict"] == "drift"
    assert verdicts["drift_after_shift"]["drifted_features"]
    assert verdicts["retrain_requested"] == "success"


def test_parity_gate_passed_for_both_models(loop):
    verdicts = loop[0]["verdicts"]
    for turn in ("first_turn", "retrain_turn"):
        parity = verdicts[turn]["parity"]
        assert parity["max_abs_diff"] <= parity["tolerance"]
        assert parity["label_agreement"] >= 0.999


def test_gateway_applied_each_traffic_split(loop):
    report, home = loop
    rollout = json.loads(
        (home / "artefacts" / "rollouts" / "airloop" / "airloop-classifier-v2.json").read_text()
    )
    assert rollout["decision"] == "promoted"
    assert [s["weight"] for s in rollout["steps"]] == [10, 25, 50, 100]
    for step in rollout["steps"][:-1]:
        champion, challenger = step["champion_stats"]["requests"], step["challenger_stats"]["requests"]
        total = champion + challenger
        share, expected = challenger / total, step["weight"] / 100
        # four binomial standard deviations: a wrong split fails, chance does not
        tolerance = 4 * (expected * (1 - expected) / total) ** 0.5 + 0.01
        assert abs(share - expected) <= tolerance, (step["weight"], champion, challenger)
    assert rollout["steps"][-1]["verdict"] == "promoted"


def test_retrained_champion_is_more_accurate_on_shifted_data(loop):
    after = loop[0]["accuracy"]["after_shift"]
    old = after["v1"] if "v1" in after else after["1"]
    new = after["v2"] if "v2" in after else after["2"]
    assert new["requests"] > 100 and old["requests"] > 100
    assert new["accuracy"] > old["accuracy"] + 0.05
