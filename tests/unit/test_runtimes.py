"""Steps hop into isolated runtimes through Airflow's ExternalPythonOperator; a bad runtime is named."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
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


# A step that runs until it is stopped, importable by the runtime through PYTHONPATH.
SLOW_STEP = """
import os
import time


def wait(request):
    with open(request["pid_file"] + ".partial", "w") as handle:
        handle.write(str(os.getpid()))
    os.replace(request["pid_file"] + ".partial", request["pid_file"])
    time.sleep(request["seconds"])
    return "finished"
"""


def test_killing_the_task_stops_the_step_running_in_a_runtime(tmp_path, monkeypatch):
    import threading
    import time

    import psutil

    from airloop.operators.base import StepOperator

    try:
        runtimes.python("validation")
    except runtimes.RuntimeMissingError as e:
        pytest.skip(str(e))
    (tmp_path / "slow_step.py").write_text(SLOW_STEP)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    operator = StepOperator(task_id="slow", runtime="validation")
    pid_file = tmp_path / "step.pid"
    outcome: dict = {}

    def execute() -> None:
        try:
            outcome["result"] = operator.run_step(
                "slow_step:wait",
                {"pid_file": str(pid_file), "seconds": 600},
                {"ti": SimpleNamespace(bundle_instance=None)},
            )
        except Exception as error:  # what the task sees once its hop is stopped
            outcome["error"] = error

    task = threading.Thread(target=execute)
    task.start()
    deadline = time.monotonic() + 120  # a cold interpreter start on a loaded machine
    while not pid_file.exists() and task.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid_file.exists(), outcome
    step = psutil.Process(int(pid_file.read_text()))
    assert step.ppid() == os.getpid() and step.cmdline()[0] == runtimes.python("validation")

    operator.on_kill()
    task.join(timeout=60)
    assert not task.is_alive()
    # The hop failed with the interpreter's SIGTERM: the step never finished its 600 s.
    assert "result" not in outcome
    assert isinstance(outcome["error"], subprocess.CalledProcessError)
    assert outcome["error"].returncode == -signal.SIGTERM
    assert not psutil.pid_exists(step.pid)
