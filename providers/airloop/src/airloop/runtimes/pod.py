"""The ``kubernetes`` runtime: a step runs in a pod started by the cncf-kubernetes KubernetesPodOperator.

Both ends of the hop live here. On the worker, ``run_step`` turns the step's request into one JSON
argument for the pod's entrypoint, ``python -m airloop.runtimes.pod``, starts the pod with
``do_xcom_push=True`` and returns the result the entrypoint wrote to ``/airflow/xcom/return.json``.

The contract for files, kept explicit because the pod shares no disk with the worker:

- A request key ending in ``_dir`` names an output folder (``docs_dir``, ``report_dir``, ...). In the
  pod the step gets an empty local folder for it; once the step succeeds, the folder is published to the
  artefact store (``AIRLOOP_ARTEFACTS``, S3 in production) under
  ``pods/<dag_id>/<run_id>/<task_id>/try-<n>/<key>``. The worker copies those files into the folder the
  operator asked for, deletes the transfer copy, and rewrites paths in the result to its own folder, so
  the operator sees the same result as with any other runtime. A failed step publishes nothing.
- Every other input must be reachable from the pod (``s3://...``, an MLflow server, a file baked into the
  image). A request naming a file that only the worker has (under ``AIRLOOP_HOME``, the worker's temp
  folder, an output folder, a SQLite database) is refused before any pod starts; other local paths that
  exist on the worker are logged as a warning, since the pod sees them only if its image or a volume has
  them at the same path.

No credentials of the worker go into the pod spec: its environment holds only telemetry opt-outs, the
artefact store's URI and what ``pod_settings["env"]`` adds, and a request carrying credentials (what
Airflow's secrets masker would hide) is refused. A pod reaches S3 and MLflow with its own identity (a
service account, or ``env_from`` a Kubernetes Secret).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import airloop
from airloop import artefacts, settings

if TYPE_CHECKING:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

log = logging.getLogger(__name__)

ENTRYPOINT = ["python", "-m", "airloop.runtimes.pod"]
# KubernetesPodOperator's xcom sidecar reads this file once the step's container has exited.
XCOM_PATH = "/airflow/xcom/return.json"
# Telemetry opt-outs every environment and image of the project sets (OpenVINO's has hung numpy).
POD_ENV = {"CI": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}
# KubernetesPodOperator arguments the runtime sets itself; the rest of pod_settings pass through.
_SET_BY_RUNTIME = {
    "task_id",
    "cmds",
    "arguments",
    "do_xcom_push",
    "env_vars",
    "container_resources",
    "deferrable",
}


def default_image() -> str:
    """``AIRLOOP_POD_IMAGE``, else the Airflow image of this very release (docker/Dockerfile.airflow)."""
    return os.environ.get("AIRLOOP_POD_IMAGE") or f"airloop/airflow:{airloop.__version__}"


def pod_arguments(pod_settings: dict[str, Any] | None) -> dict[str, Any]:
    """KubernetesPodOperator arguments from ``pod_settings``, checked so a typo fails before a pod starts.

    ``image`` (default ``default_image()``), ``resources`` (``{"requests": {...}, "limits": {...}}``) and
    ``env`` (plain ``{name: value}``, never secrets) are Airloop's; any other KubernetesPodOperator
    argument (``namespace``, ``kubernetes_conn_id``, ``service_account_name``, ``env_from``, ``volumes``,
    ...) passes through unchanged.
    """
    import inspect

    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    given = dict(pod_settings or {})
    resources = given.pop("resources", None)
    env = given.pop("env", None) or {}
    known = set(inspect.signature(KubernetesPodOperator.__init__).parameters) - {"self", "kwargs"}
    reserved = sorted(set(given) & _SET_BY_RUNTIME)
    unknown = sorted(set(given) - known - _SET_BY_RUNTIME)
    if reserved:
        raise ValueError(
            f"pod_settings {reserved} are set by the kubernetes runtime itself (resources and "
            "environment go in 'resources' and 'env')"
        )
    if unknown:
        raise ValueError(
            f"unknown pod_settings {unknown}: use 'image', 'resources', 'env' or an argument of "
            "KubernetesPodOperator"
        )
    if resources is not None and (not isinstance(resources, dict) or set(resources) - {"requests", "limits"}):
        raise ValueError(
            f"pod_settings['resources'] must be {{'requests': {{...}}, 'limits': {{...}}}}, got {resources!r}"
        )
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ValueError(f"pod_settings['env'] must map names to string values, got {env!r}")
    return {
        "image": default_image(),
        **given,
        "env_vars": {**POD_ENV, "AIRLOOP_ARTEFACTS": settings.artefact_root(), **env},
        "container_resources": k8s.V1ResourceRequirements(**resources) if resources else None,
    }


def _local_path(value: str) -> str | None:
    """The worker path a request value names, if it names one: an absolute path, file:// or SQLite URI."""
    for scheme in ("file://", "sqlite:///"):
        if value.startswith(scheme):
            return value.removeprefix(scheme)
    return value if value.startswith("/") else None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list | tuple):
        return [s for item in value for s in _strings(item)]
    return []


def check_inputs(request: dict[str, Any]) -> None:
    """Refuse a request naming files only the worker has; warn about other local paths."""
    outputs = [Path(v).resolve() for k, v in request.items() if k.endswith("_dir") and isinstance(v, str)]
    # Checked in this order, so a path is named by the closest reason (an output folder is often in /tmp).
    worker_only = [
        ("AIRLOOP_HOME", settings.home()),
        *(("an output folder", folder) for folder in outputs),
        ("the worker's temp folder", Path(tempfile.gettempdir())),
    ]
    problems = []
    for key, value in request.items():
        if key.endswith("_dir"):
            continue
        for text in _strings(value):
            path = _local_path(text)
            if path is None:
                continue
            resolved = Path(path).resolve()
            where = next((name for name, root in worker_only if resolved.is_relative_to(root)), None)
            if where is not None or text.startswith("sqlite:"):
                problems.append(f"{key}={text!r} ({where or 'a SQLite database'})")
            elif resolved.exists():
                log.warning(
                    "request key %r names %s, a path on the Airflow worker: the pod sees it only if "
                    "its image or a mounted volume has it at the same path",
                    key,
                    text,
                )
    if problems:
        raise ValueError(
            f"the step's request names files on the Airflow worker that a pod cannot read: "
            f"{'; '.join(problems)}. Pass URIs the pod can reach (s3://..., an MLflow server) "
            "or run this step with runtime='worker'"
        )


def check_no_credentials(request: dict[str, Any]) -> None:
    """Refuse a request carrying credentials: a pod's arguments are readable by anyone who can read pods.

    What Airflow's secrets masker would hide counts: values under sensitive key names (``password``,
    ``secret``, ``token``, ...) and any value masked in this process (connection passwords, secrets that
    hooks mask).
    """
    from airflow.sdk.log import redact

    carrying = sorted(key for key, value in request.items() if redact(value, key) != value)
    if carrying:
        raise ValueError(
            f"the step's request carries credentials in {carrying}, which a pod spec would "
            "expose: give the pod its own (pod_settings 'service_account_name', or 'env_from' a "
            "Secret with e.g. MLFLOW_TRACKING_TOKEN or AWS variables) and use connections "
            "without inline credentials for this task"
        )


def _rebase(value: Any, old: str, new: str) -> Any:
    """``value`` with every string under the path or URI ``old`` moved under ``new``."""
    if isinstance(value, str):
        return new + value[len(old) :] if value == old or value.startswith(old + "/") else value
    if isinstance(value, dict):
        return {key: _rebase(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [_rebase(item, old, new) for item in value]
    return value


def pod_request(step: str, request: dict[str, Any], transfer: str) -> dict[str, Any]:
    """The entrypoint's argument: the step, its request, and where each output folder is published."""
    check_no_credentials(request)
    check_inputs(request)
    outputs = {
        key: f"{transfer}/{key}"
        for key, value in request.items()
        if key.endswith("_dir") and isinstance(value, str)
    }
    if outputs and artefacts.is_local():
        log.warning(
            "the artefact store %s is local: the pod's output folders reach the worker only if that "
            "folder is mounted at the same path in the pod; use s3://... (AIRLOOP_ARTEFACTS)",
            settings.artefact_root(),
        )
    return {
        "step": step,
        "request": {key: value for key, value in request.items() if key not in outputs},
        "outputs": outputs,
    }


def collect(answer: dict[str, Any] | None, request: dict[str, Any]) -> Any:
    """Copy each output folder the pod published into the worker folder the request named; the result."""
    if not isinstance(answer, dict) or "result" not in answer:
        raise RuntimeError(f"the pod wrote no step result to {XCOM_PATH} (got {answer!r})")
    result = answer["result"]
    for key, published in answer.get("outputs", {}).items():
        source, folder = artefacts.root() / published["relative"], Path(request[key])
        for name in published["files"]:
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((source / name).read_bytes())
        if source.exists():  # an object store has no folder where the step wrote no file
            source.rmdir(recursive=True)
        result = _rebase(result, published["uri"], str(folder))
    return result


def pod_operator(
    step: str, request: dict[str, Any], *, pod_settings: dict[str, Any] | None, context: Any, task_id: str
) -> KubernetesPodOperator:
    """The KubernetesPodOperator that runs the step; checks the settings and the request first."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    arguments = pod_arguments(pod_settings)
    transfer = f"{artefacts.task_prefix(context, 'pods')}/try-{context['ti'].try_number}"
    envelope = pod_request(step, request, transfer)
    # Synchronous: a deferral would resume the Airloop operator, not this hop.
    return KubernetesPodOperator(
        task_id=task_id,
        cmds=ENTRYPOINT,
        arguments=[json.dumps(envelope)],
        do_xcom_push=True,
        deferrable=False,
        **arguments,
    )


def run_step(
    step: str,
    request: dict[str, Any],
    *,
    pod_settings: dict[str, Any] | None,
    context: Any,
    task_id: str,
    hold: Callable[[Any], None] | None = None,
) -> Any:
    """Run ``module:function`` in a pod through KubernetesPodOperator and return its result; ``hold``
    receives that operator first (its ``on_kill`` deletes the pod)."""
    hop = pod_operator(step, request, pod_settings=pod_settings, context=context, task_id=task_id)
    if hold is not None:
        hold(hop)
    return collect(hop.execute(context), request)


# -- in the pod -----------------------------------------------------------------------------------------


def execute(envelope: dict[str, Any]) -> dict[str, Any]:
    """Run the step with a fresh folder per output, publish the folders, and describe what was published."""
    from airloop.runtimes import call_step

    step, outputs = envelope.get("step"), envelope.get("outputs") or {}
    if not isinstance(step, str) or ":" not in step or not isinstance(envelope.get("request"), dict):
        raise ValueError("the pod request needs 'step' ('module:function') and a 'request' object")
    request = dict(envelope["request"])
    with ExitStack() as stack:  # each staging folder is published when the stack closes without an error
        folders = {key: stack.enter_context(artefacts.staging(relative)) for key, relative in outputs.items()}
        request.update({key: str(folder) for key, folder in folders.items()})
        result = call_step(step, request)
        published = {}
        for key, folder in folders.items():
            uri = str(artefacts.root() / outputs[key])
            published[key] = {
                "relative": outputs[key],
                "uri": uri,
                "files": sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()),
            }
            result = _rebase(result, str(folder), uri)
    return {"result": result, "outputs": published}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m airloop.runtimes.pod '<JSON with step, request, outputs>'")
    answer = json.dumps(execute(json.loads(args[0])))
    # AIRLOOP_POD_XCOM_PATH lets the entrypoint run outside a pod (tests); renamed into place whole.
    path = Path(os.environ.get("AIRLOOP_POD_XCOM_PATH", XCOM_PATH))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(answer)
    partial.replace(path)


if __name__ == "__main__":
    main()
