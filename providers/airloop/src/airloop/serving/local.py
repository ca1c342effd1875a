"""The local serving target: model servers and the gateway as processes on this machine.

The model servers are Seldon's Python wrapper (``server="seldon"``, in the serving runtime) or
MLServer (``server="mlserver"``, Apache 2.0, in the mlserver runtime, over the V2 inference protocol
with adaptive batching available); the gateway speaks Seldon's protocol to clients either way and V2
to MLServer predictors.

Each call may come from a different short-lived process (an Airflow task), so nothing lives in
memory: a deployment is a folder ``<home>/<deployment>/`` holding ``state.json`` (ports, pids,
weights, predictors), a lock file and one log file per process. Every process starts in its own
session, so it outlives the caller and is stopped as a whole process group (Seldon's wrapper forks
gunicorn arbiters and workers that a plain SIGTERM to the parent would leave behind).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from airloop import runtimes, settings
from airloop.ports import free_port, port_is_free
from airloop.serving.base import (
    ServingTarget,
    check_deployment_name,
    check_predictor,
    merge_traffic,
)
from airloop.serving.features import FeatureLookup

MODEL_CLASS = "airloop.serving.model.OpenVinoModel"
MLSERVER_MODEL_CLASS = "airloop.serving.mlserver.OpenVinoRuntime"
# The model's name on an MLServer predictor: the gateway posts to /v2/models/<V2_MODEL>/infer.
V2_MODEL = "airloop-ir"
# Each model server: its runtime, its health check (the gateway answers Seldon's) and its second port.
SERVERS = {
    "seldon": {"runtime": "serving", "health": "/health/ping", "second_port": "metrics_port"},
    # The model's own readiness: MLServer answers /v2/health/ready for a server whose model failed to
    # load (it drops the model and keeps running). It always starts a gRPC server too (the gateway
    # speaks REST).
    "mlserver": {"runtime": "mlserver", "health": f"/v2/models/{V2_MODEL}/ready", "second_port": "grpc_port"},
}
STATE_FILE = "state.json"
# The gateway's admin token, readable by this user only: the target's calls from any process (an
# Airflow task, the triggerer) read it here when the serving connection holds none.
TOKEN_FILE = "admin-token"
# Request bodies larger than this are answered 413 by the gateway before they are read (a 100 MB
# body once took it from 319 MB to 1.29 GB); the serving connection's ``max_body_bytes`` changes it.
MAX_BODY_BYTES = 4 << 20
# Where the gateway finds its admin token when it starts (its command line is public).
TOKEN_ENV = "AIRLOOP_GATEWAY_TOKEN"
# Model servers keep idle connections this long (Seldon's ``--keepalive``, default 2 s), so the
# gateway's connection pool is reused between requests.
SERVER_KEEPALIVE_S = 30
_ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception): .+$")


class LocalServingTarget(ServingTarget):
    """Serve deployments from processes on this machine, bound to 127.0.0.1.

    :param home: folder of the deployments' state (default: ``<AIRLOOP_HOME>/serving``).
    :param threads: request threads per model server (one OpenVINO infer request each).
    :param startup_timeout_s: how long a model server or the gateway may take to answer.
    :param server: the model server, ``"seldon"`` (Seldon's wrapper, the default) or ``"mlserver"``
        (MLServer, V2 protocol; the default in the licence-clean profile, which refuses ``"seldon"``);
        predictors already running keep theirs.
    :param model_class: the model class the model servers run (``module.Class``, importable in the
        server's runtime: a Seldon class taking the ``model_dir`` parameter, or an MLServer ``MLModel``
        reading ``parameters.uri``); default: the server's OpenVINO class.
    :param max_batch_size: MLServer's adaptive batching: requests arriving within ``max_batch_time``
        seconds are scored together, up to this many rows (0 or 1: off, one-row latency pays the wait).
    :param max_batch_time: see ``max_batch_size``.
    :param features: where the gateway looks up features for requests that carry only entity keys
        (``{"url", "entities", "features"}``, see ``airloop.serving.features``).
    :param admin_token: the token of the gateway's admin API (the serving connection's password);
        without one, each deployment gets a random token in a file only this user can read.
    :param max_body_bytes: larger request bodies are answered 413 before they are read.
    """

    def __init__(
        self,
        home: str | None = None,
        *,
        threads: int = 2,
        startup_timeout_s: float = 60.0,
        server: str | None = None,
        model_class: str | None = None,
        max_batch_size: int = 0,
        max_batch_time: float = 0.0,
        features: dict[str, Any] | None = None,
        admin_token: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.home = home
        self.features = features
        self.admin_token = admin_token
        self.max_body_bytes = max_body_bytes
        self.threads = threads
        self.startup_timeout_s = startup_timeout_s
        self.server = server or ("mlserver" if settings.licence_clean() else "seldon")
        self.model_class = model_class
        self.max_batch_size = max_batch_size
        self.max_batch_time = max_batch_time

    # -- the interface -----------------------------------------------------------------------------
    def deploy(self, deployment: str, predictors: list[dict[str, Any]]) -> dict[str, Any]:
        check_deployment_name(deployment)
        # A bad configuration fails before anything starts.
        if self.server not in SERVERS:
            raise ValueError(f"server must be one of {sorted(SERVERS)}, got {self.server!r}")
        if self.server == "seldon" and settings.licence_clean():
            raise ValueError(
                "server 'seldon' (Seldon's wrapper) is published under the Business Source License, which "
                f"the {settings.LICENCE_CLEAN} profile ({settings.PROFILE_ENV}) leaves out: use 'mlserver'"
            )
        FeatureLookup.from_config(self.features)
        wanted = {}
        for predictor in predictors:
            check_predictor(predictor)
            if predictor["name"] in wanted:
                raise ValueError(f"predictor {predictor['name']!r} is listed twice")
            if not Path(predictor["model_dir"]).is_absolute() or not Path(predictor["model_dir"]).is_dir():
                raise ValueError(
                    f"model_dir of predictor {predictor['name']!r} must be an existing absolute "
                    f"folder, got {predictor['model_dir']!r}"
                )
            wanted[predictor["name"]] = predictor
        with self._locked(deployment, create=True) as state:
            running = state["predictors"]
            for name, predictor in wanted.items():
                old = running.get(name)
                if old and (old["model_dir"], old["model_version"]) != (
                    str(predictor["model_dir"]),
                    str(predictor["model_version"]),
                ):
                    raise ValueError(
                        f"predictor {name!r} already serves model version "
                        f"{old['model_version']} from {old['model_dir']}: "
                        "remove it first or use another name"
                    )
            current = {**{n: {"weight": 0} for n in wanted}, **running}
            live = {n: p["weight"] for n, p in wanted.items() if not p.get("shadow")}
            shadow = {n: p["weight"] for n, p in wanted.items() if p.get("shadow")}
            traffic = merge_traffic(current, live, shadow)
            to_start = {n: p for n, p in wanted.items() if n not in running}
            for name in [n for n in running if not _pings(running[n])]:
                _stop_group(running[name]["pid"])  # a hung server may still hold its group
                to_start[name] = running[name]
            started = self._start_predictors(deployment, to_start)
            for name, process in started.items():
                spec = to_start[name]
                running[name] = {
                    "model_version": str(spec["model_version"]),
                    "model_dir": str(spec["model_dir"]),
                    **_manifest_fields(spec["model_dir"]),
                    **process,
                }
            for name, role in traffic.items():
                running[name].update(role)
            token = self._token(deployment)
            gateway_config = {
                "features": self.features,
                "max_body_bytes": self.max_body_bytes,
                "admin_token_sha256": hashlib.sha256(token.encode()).hexdigest(),
            }
            if any(state.get(k) != v for k, v in gateway_config.items()) and state.get("gateway"):
                _stop_group(state["gateway"]["pid"])  # the gateway reads these when it starts
            state.update(gateway_config)
            self._write_state(deployment, state)
            self._ensure_gateway(deployment, state)
            return self._describe(state)

    def set_traffic(
        self, deployment: str, weights: dict[str, int], *, shadow: dict[str, int] | None = None
    ) -> dict[str, Any]:
        with self._locked(deployment) as state:
            for name, role in merge_traffic(state["predictors"], weights, shadow).items():
                state["predictors"][name].update(role)
            # The whole table at once: the gateway swaps it atomically, requests in flight finish.
            self._admin(state, "PUT", "/admin/predictors", json=routes_from_state(state))
            self._write_state(deployment, state)
            return self._describe(state)

    def remove(self, deployment: str, predictor: str) -> dict[str, Any]:
        with self._locked(deployment) as state:
            if predictor not in state["predictors"]:
                raise ValueError(
                    f"deployment {deployment!r} has no predictor {predictor!r}: "
                    f"it has {sorted(state['predictors'])}"
                )
            weight = state["predictors"][predictor]["weight"]
            if weight != 0 and not state["predictors"][predictor].get("shadow"):
                raise ValueError(
                    f"predictor {predictor!r} still receives {weight}% of the traffic: "
                    "set its weight to 0 first"
                )
            spec = state["predictors"].pop(predictor)
            self._admin(state, "PUT", "/admin/predictors", json=routes_from_state(state))
            _stop_group(spec["pid"])
            self._write_state(deployment, state)
            return self._describe(state)

    def state(self, deployment: str) -> dict[str, Any]:
        return self._describe(self._read_state(deployment))

    def metrics(self, deployment: str) -> dict[str, dict[str, Any]]:
        return self._admin(self._read_state(deployment), "GET", "/admin/stats")

    async def ametrics(self, deployment: str) -> dict[str, dict[str, Any]]:
        state = self._read_state(deployment)
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            answer = await client.get(f"{_endpoint(state)}/admin/stats", headers=self._headers(deployment))
        return _checked(answer, deployment)

    def delete(self, deployment: str) -> None:
        check_deployment_name(deployment)
        if not (self._dir(deployment) / STATE_FILE).exists():
            return
        with self._locked(deployment) as state:
            for spec in [state.get("gateway"), *state["predictors"].values()]:
                if spec:
                    _stop_group(spec["pid"])
            # The folder stays: its process logs are what one reads after a failure.
            (self._dir(deployment) / STATE_FILE).unlink()

    # -- state -------------------------------------------------------------------------------------
    def _dir(self, deployment: str) -> Path:
        return Path(self.home) / deployment if self.home else settings.serving_dir() / deployment

    def _read_state(self, deployment: str) -> dict[str, Any]:
        check_deployment_name(deployment)
        path = self._dir(deployment) / STATE_FILE
        if not path.exists():
            raise ValueError(f"deployment {deployment!r} is not deployed here (no {path})")
        return json.loads(path.read_text())

    @contextlib.contextmanager
    def _locked(self, deployment: str, *, create: bool = False) -> Iterator[dict[str, Any]]:
        """The deployment's state, with the deployment locked against other processes."""
        check_deployment_name(deployment)
        folder = self._dir(deployment)
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        elif not (folder / STATE_FILE).exists():
            raise ValueError(f"deployment {deployment!r} is not deployed here (no {folder / STATE_FILE})")
        with open(folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = folder / STATE_FILE
            yield (
                json.loads(path.read_text())
                if path.exists()
                else {"deployment": deployment, "gateway": None, "predictors": {}}
            )

    def _write_state(self, deployment: str, state: dict[str, Any]) -> None:
        path = self._dir(deployment) / STATE_FILE
        staging = path.with_suffix(".tmp")
        staging.write_text(json.dumps(state, indent=2))
        staging.replace(path)  # atomic: readers without the lock never see half a file

    def _describe(self, state: dict[str, Any]) -> dict[str, Any]:
        return {
            "deployment": state["deployment"],
            "endpoint": _endpoint(state),
            "gateway": {**state["gateway"], "healthy": _pings(state["gateway"])},
            "predictors": {
                name: {**spec, "shadow": bool(spec.get("shadow")), "healthy": _pings(spec)}
                for name, spec in state["predictors"].items()
            },
        }

    # -- processes ---------------------------------------------------------------------------------
    def _start_predictors(self, deployment: str, predictors: dict[str, dict[str, Any]]) -> dict[str, dict]:
        """Start model servers side by side, then wait for all; on any failure stop them all and raise."""
        started = {}
        for name, spec in predictors.items():
            server = spec.get("server", self.server)  # a restarted predictor keeps its server
            # raises RuntimeMissingError with how to build it
            python = runtimes.python(SERVERS[server]["runtime"])
            process = {"server": server, "port": free_port(), SERVERS[server]["second_port"]: free_port()}
            command = (self._seldon if server == "seldon" else self._mlserver)(
                deployment, name, str(spec["model_dir"]), python, process
            )
            started[name] = {"pid": self._spawn(deployment, f"predictor-{name}", command), **process}
        try:
            for name, process in started.items():
                self._wait_ready(deployment, f"predictor-{name}", process)
        except RuntimeError:
            for process in started.values():
                _stop_group(process["pid"])
            raise
        return started

    def _seldon(self, deployment: str, name: str, model_dir: str, python: str, process: dict) -> list[str]:
        parameters = [{"name": "model_dir", "value": model_dir, "type": "STRING"}]
        return [
            python,
            "-m",
            "airloop.serving.model",
            self.model_class or MODEL_CLASS,
            "--service-type",
            "MODEL",
            "--http-port",
            str(process["port"]),
            "--metrics-port",
            str(process["metrics_port"]),
            # the gateway speaks REST only: no gRPC server (one process and one model less)
            "--grpc-workers",
            "0",
            "--workers",
            "1",
            "--threads",
            str(self.threads),
            "--keepalive",
            str(SERVER_KEEPALIVE_S),
            "--parameters",
            json.dumps(parameters),
        ]

    def _mlserver(self, deployment: str, name: str, model_dir: str, python: str, process: dict) -> list[str]:
        """MLServer's settings in ``mlserver-<name>/`` (the model's in its ``airloop-ir/``): loopback
        only, inference in the server's own process (no worker pool to hand each request to), metrics
        from the gateway (MLServer's off)."""
        folder = self._dir(deployment) / f"mlserver-{name}"
        (folder / V2_MODEL).mkdir(parents=True, exist_ok=True)  # MLServer wants the model's own folder
        settings_json = {
            "host": "127.0.0.1",
            "http_port": process["port"],
            "grpc_port": process["grpc_port"],
            "metrics_endpoint": None,
            "parallel_workers": 0,
            "gzip_enabled": False,
            "debug": False,
        }
        model_settings = {
            "name": V2_MODEL,
            "implementation": self.model_class or MLSERVER_MODEL_CLASS,
            "parameters": {"uri": model_dir},
            "max_batch_size": self.max_batch_size,
            "max_batch_time": self.max_batch_time,
        }
        (folder / "settings.json").write_text(json.dumps(settings_json, indent=2))
        (folder / V2_MODEL / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
        return [python, "-m", "airloop.serving.mlserver", str(folder), "--keepalive", str(SERVER_KEEPALIVE_S)]

    def _ensure_gateway(self, deployment: str, state: dict[str, Any]) -> None:
        """Tell the running gateway the routing table, or (re)start it, which reads ``state.json``."""
        current = state.get("gateway")
        if current and _pings(current):
            self._admin(state, "PUT", "/admin/predictors", json=routes_from_state(state))
            return
        if current:
            _stop_group(current["pid"])
        # Keep the endpoint stable across restarts when the old port is still free.
        port = current["port"] if current and port_is_free(current["port"]) else free_port()
        command = [
            sys.executable,
            "-m",
            "airloop.serving.gateway",
            "--state-dir",
            str(self._dir(deployment)),
            "--port",
            str(port),
        ]
        env = {TOKEN_ENV: self._token(deployment)}
        process = {"pid": self._spawn(deployment, "gateway", command, env), "port": port}
        self._wait_ready(deployment, "gateway", process)
        state["gateway"] = process
        self._write_state(deployment, state)

    def _spawn(
        self, deployment: str, name: str, command: list[str], extra_env: dict[str, str] | None = None
    ) -> int:
        # Resolved here: the process runs in the state folder, where a relative AIRLOOP_HOME means
        # another place.
        env = {
            # Not the parent's Prometheus multiprocess folder (importing feast makes one, removed when that
            # process exits, as a Celery task's does): the servers keep their own metrics.
            **{k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS_MULTIPROC")},
            "CI": "true",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHONUNBUFFERED": "1",
            "AIRLOOP_HOME": str(settings.home()),
            "AIRLOOP_ARTEFACTS": settings.artefact_root(),
            **(extra_env or {}),
        }
        with open(self._dir(deployment) / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self._dir(deployment),
                start_new_session=True,
            )
        return process.pid

    def _wait_ready(self, deployment: str, name: str, process: dict[str, Any]) -> None:
        log = self._dir(deployment) / f"{name}.log"
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if not _alive(process["pid"]):
                raise RuntimeError(
                    f"{name} of deployment {deployment!r} exited while starting: "
                    f"{_first_error(log)} (log: {log})"
                )
            if _pings(process):
                return
            time.sleep(0.2)
        _stop_group(process["pid"])
        raise RuntimeError(
            f"{name} of deployment {deployment!r} did not answer within "
            f"{self.startup_timeout_s} s (log: {log})"
        )

    def _token(self, deployment: str) -> str:
        """The connection's token, else the deployment's own (made on first use); kept in the token
        file either way, so that calls without the connection (a new target in a trigger) have it."""
        path = self._dir(deployment) / TOKEN_FILE
        if self.admin_token is None and path.exists():
            return path.read_text()
        token = self.admin_token or secrets.token_urlsafe(32)
        if not path.exists() or path.read_text() != token:
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_suffix(".tmp")
            staging.unlink(missing_ok=True)
            with os.fdopen(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
                out.write(token)
            staging.replace(path)
        return token

    def _headers(self, deployment: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token(deployment)}"}

    def _admin(self, state: dict[str, Any], method: str, path: str, **kwargs: Any) -> Any:
        try:
            answer = httpx.request(
                method,
                f"{_endpoint(state)}{path}",
                trust_env=False,
                timeout=10,
                headers=self._headers(state["deployment"]),
                **kwargs,
            )
        except httpx.TransportError as exc:
            raise RuntimeError(
                f"the gateway of deployment {state['deployment']!r} does not answer "
                f"({exc!r}): deploy() restarts it"
            ) from exc
        return _checked(answer, state["deployment"])


def routes_from_state(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The gateway's routing table for a deployment's state."""
    return {
        name: {
            "url": f"http://127.0.0.1:{p['port']}",
            "model_version": p["model_version"],
            "weight": p["weight"],
            "shadow": bool(p.get("shadow")),
            "protocol": "v2" if p.get("server") == "mlserver" else "seldon",
            "feature_names": p.get("feature_names"),
            "encoded": bool(p.get("encoded")),
        }
        for name, p in state.get("predictors", {}).items()
    }


def _manifest_fields(model_dir: str) -> dict[str, Any]:
    """What the gateway knows of a predictor's model, from its manifest, unverified (the model server
    verifies it as it loads): the feature names it names a V2 predictor's columns after when a client
    names none, and whether the model encodes its inputs (takes strings and nulls)."""
    try:
        manifest = json.loads((Path(model_dir) / "manifest.json").read_text())
        names, encoded = manifest.get("feature_names"), bool(manifest.get("encoding"))
    except (OSError, ValueError, AttributeError):
        return {"feature_names": None, "encoded": False}
    return {"feature_names": [str(n) for n in names] if isinstance(names, list) else None, "encoded": encoded}


def _endpoint(state: dict[str, Any]) -> str:
    if not state.get("gateway"):
        raise RuntimeError(f"deployment {state['deployment']!r} has no gateway: deploy() starts it")
    return f"http://127.0.0.1:{state['gateway']['port']}"


def _checked(answer: httpx.Response, deployment: str) -> Any:
    if answer.is_error:
        try:
            info = answer.json()["status"]["info"]
        except (ValueError, KeyError, TypeError):
            info = answer.text or answer.reason_phrase
        raise (ValueError if answer.status_code < 500 else RuntimeError)(
            f"gateway of deployment {deployment!r}: {info}"
        )
    return answer.json()


def _pings(spec: dict[str, Any] | None) -> bool:
    """Whether the process is alive and answers its health check (model servers and gateway alike)."""
    if not spec or not _alive(spec["pid"]):
        return False
    health = SERVERS[spec.get("server", "seldon")]["health"]
    try:
        answer = httpx.get(f"http://127.0.0.1:{spec['port']}{health}", trust_env=False, timeout=2)
        return answer.is_success
    except httpx.TransportError:
        return False


def _alive(pid: int) -> bool:
    try:
        # Reap it if it is our child that exited, else a zombie would look alive to kill(pid, 0).
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_group(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL what is left after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            _alive(pid)  # reaps the leader if it is our child
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def _first_error(log: Path) -> str:
    """The first exception line of a log: the cause (e.g. a checksum mismatch), not the shutdown noise."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors = [line for line in lines if _ERROR_LINE.match(line)]
    return errors[0] if errors else (lines[-1] if lines else "no output")
