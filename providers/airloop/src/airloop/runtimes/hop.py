"""The hop into an isolated runtime: Airflow's ExternalPythonOperator, which also stops the runtime's
interpreter when the task is killed. ExternalPythonOperator has no ``on_kill`` of its own: a killed task
would leave the step running in a process nobody waits for."""

from __future__ import annotations

import contextlib
import os
import time

import psutil
from airflow.providers.standard.operators.python import ExternalPythonOperator

# Seconds a stopped interpreter has to exit on SIGTERM before SIGKILL.
STOP_GRACE_S = 5.0


class RuntimeHopOperator(ExternalPythonOperator):
    """Runs a step with the runtime's interpreter (``python``); ``on_kill`` stops that interpreter."""

    def on_kill(self) -> None:
        """SIGTERM to the interpreters this process started with ``python``, and to what they started;
        SIGKILL to those still running ``STOP_GRACE_S`` seconds later."""
        hops = [child for child in psutil.Process(os.getpid()).children() if _runs(child, self.python)]
        doomed = [process for hop in hops for process in (hop, *_descendants(hop))]
        for process in doomed:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
        # Polled, not waited for: ExternalPythonOperator's own wait reaps the interpreter and fails the hop
        # with its exit status (a reaped child would read as a success there).
        deadline, alive = time.monotonic() + STOP_GRACE_S, doomed
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [process for process in alive if _running(process)]
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        if doomed:
            self.log.info(
                "stopped the %s runtime's interpreter (pids %s)", self.python, [p.pid for p in doomed]
            )


def _runs(process: psutil.Process, python: str) -> bool:
    try:
        return process.cmdline()[:1] == [python]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
