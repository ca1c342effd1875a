"""Drift detection: one conformance suite that every backend passes, and the two backends agree.

The scipy backend runs in this process. The alibi backend needs alibi-detect (numpy<2), which lives
only in the runtimes: its cases run in the ``serving`` runtime (its ``mmd`` method in the ``torch``
runtime), all in one subprocess each, and are skipped with the reason when that runtime is missing or
cannot run the step.
"""

from __future__ import annotations

import html
import importlib.util
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from airloop import runtimes
from airloop.steps.drift import detect as drift
from airloop.steps.drift.window import collect

BACKENDS = ["scipy", "alibi"]
NULL_WINDOWS = 60  # per backend, through the whole step (files, and the runtime hop for alibi)
FALSE_ALARM_WINDOWS = 400  # in this process, with the scipy detector alone
P_VAL = 0.05
ODD_NAME = '<b>x&"y"</b>'


def _frame(
    rng: np.random.Generator,
    rows: int,
    *,
    numeric: int = 4,
    shift: dict[str, float] | None = None,
    scale: dict[str, float] | None = None,
    colours: tuple[float, ...] = (0.5, 0.3, 0.2),
) -> pd.DataFrame:
    """``numeric`` standard normal columns x0.. (optionally shifted or scaled), a colour and a flag."""
    shift, scale = shift or {}, scale or {}
    frame = pd.DataFrame(
        {f"x{i}": rng.normal(shift.get(f"x{i}", 0.0), scale.get(f"x{i}", 1.0), rows) for i in range(numeric)}
    )
    frame["colour"] = rng.choice(["red", "green", "blue"], rows, p=list(colours))
    frame["flag"] = rng.random(rows) < 0.3
    return frame


def _write(folder: Path, name: str, frame: pd.DataFrame, suffix: str = ".parquet") -> str:
    path = folder / f"{name}{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return str(path)


def _numeric(
    rng: np.random.Generator, rows: int, *, shift: float = 0.0, correlation: float = 0.0
) -> pd.DataFrame:
    """Five standard normal columns; ``shift`` moves x2's mean, ``correlation`` couples x1 to x0
    (each column's own distribution stays standard normal, so no single-feature test can see it)."""
    x = rng.normal(size=(rows, 5))
    x[:, 1] = correlation * x[:, 0] + np.sqrt(1 - correlation**2) * x[:, 1]
    x[:, 2] += shift
    return pd.DataFrame(x, columns=[f"x{i}" for i in range(5)])


# Cheap on purpose: importing alibi-detect takes seconds, so only look for it; reading Parquet is real.
_PROBE = (
    "import importlib.util, pyarrow.dataset, airloop.steps.drift; "
    "assert importlib.util.find_spec('alibi_detect'), 'alibi-detect is not installed'"
)


@pytest.fixture(scope="session")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every scenario as a request without backend; written once, run by each backend."""
    folder = tmp_path_factory.mktemp("drift-data")
    rng = np.random.default_rng(20240601)
    reference = _write(folder, "reference", _frame(rng, 3000))
    wide = _write(folder, "wide", _frame(rng, 3000, numeric=20))

    def case(
        current: pd.DataFrame, ref: str = reference, suffix: str = ".parquet", **options: Any
    ) -> dict[str, Any]:
        current_uri = _write(folder, f"current{len(written)}", current, suffix)
        return {"reference_uri": ref, "current_uri": current_uri, **options}

    written: dict[str, dict[str, Any]] = {}
    nans = _frame(rng, 2000)
    nans.loc[nans.index[:600], "x1"] = np.nan
    nans["x2"] = np.nan
    wrong = _frame(rng, 2000)
    wrong["x1"] = wrong["x1"].astype(str)
    mild = {f"x{i}": 0.09 for i in range(10)}
    odd_reference = _frame(rng, 1000).rename(columns={"x0": ODD_NAME})
    odd_current = _frame(rng, 1000, shift={"x0": 1.0}).rename(columns={"x0": ODD_NAME})
    for name, build in {
        "same": lambda: case(_frame(rng, 2000).assign(extra="ignored")),
        "mean": lambda: case(_frame(rng, 2000, shift={"x0": 0.3})),
        "variance": lambda: case(_frame(rng, 2000, scale={"x1": 1.4})),
        "categorical": lambda: case(_frame(rng, 2000, colours=(0.4, 0.3, 0.3))),
        "one_of_20": lambda: case(_frame(rng, 2000, numeric=20, shift={"x7": 0.3}), wide),
        "mild_bonferroni": lambda: case(_frame(rng, 2000, numeric=20, shift=mild), wide),
        "tiny": lambda: case(_frame(rng, 50)),
        "nans": lambda: case(nans),
        "missing_column": lambda: case(_frame(rng, 2000).drop(columns=["x3"])),
        "wrong_type": lambda: case(wrong),
        "subset": lambda: case(_frame(rng, 2000, shift={"x0": 1.0}), features=["x1", "x2"]),
        "report": lambda: case(odd_current, _write(folder, "odd", odd_reference), report_dir=True),
        "csv_same": lambda: case(_frame(rng, 2000), suffix=".csv"),
        "cvm_same": lambda: case(_frame(rng, 2000), method="cvm"),
        "cvm_mean": lambda: case(_frame(rng, 2000, shift={"x0": 0.3}), method="cvm"),
        "cvm_variance": lambda: case(_frame(rng, 2000, scale={"x1": 1.4}), method="cvm"),
        "csv_mean": lambda: case(_frame(rng, 2000, shift={"x0": 0.3}), suffix=".csv"),
    }.items():
        written[name] = build()
    written["mild_fdr"] = {**written["mild_bonferroni"], "correction": "fdr"}
    # Every shape a window can take, each with its report (an empty one once broke the report).
    shapes = np.random.default_rng(7)
    no_logs = folder / "no_requests.parquet"
    collect({"log_dir": str(folder / "no-logs"), "start": 0, "end": 3600, "out_path": str(no_logs)})
    nothing = _frame(shapes, 300).astype(object)
    nothing.loc[:, :] = None
    fresh = _frame(shapes, 300)
    written["no_requests"] = {"reference_uri": reference, "current_uri": str(no_logs), "report_dir": True}
    for name, window, options in [
        ("no_rows", _frame(shapes, 0), {}),
        ("all_missing", nothing, {}),
        ("one_row", _frame(shapes, 1), {}),
        ("one_row_min_1", _frame(shapes, 1), {"min_rows": 1}),
        ("one_column", _frame(shapes, 300)[["x0"]], {}),
        # 300 requests, then 2 of them sent 100 times more each.
        ("repeats", pd.concat([fresh, fresh.iloc[[0] * 100 + [1] * 100]]), {}),
    ]:
        written[name] = case(window, report_dir=True, **options)
    for i in range(NULL_WINDOWS):  # each its own reference, so the windows are independent trials
        written[f"null{i}"] = case(_frame(rng, 500), _write(folder, f"reference_null{i}", _frame(rng, 2000)))
    return written


def _request(case: dict[str, Any], backend: str, reports: Path, name: str) -> dict[str, Any]:
    request = {**case, "backend": backend}
    if request.get("report_dir"):
        request["report_dir"] = str(reports / backend / name)
    return request


_RUN_IN_RUNTIME = """
import json, sys, warnings
warnings.simplefilter("ignore")
from airloop.steps.drift.detect import detect
requests = json.load(open(sys.argv[1]))
json.dump({name: detect(request) for name, request in requests.items()}, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="session")
def serving_python() -> str:
    """The serving runtime's interpreter, once it has shown it can run this step with alibi-detect."""
    try:
        python = runtimes.python("serving")
    except runtimes.RuntimeMissingError as error:
        pytest.skip(f"alibi backend not tested: {error}")
    probe = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        last = probe.stderr.strip().splitlines()[-1:]
        pytest.skip(
            f"alibi backend not tested: the serving runtime ({python}) cannot run the drift step: {last}"
        )
    return python


@pytest.fixture(scope="session")
def results(
    request: pytest.FixtureRequest, cases: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], dict[str, dict[str, Any]]]:
    """A backend's result for every case, computed on first use: all alibi cases in one runtime hop."""
    reports = tmp_path_factory.mktemp("drift-reports")
    computed: dict[str, dict[str, dict[str, Any]]] = {}

    def run(backend: str) -> dict[str, dict[str, Any]]:
        if backend not in computed:
            requests = {name: _request(case, backend, reports, name) for name, case in cases.items()}
            if backend == "scipy":
                computed[backend] = {name: drift.detect(r) for name, r in requests.items()}
            else:
                python = request.getfixturevalue("serving_python")
                (reports / "requests.json").write_text(json.dumps(requests))
                subprocess.run(
                    [
                        python,
                        "-c",
                        _RUN_IN_RUNTIME,
                        str(reports / "requests.json"),
                        str(reports / "results.json"),
                    ],
                    check=True,
                )
                computed[backend] = json.loads((reports / "results.json").read_text())
        return computed[backend]

    return run


@pytest.fixture(params=BACKENDS)
def outcome(request: pytest.FixtureRequest, results: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    return results(request.param)


# --- the interface, in-process for every registered backend (constructing one imports nothing heavy)


def test_both_backends_are_registered() -> None:
    assert drift.available() == sorted(BACKENDS)


def test_importing_the_step_loads_no_heavy_library_and_no_backend() -> None:
    # Operators and DAG files import steps; the numerical libraries load only when a check runs, and a
    # backend's module only when a request names it (the registry holds "module:Class" paths).
    check = (
        "import sys, airloop.steps.drift.detect; "
        "print(sorted({'numpy', 'pandas', 'scipy', 'alibi_detect', 'airloop.steps.drift.scipy', "
        "'airloop.steps.drift.alibi'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("backend", BACKENDS)
def test_constructor_only_stores_parameters(backend: str) -> None:
    params = {"p_val": 0.01, "correction": "fdr", "categorical": ["colour"], "min_rows": 7, "method": "cvm"}
    detector = drift.get(backend)(**params)
    assert detector.get_params() == params
    assert not hasattr(detector, "features_")
    with pytest.raises(RuntimeError, match="not fitted"):
        detector.score(pd.DataFrame({"colour": ["red"]}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"p_val": 1.5}, "p_val"),
        ({"correction": "holm"}, "correction"),
        ({"min_rows": 0}, "min_rows"),
    ],
)
def test_bad_parameters_are_named(backend: str, params: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        drift.get(backend)(**params).fit(pd.DataFrame({"colour": ["red", "blue"]}))
    with pytest.raises(TypeError, match="list of column names"):
        drift.get(backend)(categorical="colour").fit(pd.DataFrame({"colour": ["red", "blue"]}))


def test_the_alibi_backend_without_alibi_detect_says_where_it_lives(cases: dict[str, Any]) -> None:
    if importlib.util.find_spec("alibi_detect"):
        pytest.skip("alibi-detect is installed here")
    with pytest.raises(ImportError, match=r"needs alibi-detect.*'serving'.*backend='scipy'"):
        drift.detect({**cases["same"], "backend": "alibi"})


def test_unknown_backend_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown drift backend 'nope'.*alibi.*scipy"):
        drift.get("nope")


def test_a_name_registers_once() -> None:
    with pytest.raises(ValueError, match="already registered"):
        drift.register("scipy", drift.get("alibi"))
    drift.register("scipy", "airloop.steps.drift.scipy:ScipyDetector")  # the same class again: no change
    with pytest.raises(TypeError, match="neither a Detector subclass"):
        drift.register("odd", dict)


def test_bonferroni_and_benjamini_hochberg() -> None:
    p = [0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205]
    assert drift.flag(p, 0.05, "bonferroni") == [True] + [False] * 7
    assert drift.flag(p, 0.05, "fdr") == [True, True] + [False] * 6
    # Step-up: the largest rank under its threshold flags every smaller p-value too.
    assert drift.flag([0.04, 0.01, 0.03, 0.02], 0.05, "fdr") == [True] * 4
    assert drift.flag([0.04, 0.01, 0.03, 0.02], 0.05, "bonferroni") == [False, True, False, False]
    assert drift.flag([], 0.05, "fdr") == []


# --- the conformance suite: every backend, the same cases, the same expectations


def test_no_shift_is_no_drift(outcome: dict[str, Any]) -> None:
    result = outcome["same"]
    assert (result["verdict"], result["severity"], result["drifted_features"]) == ("no_drift", "none", [])
    assert list(result["features"]) == ["x0", "x1", "x2", "x3", "colour", "flag"]  # "extra" ignored
    assert result["features"]["colour"]["test"] == "chi2" and result["features"]["flag"]["test"] == "chi2"
    assert result["features"]["x0"]["test"] == "ks"


def test_no_shift_windows_rarely_alarm(outcome: dict[str, Any]) -> None:
    alarms = sum(outcome[f"null{i}"]["verdict"] == "drift" for i in range(NULL_WINDOWS))
    # Bonferroni keeps the chance of any alarm per window under p_val = 0.05 (3 expected in 60);
    # more than 9 would happen by chance less than once in 300 runs.
    assert alarms / NULL_WINDOWS <= 0.15
    assert all(outcome[f"null{i}"]["verdict"] in ("drift", "no_drift") for i in range(NULL_WINDOWS))


def test_false_alarm_rate_is_p_val_per_window() -> None:
    """The no-shift control: 400 independent windows; one alarms when any of its 6 features is flagged."""
    rng = np.random.default_rng(99)
    alarms = dict.fromkeys(drift.CORRECTIONS, 0)
    for _ in range(FALSE_ALARM_WINDOWS):
        scores = (
            drift.get("scipy")(p_val=P_VAL, categorical=["colour", "flag"], min_rows=200)
            .fit(_frame(rng, 2000))
            .score(_frame(rng, 500))
        )
        p_values = [score["p_value"] for score in scores.values()]
        for correction in alarms:
            alarms[correction] += any(drift.flag(p_values, P_VAL, correction))
    # Both corrections hold the chance of any false alarm in a window to p_val when nothing moved
    # (Bonferroni slightly under it). With 400 windows (about 20 alarms expected) the bounds below
    # fail by chance less than once in 10,000 runs: above 2 x p_val the correction is broken, below
    # p_val / 4 the tests cannot alarm.
    for correction, count in alarms.items():
        assert P_VAL / 4 < count / FALSE_ALARM_WINDOWS < 2 * P_VAL, (correction, count)


@pytest.mark.parametrize(
    ("case", "feature"),
    [
        ("mean", "x0"),
        ("variance", "x1"),
        ("categorical", "colour"),
        ("one_of_20", "x7"),
        ("csv_mean", "x0"),
        ("cvm_mean", "x0"),
        ("cvm_variance", "x1"),
    ],
)
def test_a_shift_is_found_in_the_shifted_feature_only(
    outcome: dict[str, Any], case: str, feature: str
) -> None:
    result = outcome[case]
    assert result["verdict"] == "drift"
    assert result["drifted_features"] == [feature]
    assert result["share_drifted"] == pytest.approx(1 / len(result["features"]))


def test_mean_and_variance_shifts_show_in_the_means(outcome: dict[str, Any]) -> None:
    mean = outcome["mean"]["features"]["x0"]
    assert mean["cur_mean"] - mean["ref_mean"] == pytest.approx(0.3, abs=0.1)
    variance = outcome["variance"]["features"]["x1"]
    assert abs(variance["cur_mean"] - variance["ref_mean"]) < 0.1  # same mean, other spread: KS still sees it


def test_one_feature_of_twenty_is_low_severity(outcome: dict[str, Any]) -> None:
    result = outcome["one_of_20"]
    assert result["share_drifted"] == pytest.approx(1 / 22)
    assert result["severity"] == "low"


def test_fdr_flags_more_than_bonferroni_when_many_features_move(outcome: dict[str, Any]) -> None:
    bonferroni = set(outcome["mild_bonferroni"]["drifted_features"])
    fdr = set(outcome["mild_fdr"]["drifted_features"])
    assert bonferroni < fdr
    assert fdr <= {f"x{i}" for i in range(10)}


def test_a_tiny_window_is_insufficient_data_never_no_drift(outcome: dict[str, Any]) -> None:
    result = outcome["tiny"]
    assert result["verdict"] == "insufficient_data"
    assert result["n_current"] == 50 and result["severity"] == "none" and result["features"] == {}
    assert "50" in result["message"] and "200" in result["message"]


def test_nans_are_dropped_per_feature_and_reported(outcome: dict[str, Any]) -> None:
    result = outcome["nans"]
    sparse, empty = result["features"]["x1"], result["features"]["x2"]
    assert result["verdict"] == "no_drift"
    assert sparse["tested"] and sparse["nan_fraction_cur"] == pytest.approx(0.3) and sparse["n_cur"] == 1400
    assert not sparse["drift"]
    assert (empty["tested"], empty["p_value"], empty["nan_fraction_cur"]) == (False, None, 1.0)
    assert "x2" in result["message"]


@pytest.mark.parametrize(
    ("case", "verdict", "reason"),
    [
        ("no_requests", "insufficient_data", "the window is empty"),
        ("no_rows", "insufficient_data", "the window is empty"),
        ("all_missing", "insufficient_data", "0 effective: 300 without any value"),
        ("one_row", "insufficient_data", "current 1, at least 200 needed"),
        ("one_column", "invalid_window", "lacks the columns ['x1', 'x2', 'x3', 'colour', 'flag']"),
    ],
)
def test_every_window_shape_gets_a_verdict_with_a_reason(
    outcome: dict[str, Any], case: str, verdict: str, reason: str
) -> None:
    result = outcome[case]
    assert (result["verdict"], result["severity"], result["drifted_features"]) == (verdict, "none", [])
    assert reason in result["message"], result["message"]
    saved = json.loads(Path(result["report_json"]).read_text())
    assert saved["verdict"] == verdict and saved["message"] == result["message"]
    assert html.escape(result["message"]) in Path(result["report_html"]).read_text()


def test_one_row_is_tested_when_the_minimum_allows_it(outcome: dict[str, Any]) -> None:
    result = outcome["one_row_min_1"]
    assert result["verdict"] in ("drift", "no_drift") and result["message"]
    assert all(score["tested"] and score["n_cur"] == 1 for score in result["features"].values())


def test_repeated_requests_count_once(outcome: dict[str, Any]) -> None:
    result = outcome["repeats"]
    # 200 repeats of two requests would read as drift in every feature; tested once, they are 2 of 300 rows.
    assert (result["n_current"], result["n_effective"], result["verdict"]) == (500, 300, "no_drift")
    assert "200 repeated rows tested once" in result["message"]
    assert all(score["n_cur"] == 300 for score in result["features"].values())


@pytest.mark.parametrize(("case", "named"), [("missing_column", "x3"), ("wrong_type", "x1")])
def test_a_bad_window_is_invalid_and_named(outcome: dict[str, Any], case: str, named: str) -> None:
    result = outcome[case]
    assert result["verdict"] == "invalid_window"
    assert named in result["message"] and result["features"] == {}


def test_cramer_von_mises_tests_the_numeric_features(outcome: dict[str, Any]) -> None:
    result = outcome["cvm_same"]
    assert (result["verdict"], result["method"]) == ("no_drift", "cvm")
    assert {f: s["test"] for f, s in result["features"].items()} == {
        "x0": "cvm",
        "x1": "cvm",
        "x2": "cvm",
        "x3": "cvm",
        "colour": "chi2",
        "flag": "chi2",
    }
    assert outcome["cvm_mean"]["features"]["x0"]["test"] == "cvm"


def test_a_csv_window_is_read_with_its_types(outcome: dict[str, Any]) -> None:
    result = outcome["csv_same"]
    assert result["verdict"] == "no_drift" and result["n_current"] == 2000
    assert [result["features"][f]["kind"] for f in ("x0", "colour", "flag")] == [
        "numeric",
        "categorical",
        "categorical",
    ]


def test_only_the_requested_features_are_tested(outcome: dict[str, Any]) -> None:
    result = outcome["subset"]
    assert list(result["features"]) == ["x1", "x2"] and result["verdict"] == "no_drift"


def test_the_report_is_escaped_self_contained_and_matches_the_result(outcome: dict[str, Any]) -> None:
    result = outcome["report"]
    saved = json.loads(Path(result["report_json"]).read_text())
    assert {k: saved[k] for k in result} == result
    assert set(saved["distributions"]) == set(result["features"])
    assert saved["distributions"]["colour"]["kind"] == "categorical"
    assert sum(saved["distributions"][ODD_NAME]["current"]) == pytest.approx(1.0)
    page = Path(result["report_html"]).read_text()
    assert result["drifted_features"] == [ODD_NAME]
    assert ODD_NAME not in page and "&lt;b&gt;x&amp;&quot;y&quot;&lt;/b&gt;" in page
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    figures = re.findall(r"<svg.*?</svg>", page, flags=re.DOTALL)
    assert len(figures) == len(result["features"])
    for figure in figures:
        assert ET.fromstring(figure).findall("{http://www.w3.org/2000/svg}rect")


# --- the backends agree


def test_the_backends_agree(results: Callable[[str], dict[str, Any]]) -> None:
    scipy, alibi = results("scipy"), results("alibi")
    for name in scipy:
        assert (alibi[name]["verdict"], alibi[name]["drifted_features"]) == (
            scipy[name]["verdict"],
            scipy[name]["drifted_features"],
        ), name
        for feature, score in scipy[name]["features"].items():
            other = alibi[name]["features"][feature]
            assert other["drift"] == score["drift"], (name, feature)
            if score["tested"]:
                # alibi-detect keeps p-values and statistics in float32.
                assert other["p_value"] == pytest.approx(score["p_value"], rel=1e-5, abs=1e-12), (
                    name,
                    feature,
                )
                assert other["statistic"] == pytest.approx(score["statistic"], rel=1e-5), (name, feature)


# --- the multivariate method: alibi-detect's MMDDrift on PyTorch, in the torch runtime


@pytest.fixture(scope="session")
def torch_python() -> str:
    """The torch runtime's interpreter, once it has shown it has alibi-detect and PyTorch."""
    try:
        python = runtimes.python("torch")
    except (runtimes.RuntimeMissingError, ValueError) as error:
        pytest.skip(f"mmd method not tested: {error}")
    probe = subprocess.run(
        [python, "-c", _PROBE + "; assert importlib.util.find_spec('torch'), 'no torch'"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(
            f"mmd method not tested: the torch runtime ({python}) cannot run it: "
            f"{probe.stderr.strip().splitlines()[-1:]}"
        )
    return python


@pytest.fixture(scope="session")
def mmd(torch_python: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """500-row windows against a 500-row reference, judged by MMD in one torch runtime hop."""
    folder = tmp_path_factory.mktemp("mmd")
    rng = np.random.default_rng(11)
    reference = _write(folder, "reference", _numeric(rng, 500))
    holes = _numeric(rng, 600)
    holes.loc[holes.index[:100], "x3"] = np.nan
    windows = {
        "same": _numeric(rng, 500),
        "mean": _numeric(rng, 500, shift=0.5),
        "correlation": _numeric(rng, 500, correlation=0.8),
        "nans": holes,
    }
    requests = {
        name: {
            "reference_uri": reference,
            "current_uri": _write(folder, name, frame),
            "backend": "alibi",
            "method": "mmd",
        }
        for name, frame in windows.items()
    }
    (folder / "requests.json").write_text(json.dumps(requests))
    subprocess.run(
        [torch_python, "-c", _RUN_IN_RUNTIME, str(folder / "requests.json"), str(folder / "results.json")],
        check=True,
    )
    return {"requests": requests, **json.loads((folder / "results.json").read_text())}


def test_mmd_sees_no_drift_without_a_shift(mmd: dict[str, Any]) -> None:
    result = mmd["same"]
    assert (result["verdict"], result["method"], result["drifted_features"]) == ("no_drift", "mmd", [])
    scores = result["features"].values()
    assert {s["test"] for s in scores} == {"mmd"} and len({s["p_value"] for s in scores}) == 1
    assert next(iter(scores))["p_value"] > P_VAL


def test_mmd_flags_the_features_it_tested_together(mmd: dict[str, Any]) -> None:
    result = mmd["mean"]
    assert result["verdict"] == "drift" and result["severity"] == "high"
    assert result["drifted_features"] == [f"x{i}" for i in range(5)]
    assert "tested together with mmd" in result["message"]


def test_mmd_sees_a_change_no_single_feature_shows(mmd: dict[str, Any]) -> None:
    # x1 follows x0 now; each column alone is as standard normal as before.
    assert mmd["correlation"]["verdict"] == "drift"
    assert (
        drift.detect({**mmd["requests"]["correlation"], "backend": "scipy", "method": "ks"})["verdict"]
        == "no_drift"
    )


def test_mmd_tests_the_complete_rows(mmd: dict[str, Any]) -> None:
    result = mmd["nans"]
    assert result["verdict"] == "no_drift" and all(s["tested"] for s in result["features"].values())
    assert result["features"]["x3"]["nan_fraction_cur"] == pytest.approx(1 / 6)


def test_mmd_without_torch_names_the_runtime_to_use(serving_python: str, cases: dict[str, Any]) -> None:
    request = {**cases["same"], "backend": "alibi", "method": "mmd", "features": ["x0", "x1"]}
    done = subprocess.run(
        [
            serving_python,
            "-c",
            "import json, sys; from airloop.steps.drift.detect import detect; "
            "detect(json.loads(sys.argv[1]))",
            json.dumps(request),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert "PyTorch" in done.stderr and "'torch' runtime" in done.stderr


def test_mmd_compares_numeric_features_only() -> None:
    with pytest.raises(ValueError, match=r"numeric features only.*\['colour'\]"):
        drift.get("alibi")(method="mmd", categorical=["colour"]).check_params()


def test_mmd_samples_at_most_its_cap_of_rows() -> None:
    from airloop.steps.drift import alibi

    rows = np.arange(3 * alibi.MMD_MAX_ROWS).reshape(-1, 1)
    sample = alibi._sample(rows, alibi.MMD_MAX_ROWS)
    assert sample.shape == (alibi.MMD_MAX_ROWS, 1) and len(np.unique(sample)) == alibi.MMD_MAX_ROWS
    assert np.array_equal(sample, alibi._sample(rows, alibi.MMD_MAX_ROWS))  # the same rows every time
    assert len(alibi._sample(rows[:10], alibi.MMD_MAX_ROWS)) == 10  # fewer rows than the cap: all of them


# --- requests that are wrong whatever the data


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"backend": "nope"}, "unknown drift backend"),
        ({"correction": "holm"}, "correction"),
        ({"p_val": 0}, "p_val"),
        ({"features": ["x0", "zz"]}, r"not in the reference.*zz"),
        ({"categorical": ["zz"]}, "zz"),
        ({"severity": {"low": 0.5, "high": 0.1}}, "severity"),
        ({"severity": {"extreme": 0.9}}, "severity"),
        ({"p_vals": 0.1}, r"DetectRequest: unknown field\(s\) \['p_vals'\]"),
        ({"current_uri": ""}, "current_uri"),
        ({"features": "x0"}, "list"),
        ({"method": "mmd"}, r"'scipy' drift backend has no method 'mmd'.*\['ks', 'cvm'\]"),
    ],
)
def test_a_bad_request_raises_a_clear_error(
    cases: dict[str, dict[str, Any]], change: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        drift.detect({**cases["same"], **change})
