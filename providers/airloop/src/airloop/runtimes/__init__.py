"""Where a step runs: in the worker, in an isolated Python environment (a "runtime"), or in a pod.

A runtime is a virtualenv built with uv from a requirements file shipped here (``<name>.txt``) plus
Airloop itself installed without dependencies, so steps import the same code in both places.
Operators hand a step to a runtime through Airflow's ExternalPythonOperator (``airloop.runtimes.hop``),
or to a Kubernetes pod through KubernetesPodOperator (``runtime="kubernetes"``, see
``airloop.runtimes.pod``); see ``run_step``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from airloop import settings

WORKER = "worker"
POD = "kubernetes"  # airloop.runtimes.pod; its own name here so the operators import nothing of it
# seldon-core 1.18.2, the serving runtime's wrapper, supports Python up to 3.11 (1.19 needs 3.12).
RUNTIME_PYTHON = "3.11"


class RuntimeMissingError(RuntimeError):
    """A runtime a step needs is not built, or is broken."""


def available() -> list[str]:
    return sorted(
        p.name.removesuffix(".txt") for p in resources.files(__package__).iterdir() if p.name.endswith(".txt")
    )


def _check_name(name: str) -> None:
    if name not in available():
        raise ValueError(f"unknown runtime {name!r}: choose one of {available()} or {WORKER!r}")


def location(name: str) -> Path:
    """The runtime's folder; ``AIRLOOP_RUNTIME_<NAME>`` overrides it (an image path, a shared volume)."""
    override = os.environ.get(f"AIRLOOP_RUNTIME_{name.upper()}")
    return Path(override) if override else settings.runtimes_dir() / name


def python(name: str) -> str:
    """Path of the runtime's interpreter, checked to start and to import Airloop."""
    _check_name(name)
    exe = location(name) / "bin" / "python"
    hint = f"build it with `airloop runtimes build {name}`"
    if not exe.exists():
        raise RuntimeMissingError(f"the {name!r} runtime is missing ({exe} does not exist): {hint}")
    probe = subprocess.run([str(exe), "-c", "import airloop"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise RuntimeMissingError(
            f"the {name!r} runtime at {exe} is broken ({probe.stderr.strip().splitlines()[-1:]}): {hint}"
        )
    return str(exe)


def bin_path(name: str, program: str) -> str:
    """A console script of the runtime (e.g. ``seldon-core-microservice``)."""
    return str(Path(python(name)).parent / program)


def _source_of_airloop() -> list[str]:
    """How to install this very Airloop into a runtime: its source tree when editable, else the release."""
    import json
    from importlib.metadata import distribution

    dist = distribution("airflow-provider-airloop")
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct.get("dir_info", {}).get("editable") and direct["url"].startswith("file://"):
        return ["-e", direct["url"].removeprefix("file://")]
    return [f"airflow-provider-airloop=={dist.version}"]


def _find_links() -> list[str]:
    """pip's find-links (``PIP_FIND_LINKS``, space-separated) as uv arguments: uv reads only its own
    ``UV_FIND_LINKS``. A folder of CPU wheels keeps torch from pulling the CUDA build from PyPI."""
    return [arg for link in os.environ.get("PIP_FIND_LINKS", "").split() for arg in ("--find-links", link)]


def build(name: str, *, force: bool = False) -> Path:
    """Create (or refresh) the runtime with uv; idempotent."""
    _check_name(name)
    target = location(name)
    requirements = resources.files(__package__) / f"{name}.txt"
    uv = [sys.executable, "-m", "uv"]
    if force or not (target / "bin" / "python").exists():
        subprocess.run(
            [
                *uv,
                "venv",
                "--quiet",
                "--clear" if force else "--allow-existing",
                "--python",
                RUNTIME_PYTHON,
                str(target),
            ],
            check=True,
        )
    py = str(target / "bin" / "python")
    # Compiled now: each step hop is a fresh interpreter, which otherwise compiles alibi-detect's imports.
    subprocess.run(
        [
            *uv,
            "pip",
            "install",
            "--quiet",
            "--compile-bytecode",
            "--python",
            py,
            *_find_links(),
            "-r",
            str(requirements),
        ],
        check=True,
    )
    subprocess.run(
        [*uv, "pip", "install", "--quiet", "--python", py, "--no-deps", *_source_of_airloop()], check=True
    )
    # OpenVINO's telemetry forks from a background thread at import and has hung numpy: opt out.
    optout = target / "bin" / "opt_in_out"
    if optout.exists():
        subprocess.run([str(optout), "--opt_out"], capture_output=True, check=False)
    python(name)  # fails loudly if the result cannot import Airloop
    return target


def call_step(step: str, request: dict[str, Any]) -> Any:
    """Import ``module:function`` and call it with the request. Runs on either side of a runtime hop."""
    module, _, function = step.partition(":")
    return getattr(importlib.import_module(module), function)(request)


def _call_step_in_runtime(step, request):
    # Source-extracted by ExternalPythonOperator and run by the runtime's interpreter: self-contained.
    from airloop.runtimes import call_step

    return call_step(step, request)


def run_step(
    step: str,
    request: dict[str, Any],
    *,
    runtime: str,
    context: Any,
    task_id: str,
    pod_settings: dict[str, Any] | None = None,
    hold: Callable[[Any], None] | None = None,
) -> Any:
    """Run ``module:function`` with a JSON-able request in the named runtime and return its result.

    ``pod_settings`` configure the pod of the ``kubernetes`` runtime (``airloop.runtimes.pod``). ``hold``
    receives the operator that makes the hop (ExternalPythonOperator, KubernetesPodOperator) before it
    starts, so that the caller's ``on_kill`` can stop it through that operator's ``on_kill``.
    """
    if pod_settings and runtime != POD:
        raise ValueError(f"pod_settings apply to runtime={POD!r} only, not {runtime!r}")
    if runtime == POD:
        from airloop.runtimes import pod

        return pod.run_step(
            step, request, pod_settings=pod_settings, context=context, task_id=task_id, hold=hold
        )
    if runtime == WORKER:
        return call_step(step, request)
    from airflow.sdk import DAG

    from airloop.runtimes.hop import RuntimeHopOperator

    # The hop is an operator of its own, outside the user's DAG: it needs a DAG to belong to, whose
    # file is not where the callable lives (else Airflow would re-import that module under a new name).
    holder = DAG(dag_id=f"airloop_runtime_hop__{runtime}", schedule=None)
    holder.fileloc = getattr(context.get("dag"), "fileloc", None) or "<airloop runtime hop>"
    hop = RuntimeHopOperator(
        task_id=f"{task_id}__{runtime}",
        dag=holder,
        python=python(runtime),
        python_callable=_call_step_in_runtime,
        op_args=[step, request],
        expect_airflow=False,
        serializer="pickle",
        show_return_value_in_logs=False,
    )
    if hold is not None:
        hold(hop)
    return hop.execute(context)
