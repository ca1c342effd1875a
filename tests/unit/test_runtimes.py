"""Steps hop into isolated runtimes through Airflow's ExternalPythonOperator; a bad runtime is named."""

from __future__ import annotations

import stat
from importlib.metadata import version
from types import SimpleNamespace

import pytest

from airloop import runtimes


def test_unknown_runtime_lists_the_known_ones():
    with pytest.raises(ValueError, match="serving"):
        runtimes.python("gpu-magic")


def test_missing_runtime_says_which_and_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRLOOP_RUNTIME_SERVING", str(tmp_path / "nowhere"))
    with pytest.raises(runtimes.RuntimeMissingError) as error:
        runtimes.python("serving")
    assert "'serving' runtime is missing" in str(error.value)
    assert "airloop runtimes build serving" in str(error.value)


def test_broken_runtime_says_which_and_how_to_rebuild_it(monkeypatch, tmp_path):
    exe = tmp_path / "bin" / "python"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named airloop' >&2\nexit 1\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("AIRLOOP_RUNTIME_SERVING", str(tmp_path))
    with pytest.raises(runtimes.RuntimeMissingError, match="broken.*No module named airloop.*build serving"):
        runtimes.python("serving")


def test_worker_runtime_calls_the_step_in_process():
    assert runtimes.run_step(
        "importlib.metadata:version", "numpy", runtime=runtimes.WORKER, context={}, task_id="t"
    ) == version("numpy")


def test_step_runs_in_the_serving_runtime_through_external_python():
    try:
        runtimes.python("serving")
    except runtimes.RuntimeMissingError as e:
        pytest.skip(str(e))
    context = {"ti": SimpleNamespace(bundle_instance=None)}
    numpy_there = runtimes.run_step(
        "importlib.metadata:version", "numpy", runtime="serving", context=context, task_id="t"
    )
    assert numpy_there.startswith("1.")  # alibi-detect's numpy, not the main environment's
    assert version("numpy").startswith("2.")
