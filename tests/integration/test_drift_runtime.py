"""The drift step across the runtime hop: called by name in the serving runtime (numpy 1.26, alibi-detect),
the way ExternalPythonOperator calls it, with JSON in and out, and matching the worker's own answer."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from airloop import runtimes
from airloop.steps.drift import detect as drift

STEP = "airloop.steps.drift.detect:detect"
_HOP = """
import json, sys, warnings
warnings.simplefilter("ignore")
from airloop.runtimes import call_step
requests = json.load(open(sys.argv[2]))
json.dump([call_step(sys.argv[1], request) for request in requests], open(sys.argv[3], "w"))
"""

# Cheap on purpose: importing alibi-detect takes seconds, so only look for it; reading Parquet is real.
_PROBE = (
    "import importlib.util, pyarrow.dataset, airloop.steps.drift; "
    "assert importlib.util.find_spec('alibi_detect'), 'alibi-detect is not installed'"
)


@pytest.fixture(scope="module")
def serving_python() -> str:
    try:
        python = runtimes.python("serving")
    except runtimes.RuntimeMissingError as error:
        pytest.skip(f"drift runtime hop not tested: {error}")
    probe = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(
            f"drift runtime hop not tested: the serving runtime ({python}) cannot run the drift "
            f"step: {probe.stderr.strip().splitlines()[-1:]}"
        )
    return python


def test_both_backends_in_the_runtime_match_the_worker(serving_python: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    reference = pd.DataFrame({f"f{i}": rng.normal(size=4000) for i in range(6)})
    reference["segment"] = rng.choice(["a", "b", "c"], 4000)
    current = pd.DataFrame({f"f{i}": rng.normal(0.2 if i == 3 else 0.0, 1.0, 3000) for i in range(6)})
    current["segment"] = rng.choice(["a", "b", "c"], 3000, p=[0.5, 0.25, 0.25])
    reference.to_parquet(tmp_path / "reference.parquet")
    current.to_parquet(tmp_path / "current.parquet")
    base = {
        "reference_uri": str(tmp_path / "reference.parquet"),
        "current_uri": str(tmp_path / "current.parquet"),
        "correction": "fdr",
    }
    requests = [
        {**base, "backend": backend, "report_dir": str(tmp_path / backend)} for backend in ("scipy", "alibi")
    ]
    (tmp_path / "requests.json").write_text(json.dumps(requests))

    subprocess.run(
        [serving_python, "-c", _HOP, STEP, str(tmp_path / "requests.json"), str(tmp_path / "out.json")],
        check=True,
    )
    in_runtime = json.loads((tmp_path / "out.json").read_text())
    in_worker = drift.detect({**base, "backend": "scipy"})

    assert in_worker["drifted_features"] == ["f3", "segment"]
    for result in in_runtime:
        assert (result["verdict"], result["severity"], result["drifted_features"]) == (
            in_worker["verdict"],
            in_worker["severity"],
            in_worker["drifted_features"],
        )
        for name, score in in_worker["features"].items():
            assert result["features"][name]["p_value"] == pytest.approx(score["p_value"], rel=1e-5, abs=1e-12)
        assert Path(result["report_html"]).is_file() and Path(result["report_json"]).is_file()
    assert [r["backend"] for r in in_runtime] == ["scipy", "alibi"]


_LEAN = """
import json, sys, warnings
warnings.simplefilter("ignore")
from airloop.steps.drift.detect import detect
detect(json.loads(sys.argv[1]))
heavy = sorted(m for m in ("transformers", "alibi_detect.saving", "alibi_detect.od", "alibi_detect.cd.mmd")
               if m in sys.modules)
import alibi_detect
from alibi_detect.cd import KSDrift, MMDDrift
print(json.dumps({"heavy": heavy, "same": KSDrift is sys.modules["alibi_detect.cd.ks"].KSDrift}))
"""


def test_the_alibi_backend_loads_only_the_detectors_it_uses(serving_python: str, tmp_path: Path) -> None:
    # alibi-detect's package imports load every detector, its saving code and transformers: seconds
    # of every hop. The backend loads the detector modules alone, and the full package still imports after.
    rng = np.random.default_rng(3)
    for name in ("reference", "current"):
        frame = pd.DataFrame({"f0": rng.normal(size=500), "segment": rng.choice(["a", "b"], 500)})
        frame.to_parquet(tmp_path / f"{name}.parquet")
    request = {
        "reference_uri": str(tmp_path / "reference.parquet"),
        "current_uri": str(tmp_path / "current.parquet"),
        "backend": "alibi",
    }
    done = subprocess.run(
        [serving_python, "-c", _LEAN, json.dumps(request)], capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"heavy": [], "same": True}
