"""The whole reference loop through Airflow itself: ``airloop loop`` on a small data set, its clients'
labels coming late, as in production (60% of them, 2 to 30 s after each answer), in the licence-clean
profile: MLServer serves, SciPy tests drift, and the only runtimes there are hold no
Business-Source-licensed package (the production topology's test runs the default profile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airloop import runtimes

REPO = Path(__file__).resolve().parents[2]


# The runtimes of the licence-clean profile; serving (seldon-core, alibi-detect) and torch (alibi-detect)
# are left out of the loop's runtimes folder, so a step that needed them would fail the loop.
CLEAN_RUNTIMES = ("mlserver", "monitoring", "validation")
_BUSINESS_SOURCE = """
import importlib.metadata as m
for d in m.distributions():
    text = " ".join(filter(None, [d.metadata.get("License"), d.metadata.get("License-Expression")]))
    if "Business Source" in text or "BUSL" in text:
        print(d.metadata["Name"], d.version)
"""


@pytest.fixture(scope="module")
def clean_runtimes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("runtimes")
    for name in CLEAN_RUNTIMES:
        try:
            (folder / name).symlink_to(runtimes.location(name).resolve(), target_is_directory=True)
            runtimes.python(name)
        except runtimes.RuntimeMissingError as e:
            pytest.skip(str(e))
    return folder


@pytest.fixture(scope="module")
def loop(tmp_path_factory, clean_runtimes):
    home = tmp_path_factory.mktemp("loop")
    report = home / "report.json"
    env = {
        **os.environ,
        "AIRLOOP_HOME": str(home / "airloop"),
        "AIRLOOP_PROFILE": "licence-clean",
        "AIRLOOP_RUNTIMES": str(clean_runtimes),
    }
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
            "--label-share",
            "0.6",
            "--label-delay",
            "2-30",
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


def test_labels_came_late_for_some_answers_and_the_monitor_judged_the_champion_on_them(loop):
    report, home = loop
    assert report["labels"] == {"share": 0.6, "delay_seconds": [2.0, 30.0]}
    rollout = json.loads(
        (home / "artefacts" / "rollouts" / "airloop" / "airloop-classifier-v2.json").read_text()
    )
    for step in rollout["steps"][:-1]:
        stats = step["challenger_stats"]
        assert 0 < stats["labelled"] < stats["requests"], step
        assert stats["label_lag_p90_s"] > 2, step
    checks = sorted((home / "artefacts" / "performance" / "airloop-classifier").glob("*/report.json"))
    control, shifted = (json.loads(path.read_text()) for path in checks)
    figures = control["versions"]["1"]
    assert control["verdict"] != "drift" or control["severity"] == "low", control["reason"]
    assert 0 < figures["labelled"] < figures["rows"]
    # The champion's estimate holds near its holdout's accuracy while it serves its own world.
    assert abs(figures["estimated_accuracy"] - figures["reference_accuracy"]) < 0.1, figures
    assert shifted["versions"]["1"]["rows"] > 0


def test_the_licence_clean_profile_served_with_mlserver_from_environments_without_business_source(
    loop, clean_runtimes
):
    report, _ = loop
    assert report["profile"] == "licence-clean"
    servers = {name: p.get("server") for name, p in report["serving"]["predictors"].items()}
    assert servers and set(servers.values()) == {"mlserver"}, report["serving"]
    pythons = [sys.executable, *(str(clean_runtimes / name / "bin" / "python") for name in CLEAN_RUNTIMES)]
    found = {
        python: subprocess.run(
            [python, "-c", _BUSINESS_SOURCE], capture_output=True, text=True, check=True
        ).stdout
        for python in pythons
    }
    assert found == dict.fromkeys(pythons, ""), found
