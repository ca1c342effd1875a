"""``airloop loop --production``: the reference loop on the production topology, run for real on one machine.

Every service is a real one, started from Debian packages and the environment's PyPI packages, bound to
127.0.0.1 on a free port, with its data under ``<AIRLOOP_HOME>/services`` (PostgreSQL's in a temporary
folder its user can reach):

- PostgreSQL: Airflow's metadata database and MLflow's backend store (one user and database each);
- Redis: the Celery broker;
- moto's S3 server, MinIO's stand-in: the buckets ``mlflow`` and ``airloop``;
- an MLflow tracking server on PostgreSQL, its artefacts on S3 through the server (``--serve-artifacts``);
- Airflow's api-server, scheduler, dag-processor and triggerer (the control plane, one AIRFLOW_HOME) and
  two Celery workers, each with its own working directory, AIRFLOW_HOME and AIRLOOP_HOME.

The Airflow settings are docker-compose.yml's (``AIRFLOW_SETTINGS``, compared by a test); only what one
host forces differs (``HOST_SETTINGS``: ports, folders). What tasks hand on still goes through folders
every process on this machine reaches (``SHARED_PATHS``); object storage for those is a later step.

PostgreSQL refuses to run as root: as root, the harness runs it as the ``postgres`` user of Debian's
package, or creates a system user for it.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from airloop import settings
from airloop.embedded.standalone import AUTH_MANAGER, PASSWORDS_FILE, USERNAME, Standalone
from airloop.ports import free_port

if TYPE_CHECKING:
    from airloop.embedded.runner import LabelLag
    from airloop.embedded.worlds import DemoWorld, TableWorld

WORKERS = 2
# The binaries the topology starts; ``missing_binaries()`` names those absent (`make system` installs them).
POSTGRES_VERSIONS = ("17", "16", "15")
POSTGRES_USER = "postgres"  # Debian's package creates it; otherwise the harness makes a system user
FALLBACK_POSTGRES_USER = "airloop-postgres"
BUCKETS = ("mlflow", "airloop")
# Artefacts the MLflow server stores (--artifacts-destination) and serves (--serve-artifacts).
PROXIED = "mlflow-artifacts:/"
# moto accepts any key; the values only have to agree between the server's clients.
S3_KEY, S3_SECRET, S3_REGION = "airloop", "airloop-secret", "us-east-1"

# The Airflow settings of the production topology, the same in docker-compose.yml (a test compares them).
AIRFLOW_SETTINGS = {
    "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__AUTH_MANAGER": AUTH_MANAGER,
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USERNAME}:admin",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
    # Two task slots per worker: the reference tasks are CPU-bound (training, conversion).
    "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
    "AIRFLOW__CORE__PARALLELISM": "8",
    "AIRFLOW__API__WORKERS": "2",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}
# Settings whose keys are the same everywhere and whose values name this deployment's endpoints and secrets.
ENDPOINT_SETTINGS = (
    "AIRFLOW__CORE__FERNET_KEY",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    "AIRFLOW__CELERY__BROKER_URL",
    "AIRFLOW__CELERY__RESULT_BACKEND",
    "AIRFLOW__API_AUTH__JWT_SECRET",
    "AIRFLOW__API__SECRET_KEY",
    "AIRFLOW__API__BASE_URL",
    "AIRFLOW_CONN_MLFLOW_DEFAULT",
    "AIRFLOW_CONN_AWS_DEFAULT",
    "AIRFLOW_CONN_AIRLOOP_SERVING_DEFAULT",
    "AIRLOOP_ARTEFACTS",
    "AIRLOOP_TRAINING_DATA",
)
# Only on one host: every component on its own port, folder and password file (containers have their own).
HOST_SETTINGS = (
    "AIRFLOW__API__HOST",
    "AIRFLOW__API__PORT",
    "AIRFLOW__CORE__DAGS_FOLDER",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE",
    "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT",
    "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT",
)
# What tasks hand on through a folder rather than object storage: every process on this machine reaches
# it; on several hosts it needs a shared disk (or, later, object storage).
SHARED_PATHS = (
    "artefacts/ (AIRLOOP_ARTEFACTS: reports, request logs, Data Docs; the UI reads file:// only)",
    "incoming/ (AIRLOOP_TRAINING_DATA)",
    "serving/ (the local serving target's state, the serving connection's home)",
    "<worker AIRLOOP_HOME>/serving/models (the IR folders the model servers load)",
)


def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL server binaries (initdb, postgres, pg_ctl), if installed."""
    for version in POSTGRES_VERSIONS:
        folder = Path(f"/usr/lib/postgresql/{version}/bin")
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and (Path(found).parent / "initdb").is_file() else None


def missing_binaries() -> list[str]:
    """The programs the topology needs that this machine lacks (``make system`` installs the Debian ones)."""
    venv = Path(sys.executable).parent
    missing = [] if postgres_bin() else ["postgres (Debian package postgresql)"]
    if not shutil.which("redis-server"):
        missing.append("redis-server (Debian package redis-server)")
    for name in ("moto_server", "mlflow", "airflow"):
        if not (venv / name).exists():
            missing.append(f"{name} (in {venv})")
    try:
        import airflow.providers.celery  # noqa: F401
        import psycopg2  # noqa: F401
    except ImportError as e:
        missing.append(f"{e.name} (the provider's [celery,postgres] extras)")
    return missing


def _say(message: str) -> None:
    print(f"[airloop production] {message}", flush=True)


@dataclass
class Service:
    """One long-running process in its own process group, logging to a file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    stop_signal: int = signal.SIGTERM
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> None:
        self.cwd.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def check(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited ({self.process.returncode}); {self.log_path}:\n{tail}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, self.stop_signal)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def _wait(what: str, ready: Callable[[], bool], services: list[Service], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for service in services:
            service.check()
        try:
            if ready():
                return
        except (httpx.HTTPError, OSError, ValueError):
            pass  # not up yet
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready in {timeout:.0f}s; see {[str(s.log_path) for s in services]}")


class Postgres:
    """A PostgreSQL cluster of its own: ``initdb`` into a temporary folder, ``pg_ctl`` to start and stop.

    As root, it runs as an unprivileged user (PostgreSQL refuses root): Debian's ``postgres``, or a
    system user created for it. The superuser's password is random; the server listens on 127.0.0.1 only.
    """

    def __init__(self, log_dir: Path) -> None:
        folder = postgres_bin()
        if folder is None:
            raise RuntimeError("PostgreSQL's server binaries are missing: run `make system`")
        self.bin = folder
        self.port = free_port()
        self.password = secrets.token_urlsafe(16)
        self.user = self._os_user() if os.geteuid() == 0 else None
        # Under /tmp: the unprivileged user must reach it, and the repository may sit under a private home.
        self.root = Path(tempfile.mkdtemp(prefix="airloop-postgres-"))
        self.data = self.root / "data"
        self.log_path = log_dir / "postgres.log"

    @staticmethod
    def _os_user() -> str:
        for name in (POSTGRES_USER, FALLBACK_POSTGRES_USER):
            try:
                pwd.getpwnam(name)
                return name
            except KeyError:
                continue
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                FALLBACK_POSTGRES_USER,
            ],
            check=True,
        )
        return FALLBACK_POSTGRES_USER

    def _as_user(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", self.user, "--", *argv] if self.user else argv

    def _run(self, *argv: str) -> None:
        done = subprocess.run(self._as_user(list(argv)), capture_output=True, text=True, cwd=self.root)
        if done.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr or done.stdout}")

    def start(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password)
        if self.user:
            info = pwd.getpwnam(self.user)
            os.chown(self.root, info.pw_uid, info.pw_gid)
            os.chown(pwfile, info.pw_uid, info.pw_gid)
        os.chmod(pwfile, 0o600)
        self._run(
            str(self.bin / "initdb"),
            f"--pgdata={self.data}",
            "--username=airloop",
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--no-sync",
        )
        pwfile.unlink()
        # fsync off: a throwaway cluster; TCP on loopback, the socket in the data folder.
        options = f"-h 127.0.0.1 -p {self.port} -k {self.data} -c fsync=off -c max_connections=200"
        server_log = self.root / "server.log"
        self._run(
            str(self.bin / "pg_ctl"),
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            str(self.data),
            "-l",
            str(server_log),
            "-o",
            options,
        )

    def url(self, user: str = "airloop", password: str | None = None, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://{user}:{password or self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A user and a database of the same name, the user owning it; returns the user's password."""
        import psycopg2

        password = secrets.token_urlsafe(16)
        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user="airloop", password=self.password, dbname="postgres"
        )
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(f'CREATE USER "{name}" WITH PASSWORD %s', (password,))
            cursor.execute(f'CREATE DATABASE "{name}" OWNER "{name}"')
        conn.close()
        return password

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run(str(self.bin / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(self.data))
            finally:
                self._keep_log()
        shutil.rmtree(self.root, ignore_errors=True)

    def _keep_log(self) -> None:
        server_log = self.root / "server.log"
        if server_log.exists():
            shutil.copyfile(server_log, self.log_path)


class Production(Standalone):
    """The production topology on this machine, driven over Airflow's REST API like ``Standalone``.

    :param home: the loop's AIRLOOP_HOME: the shared folders (``SHARED_PATHS``) and ``services/``.
    :param dags: the DAGs folder every component reads (the image's, in a container deployment).
    """

    NAME = "production topology"

    def __init__(self, home: Path, dags: Path) -> None:
        self.home = home
        self.dags = dags
        self.services_dir = home / "services"
        self.services_dir.mkdir(parents=True, exist_ok=True)
        self.control_home = self.services_dir / "airflow"
        self.port = free_port()
        self.postgres: Postgres | None = None
        self.services: list[Service] = []
        self.endpoints: dict[str, str] = {}
        url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            {
                "AIRFLOW__API__BASE_URL": url,
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.control_home / PASSWORDS_FILE),
            },
            self.services_dir / "airflow-api-server.log",
        )
        # Two API workers share the machine with every other component: a busy one answers slowly.
        self.http.timeout = httpx.Timeout(120.0)

    # -- services ---------------------------------------------------------------------------------

    def _service(self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> Service:
        service = Service(name, argv, env, cwd or self.services_dir, self.services_dir / f"{name}.log")
        service.start()
        self.services.append(service)
        return service

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AIRLOOP_HOME"))}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _start_postgres(self) -> None:
        self.postgres = Postgres(self.services_dir)
        self.postgres.start()
        for name in ("airflow", "mlflow"):
            password = self.postgres.create_database(name)
            self.endpoints[f"{name}_db"] = self.postgres.url(name, password, name)

    def _start_redis(self) -> None:
        port = free_port()
        data = self.services_dir / "redis"
        data.mkdir()
        argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data)]
        redis = self._service("redis", [*argv, "--save", "", "--appendonly", "no"], self._base_env())
        self.endpoints["redis"] = f"redis://127.0.0.1:{port}/0"

        def ready() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")

        _wait("Redis", ready, [redis], 30)

    def _start_s3(self) -> None:
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        moto = self._service(
            "s3",
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            self._base_env(),
        )
        _wait("S3", lambda: httpx.get(f"{endpoint}/moto-api/", timeout=2).status_code < 500, [moto], 120)
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=S3_REGION,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
        )
        for bucket in BUCKETS:
            client.create_bucket(Bucket=bucket)
        self.endpoints["s3"] = endpoint

    def _start_mlflow(self) -> None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            **self._base_env(),
            "MLFLOW_S3_ENDPOINT_URL": self.endpoints["s3"],
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": S3_REGION,
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        mlflow = self._service(
            "mlflow",
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--host=127.0.0.1",
                f"--port={port}",
                f"--backend-store-uri={self.endpoints['mlflow_db']}",
                "--artifacts-destination=s3://mlflow/",
                "--serve-artifacts",
                "--workers=1",
            ],
            env,
        )
        _wait("MLflow", lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, [mlflow], 180)
        self.endpoints["mlflow"] = url

    def airflow_settings(self) -> dict[str, str]:
        """The control plane's settings: ``AIRFLOW_SETTINGS``, this deployment's endpoints, this host's."""
        db = self.endpoints["airflow_db"]
        return {
            **AIRFLOW_SETTINGS,
            "AIRFLOW_HOME": str(self.control_home),
            "AIRLOOP_HOME": str(self.control_home / "airloop"),
            "AIRLOOP_RUNTIMES": str(settings.runtimes_dir()),
            "AIRFLOW__CORE__FERNET_KEY": _fernet_key(),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db,
            "AIRFLOW__CELERY__BROKER_URL": self.endpoints["redis"],
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{db}",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__API__BASE_URL": self.url,
            # New experiments' artefacts through the server to S3 (without it, a worker's local folder).
            "AIRFLOW_CONN_MLFLOW_DEFAULT": json.dumps(
                {"conn_type": "mlflow", "host": self.endpoints["mlflow"], "extra": {"artifact_root": PROXIED}}
            ),
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(
                {
                    "conn_type": "aws",
                    "login": S3_KEY,
                    "password": S3_SECRET,
                    "extra": {"endpoint_url": self.endpoints["s3"], "region_name": S3_REGION},
                }
            ),
            "AIRFLOW_CONN_AIRLOOP_SERVING_DEFAULT": json.dumps(
                {
                    "conn_type": "airloop_serving",
                    "extra": {"target": "local", "home": str(self.home / "serving")},
                }
            ),
            "AIRLOOP_ARTEFACTS": (self.home / "artefacts").as_uri(),
            "AIRLOOP_TRAINING_DATA": str(self.home / "incoming" / "training.parquet"),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.passwords_file),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        }

    def _start_airflow(self, timeout: float) -> None:
        env = {**self._base_env(), **self.airflow_settings()}
        self.env = env
        airflow = str(Path(sys.executable).parent / "airflow")
        self.control_home.mkdir(parents=True, exist_ok=True)
        migrate = subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True, text=True)
        if migrate.returncode:
            raise RuntimeError(f"airflow db migrate failed: {migrate.stderr[-3000:]}")
        control = [
            self._service(f"airflow-{name}", [airflow, name], env, self.control_home)
            for name in ("api-server", "scheduler", "dag-processor", "triggerer")
        ]
        workers = []
        for n in range(1, WORKERS + 1):
            # A host of its own: working directory, AIRFLOW_HOME (logs) and AIRLOOP_HOME.
            folder = self.services_dir / f"worker-{n}"
            worker_env = {
                **env,
                "AIRFLOW_HOME": str(folder / "airflow"),
                "AIRLOOP_HOME": str(folder / "airloop"),
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            }
            argv = [airflow, "celery", "worker", "--celery-hostname", f"worker-{n}@%h"]
            workers.append(self._service(f"airflow-worker-{n}", argv, worker_env, folder))
        components = ("metadatabase", "scheduler", "triggerer", "dag_processor")

        def healthy() -> bool:
            health = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=2).json()
            return all((health.get(c) or {}).get("status") == "healthy" for c in components)

        _wait("Airflow", lambda: healthy() and self._log_in(), control + workers, timeout)
        _wait(
            "the Celery workers",
            lambda: all(" ready." in w.log_path.read_text(errors="replace") for w in workers),
            control + workers,
            120,
        )

    def start(self, timeout: float = 300.0) -> None:
        """Start every service in dependency order (Airflow healthy within ``timeout``); on failure, stop
        what started."""
        try:
            _say("PostgreSQL, Redis, S3")
            self._start_postgres()
            self._start_redis()
            self._start_s3()
            _say(f"MLflow on PostgreSQL, artefacts on S3 ({self.endpoints['s3']})")
            self._start_mlflow()
            _say(f"Airflow: api-server, scheduler, dag-processor, triggerer, {WORKERS} Celery workers")
            self._start_airflow(timeout)
        except BaseException:
            self.stop()
            raise
        # The runner's own calls (the champion's alias, the serving target) use the tasks' connections.
        os.environ.update(self.connections())
        _say(f"up: Airflow {self.url}, MLflow {self.endpoints['mlflow']}; logs in {self.services_dir}")
        _say("handed on through folders (a shared disk on several hosts): " + "; ".join(SHARED_PATHS))

    def stop(self) -> None:
        # Reverse order: the workers and the scheduler go before the databases they write to.
        for service in reversed(self.services):
            service.stop()
        self.services.clear()
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None
        self.http.close()

    def connections(self) -> dict[str, str]:
        """The connections the tasks use, for the runner's own calls (MLflow, the serving target)."""
        return {k: v for k, v in self.env.items() if k.startswith("AIRFLOW_CONN_")}


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def run(
    dags: str,
    rows: int,
    report: str | None,
    world: DemoWorld | TableWorld | None = None,
    labels: LabelLag | None = None,
) -> int:
    """The reference loop (or ``world``'s) on this topology: ``airloop loop --production``."""
    from airloop.embedded.runner import run_loop

    missing = missing_binaries()
    if missing:
        print(f"the production topology needs: {', '.join(missing)} (run `make system`)", file=sys.stderr)
        return 2
    # The built runtimes stay where they are; everything else goes under <AIRLOOP_HOME>/production.
    os.environ["AIRLOOP_RUNTIMES"] = str(settings.runtimes_dir())
    os.environ["AIRLOOP_HOME"] = str(settings.home() / "production")
    return run_loop(dags, rows, report, topology=Production, world=world, labels=labels)
