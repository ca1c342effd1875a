"""docker-compose.yml and the Dockerfiles, checked without a Docker engine (none builds or runs here)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_SCHEMA = REPO.parent / "shared" / "schemas" / "compose-spec.json"
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def _dependencies(service: dict[str, Any]) -> dict[str, str]:
    """depends_on as {service: condition}, whichever of the two Compose forms it uses."""
    depends = service.get("depends_on", {})
    if isinstance(depends, list):
        return dict.fromkeys(depends, "service_started")
    return {name: spec["condition"] for name, spec in depends.items()}


# One-shot jobs (migrations, bucket creation) exit; the others wait for them to complete instead.
JOBS = {
    name
    for service in SERVICES.values()
    for name, condition in _dependencies(service).items()
    if condition == "service_completed_successfully"
}


def _dockerfiles() -> dict[Path, Path]:
    """Every Dockerfile the compose file builds, with its build context."""
    found = {}
    for service in SERVICES.values():
        if build := service.get("build"):
            context = REPO / build.get("context", ".")
            found[context / build.get("dockerfile", "Dockerfile")] = context
    return found


def _copy_sources(dockerfile: Path) -> list[str]:
    """Sources of the COPY and ADD instructions that read the build context."""
    sources = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if not words or words[0].upper() not in {"COPY", "ADD"}:
            continue
        args = words[1:]
        if any(arg.startswith("--from=") for arg in args):
            continue
        sources.extend(arg for arg in args[:-1] if not arg.startswith("--"))
    return sources


def test_matches_the_compose_specification() -> None:
    if not COMPOSE_SCHEMA.exists():
        pytest.skip(f"no Compose Specification schema at {COMPOSE_SCHEMA} (a clone without ../shared)")
    # The schema names draft-07 in a spelling jsonschema does not recognise; say it explicitly.
    validator = jsonschema.Draft7Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    validator.validate(COMPOSE)
    broken = copy.deepcopy(COMPOSE)
    broken["services"]["mlflow"]["depends_on"]["postgres"]["condition"] = "service_ready"
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)


def test_the_stack_has_its_components() -> None:
    expected = {
        "postgres",
        "redis",
        "minio",
        "minio-init",
        "mlflow",
        "airflow-init",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
        "serving",
    }
    assert expected <= set(SERVICES)
    assert SERVICES["serving"]["build"]["dockerfile"] == "docker/Dockerfile.serving"
    mlflow = " ".join(SERVICES["mlflow"]["entrypoint"])
    assert "--serve-artifacts" in mlflow and "postgresql" in mlflow and "s3://" in mlflow
    assert SERVICES["airflow-worker"]["command"] == ["celery", "worker"]
    assert "redis" in _dependencies(SERVICES["airflow-worker"])


def _airflow_keys(env: dict[str, str]) -> set[str]:
    return {key for key in env if key.startswith(("AIRFLOW", "AIRLOOP_", "MLFLOW_"))}


def test_airflow_settings_are_the_production_harness_ones(tmp_path: Path) -> None:
    """Every Airflow service of the stack runs with the settings `make loop-production` runs with."""
    from airloop.embedded import production

    harness = production.Production(tmp_path, REPO / "dags")
    harness.endpoints = {
        "airflow_db": "postgresql+psycopg2://airflow:secret@127.0.0.1:5432/airflow",
        "redis": "redis://127.0.0.1:6379/0",
        "s3": "http://127.0.0.1:9000",
        "mlflow": "http://127.0.0.1:5000",
    }
    ran_with = harness.airflow_settings()
    # Only one host makes the harness set the folders and ports (a container has its own).
    one_host = set(production.HOST_SETTINGS) | {"AIRFLOW_HOME", "AIRLOOP_HOME", "AIRLOOP_RUNTIMES"}
    shared = set(production.AIRFLOW_SETTINGS) | set(production.ENDPOINT_SETTINGS)
    assert _airflow_keys(ran_with) - one_host == shared
    assert ran_with["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    for name, service in SERVICES.items():
        if service.get("image") != SERVICES["airflow-scheduler"]["image"] or name == "mlflow":
            continue
        env = service["environment"]
        assert _airflow_keys(env) == shared, name
        for key, value in production.AIRFLOW_SETTINGS.items():
            assert env[key] == value == ran_with[key], (name, key)
        for key in (
            "AIRFLOW_CONN_MLFLOW_DEFAULT",
            "AIRFLOW_CONN_AWS_DEFAULT",
            "AIRFLOW_CONN_AIRLOOP_SERVING_DEFAULT",
        ):
            assert json.loads(env[key])["conn_type"] == json.loads(ran_with[key])["conn_type"], (name, key)
        # Models go through the MLflow server to object storage, never to a worker's own folder.
        for mlflow in (env, ran_with):
            assert (
                json.loads(mlflow["AIRFLOW_CONN_MLFLOW_DEFAULT"])["extra"]["artifact_root"]
                == "mlflow-artifacts:/"
            )
        scheme = env["AIRFLOW__CELERY__RESULT_BACKEND"].split("://")[0]
        assert (
            scheme == ran_with["AIRFLOW__CELERY__RESULT_BACKEND"].split("://")[0] == "db+postgresql+psycopg2"
        )


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_image_is_pinned_or_built(name: str) -> None:
    service = SERVICES[name]
    assert "image" in service or "build" in service, f"{name}: neither image nor build"
    if "image" in service:
        repository, _, tag = service["image"].rpartition(":")
        assert repository and "/" not in tag and tag not in {"", "latest"}, f"{name}: image not pinned by tag"
    if build := service.get("build"):
        assert (REPO / build.get("context", ".") / build["dockerfile"]).is_file(), f"{name}: no Dockerfile"


@pytest.mark.parametrize("name", sorted(set(SERVICES) - JOBS))
def test_long_running_service_has_a_healthcheck(name: str) -> None:
    healthcheck = SERVICES[name].get("healthcheck", {})
    assert healthcheck.get("test") and not healthcheck.get("disable"), f"{name}: no healthcheck"


def test_jobs_exit_instead_of_restarting() -> None:
    assert JOBS == {"airflow-init", "minio-init"}
    for name in JOBS:
        assert SERVICES[name].get("restart", "no") == "no", f"{name} is a one-shot job"


def test_dependencies_exist_and_health_waits_have_healthchecks() -> None:
    for name, service in SERVICES.items():
        for target, condition in _dependencies(service).items():
            assert target in SERVICES, f"{name} depends on unknown service {target}"
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[target], f"{name} waits for {target}'s missing healthcheck"


def test_published_ports_bind_to_localhost() -> None:
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_airflow_connections_point_at_the_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    from airloop.hooks.mlflow import MlflowHook

    env = SERVICES["airflow-scheduler"]["environment"]
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", env["AIRFLOW_CONN_MLFLOW_DEFAULT"])
    assert MlflowHook().tracking_uri == "http://mlflow:5000"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")
    aws = json.loads(env["AIRFLOW_CONN_AWS_DEFAULT"])
    assert aws["conn_type"] == "aws" and aws["extra"]["endpoint_url"] == "http://minio:9000"


def test_dockerfiles_copy_sources_exist_and_pass_the_ignore_file() -> None:
    dockerfiles = _dockerfiles()
    assert {path.name for path in dockerfiles} == {"Dockerfile.airflow", "Dockerfile.serving"}
    for dockerfile, context in dockerfiles.items():
        sources = _copy_sources(dockerfile)
        assert sources, f"{dockerfile.name} copies nothing"
        # BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile; ours are allow-lists.
        ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
        allowed = [line[1:] for line in ignore if line.startswith("!")]
        for source in sources:
            assert (context / source).exists(), f"{dockerfile.name}: COPY source {source} is missing"
            assert any(source == a or source.startswith(a + "/") for a in allowed), (
                f"{dockerfile.name}: {source} is excluded from the build context by the ignore file"
            )


def test_images_opt_out_of_openvino_telemetry() -> None:
    for dockerfile in _dockerfiles():
        text = dockerfile.read_text()
        assert re.search(r"^ENV CI=true", text, re.MULTILINE), dockerfile.name
        assert "opt_in_out --opt_out" in text, dockerfile.name


def test_required_variables_are_documented() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required, "the compose file takes its secrets from the environment"
    docs = (REPO / "docs" / "deploy.md").read_text()
    missing = sorted(name for name in required if name not in docs)
    assert not missing, f"variables not documented in docs/deploy.md: {missing}"


def test_helm_values_run_the_kubernetes_executor_with_the_shared_settings() -> None:
    """deploy/helm/values.yaml, for the official chart: unchecked against its schema (not on PyPI, npm or
    Debian), so only what needs none."""
    from airloop.embedded import production

    values = yaml.safe_load((REPO / "deploy" / "helm" / "values.yaml").read_text())
    assert values["executor"] == "KubernetesExecutor"
    assert values["postgresql"]["enabled"] is False and values["redis"]["enabled"] is False
    image = SERVICES["airflow-scheduler"]["image"]
    assert f"{values['images']['airflow']['repository']}:{values['images']['airflow']['tag']}" == image
    env = {item["name"]: item["value"] for item in values["env"]}
    # The shared settings, less the Celery ones (each task is a pod).
    shared = {k: v for k, v in production.AIRFLOW_SETTINGS.items() if k != "AIRFLOW__CORE__EXECUTOR"}
    shared = {k: v for k, v in shared.items() if "__CELERY__" not in k}
    assert {k: env.get(k) for k in shared} == shared
    assert not any("__CELERY__" in k for k in env)
