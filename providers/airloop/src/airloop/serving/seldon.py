"""Seldon Core 1.x on Kubernetes as a serving target: one SeldonDeployment per deployment.

Each predictor of the SeldonDeployment serves one model version (``v3``, ``v4``) with our model
server image, and Seldon's ``traffic`` weights split requests between them. The custom resource is
created and merge-patched through the cncf-kubernetes provider's ``KubernetesHook`` (its
``kubernetes`` connection); every patch carries the ``resourceVersion`` it was computed from, so a
concurrent writer makes it fail with 409 and the change is recomputed from a fresh read.

A shadow predictor is Seldon's own (``shadow: true``): Istio mirrors ``traffic`` percent of the
requests to it and drops its answers.

Metrics come from Prometheus' HTTP API, scoped to the deployment's namespace: Seldon's executor
histogram ``seldon_api_executor_client_requests_seconds`` (the one the local gateway exposes too)
and the model server's custom counters ``airloop_model_feedback_total`` (feedback rows it predicts
correctly or not) and ``airloop_model_predictions_total`` (rows per predicted class), summed per
predictor into the shape of ``ServingTarget.metrics()``.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import math
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any

import httpx

import airloop
from airloop.serving.base import (
    ServingTarget,
    check_deployment_name,
    check_predictor,
    check_traffic,
    merge_traffic,
)
from airloop.serving.model import FEEDBACK_METRIC as MODEL_FEEDBACK
from airloop.serving.model import PREDICTIONS_METRIC as MODEL_PREDICTIONS

if TYPE_CHECKING:
    from kubernetes.client import CustomObjectsApi

GROUP, VERSION, PLURAL = "machinelearning.seldon.io", "v1", "seldondeployments"
MODEL_CLASS = "airloop.serving.model.OpenVinoModel"
CONTAINER = "model"
# Where Seldon's storage initializer puts the files of a graph's ``modelUri``.
MOUNTED_MODEL_DIR = "/mnt/models"
DEFAULT_IMAGE = f"airloop/serving:{airloop.__version__}"
REQUESTS_METRIC = "seldon_api_executor_client_requests_seconds"
FEEDBACK_METRIC = f"{MODEL_FEEDBACK}_total"
PREDICTIONS_METRIC = f"{MODEL_PREDICTIONS}_total"
CONFLICT_RETRIES = 5


class KubernetesApiError(RuntimeError):
    """The Kubernetes API refused a request (``status``: its HTTP status) or could not be reached (None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def render_predictor(
    deployment: str, predictor: dict[str, Any], *, image: str = DEFAULT_IMAGE, replicas: int = 1
) -> dict[str, Any]:
    """One SeldonDeployment predictor serving ``predictor["model_version"]`` with our model server.

    With ``model_uri`` in the predictor dict (the IR folder in the artefact store), Seldon's storage
    initializer downloads it to ``/mnt/models``; otherwise ``model_dir`` must be a path in the pod.
    """
    check_predictor(predictor)
    model_uri = predictor.get("model_uri")
    graph: dict[str, Any] = {
        "name": CONTAINER,
        "type": "MODEL",
        "children": [],
        "parameters": [
            {
                "name": "model_dir",
                "type": "STRING",
                "value": MOUNTED_MODEL_DIR if model_uri else str(predictor["model_dir"]),
            }
        ],
    }
    if model_uri:
        graph["modelUri"] = str(model_uri)
    env = {
        "CI": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MODEL_NAME": MODEL_CLASS,
        "SERVICE_TYPE": "MODEL",
    }
    rendered = {
        "name": predictor["name"],
        "replicas": replicas,
        "traffic": predictor["weight"],
        # Seldon labels its metrics' predictor_version with the predictor label "version".
        "labels": {"version": str(predictor["model_version"]), "app.kubernetes.io/part-of": deployment},
        "componentSpecs": [
            {
                "spec": {
                    "containers": [
                        {
                            "name": CONTAINER,
                            "image": image,
                            "env": [{"name": k, "value": v} for k, v in env.items()],
                        }
                    ]
                }
            }
        ],
        "graph": graph,
    }
    if predictor.get("shadow"):
        rendered["shadow"] = True  # traffic is then the percentage of requests Istio mirrors to it
    return rendered


def render_seldon_deployment(
    deployment: str,
    predictors: list[dict[str, Any]],
    *,
    namespace: str = "default",
    image: str = DEFAULT_IMAGE,
    replicas: int = 1,
) -> dict[str, Any]:
    """The SeldonDeployment (machinelearning.seldon.io/v1) serving ``predictors`` with their weights."""
    check_deployment_name(deployment)
    names = [p.get("name") for p in predictors]
    if not predictors or len(set(names)) != len(names):
        raise ValueError(f"a SeldonDeployment needs predictors with distinct names, got {names}")
    manifest: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SeldonDeployment",
        "metadata": {
            "name": deployment,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "airloop"},
        },
        "spec": {
            "name": deployment,
            "protocol": "seldon",
            "predictors": [
                render_predictor(deployment, p, image=image, replicas=replicas) for p in predictors
            ],
        },
    }
    check_traffic(_traffic(manifest["spec"]["predictors"]))
    return manifest


def _traffic(predictors: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A SeldonDeployment's predictors as ``{name: {"weight", "shadow"}}`` (see ``merge_traffic``)."""
    return {p["name"]: {"weight": p.get("traffic", 0), "shadow": bool(p.get("shadow"))} for p in predictors}


def _with_traffic(predictor: dict[str, Any], traffic: dict[str, Any]) -> dict[str, Any]:
    updated = {key: value for key, value in predictor.items() if key != "shadow"}
    updated["traffic"] = traffic["weight"]
    if traffic["shadow"]:
        updated["shadow"] = True
    return updated


class SeldonKubernetesTarget(ServingTarget):
    """Serve deployments as SeldonDeployments in a Kubernetes namespace.

    :param namespace: where the SeldonDeployments live.
    :param kubernetes_conn_id: Airflow connection of type ``kubernetes`` (cncf-kubernetes provider).
    :param prometheus_url: base URL of the Prometheus that scrapes Seldon (needed by ``metrics()``).
    :param image: the model server image (``docker/Dockerfile.serving``).
    :param replicas: pods per predictor.
    :param timeout_s: timeout of each Kubernetes and Prometheus request.
    :param namespace_label: the label holding a series' Kubernetes namespace in that Prometheus
        (``namespace`` with the Prometheus operator's pod monitors; ``kubernetes_namespace`` with
        Seldon's analytics chart). Queries are scoped to ``namespace``: the same deployment name in
        another namespace is another deployment.
    """

    # The custom object a deployment is (subclasses for other operators change them).
    group, version, plural, kind = GROUP, VERSION, PLURAL, "SeldonDeployment"

    def __init__(
        self,
        namespace: str = "default",
        kubernetes_conn_id: str = "kubernetes_default",
        prometheus_url: str | None = None,
        *,
        image: str = DEFAULT_IMAGE,
        replicas: int = 1,
        timeout_s: float = 10.0,
        namespace_label: str = "namespace",
    ) -> None:
        self.namespace = namespace
        self.kubernetes_conn_id = kubernetes_conn_id
        self.prometheus_url = prometheus_url
        self.image = image
        self.replicas = replicas
        self.timeout_s = timeout_s
        self.namespace_label = namespace_label

    # -- the interface -----------------------------------------------------------------------------
    def deploy(self, deployment: str, predictors: list[dict[str, Any]]) -> dict[str, Any]:
        check_deployment_name(deployment)
        wanted: dict[str, dict[str, Any]] = {}
        for predictor in predictors:
            rendered = render_predictor(deployment, predictor, image=self.image, replicas=self.replicas)
            if rendered["name"] in wanted:
                raise ValueError(f"predictor {rendered['name']!r} is listed twice")
            wanted[rendered["name"]] = rendered

        def change(current: list[dict[str, Any]]) -> list[dict[str, Any]]:
            running = {p["name"]: p for p in current}
            for name, predictor in wanted.items():
                old = running.get(name)
                if old and (old.get("labels") or {}).get("version") != predictor["labels"]["version"]:
                    raise ValueError(
                        f"predictor {name!r} already serves model version "
                        f"{old['labels'].get('version')}: remove it first or use another name"
                    )
            traffic = merge_traffic(
                {**{n: {"weight": 0} for n in wanted}, **_traffic(current)},
                {n: p["traffic"] for n, p in wanted.items() if not p.get("shadow")},
                {n: p["traffic"] for n, p in wanted.items() if p.get("shadow")},
            )
            merged = [*current, *(p for n, p in wanted.items() if n not in running)]
            return [_with_traffic(p, traffic[p["name"]]) for p in merged]

        if self._read(deployment) is None:
            manifest = render_seldon_deployment(
                deployment, predictors, namespace=self.namespace, image=self.image, replicas=self.replicas
            )
            try:
                return self._create(deployment, manifest)
            except KubernetesApiError as exc:
                if exc.status != 409:  # 409: created meanwhile by another writer, patch it instead
                    raise
        return self._update(deployment, _predictors_patch(change))

    def set_traffic(
        self, deployment: str, weights: dict[str, int], *, shadow: dict[str, int] | None = None
    ) -> dict[str, Any]:
        def change(current: list[dict[str, Any]]) -> list[dict[str, Any]]:
            traffic = merge_traffic(_traffic(current), weights, shadow)
            return [_with_traffic(p, traffic[p["name"]]) for p in current]

        return self._update(deployment, _predictors_patch(change))

    def remove(self, deployment: str, predictor: str) -> dict[str, Any]:
        def change(current: list[dict[str, Any]]) -> list[dict[str, Any]]:
            found = {p["name"]: p for p in current}
            if predictor not in found:
                raise ValueError(
                    f"deployment {deployment!r} has no predictor {predictor!r}: it has {sorted(found)}"
                )
            if found[predictor].get("traffic", 0) != 0 and not found[predictor].get("shadow"):
                raise ValueError(
                    f"predictor {predictor!r} still receives {found[predictor]['traffic']}% of "
                    "the traffic: set its weight to 0 first"
                )
            return [p for p in current if p["name"] != predictor]

        return self._update(deployment, _predictors_patch(change))

    def state(self, deployment: str) -> dict[str, Any]:
        return self._describe(self._required(deployment))

    def metrics(self, deployment: str) -> dict[str, dict[str, Any]]:
        names = self._predictor_names(self._required(deployment))
        with httpx.Client(trust_env=False, timeout=self.timeout_s) as client:
            results = {
                key: self._query(client.get, query) for key, query in self._queries(deployment).items()
            }
        return stats_from_prometheus(names, results)

    async def ametrics(self, deployment: str) -> dict[str, dict[str, Any]]:
        names = self._predictor_names(await asyncio.to_thread(self._required, deployment))
        async with httpx.AsyncClient(trust_env=False, timeout=self.timeout_s) as client:
            results = {
                key: self._checked_query(await self._get(client, query), query)
                for key, query in self._queries(deployment).items()
            }
        return stats_from_prometheus(names, results)

    def delete(self, deployment: str) -> None:
        check_deployment_name(deployment)
        try:
            self._call(
                "delete",
                deployment,
                lambda api: api.delete_namespaced_custom_object(
                    self.group, self.version, self.namespace, self.plural, deployment
                ),
            )
        except KubernetesApiError as exc:
            if exc.status != 404:
                raise

    # -- the custom object -------------------------------------------------------------------------
    def _describe(self, custom_object: dict[str, Any]) -> dict[str, Any]:
        return describe(custom_object)

    def _predictor_names(self, custom_object: dict[str, Any]) -> list[str]:
        return [p["name"] for p in custom_object["spec"]["predictors"]]

    # -- Kubernetes --------------------------------------------------------------------------------
    @cached_property
    def _api(self) -> CustomObjectsApi:
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        return KubernetesHook(conn_id=self.kubernetes_conn_id).custom_object_client

    def _call(self, action: str, deployment: str, request: Callable[[CustomObjectsApi], Any]) -> Any:
        """Run one API request; every failure becomes a KubernetesApiError naming the object and status."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        where = f"{self.kind} {self.namespace}/{deployment}"
        try:
            return request(self._api)
        except ApiException as exc:
            raise KubernetesApiError(
                f"{action} {where}: HTTP {exc.status} {exc.reason}: {_message(exc.body)}", exc.status
            ) from exc
        except HTTPError as exc:
            raise KubernetesApiError(
                f"{action} {where}: the Kubernetes API does not answer "
                f"(connection {self.kubernetes_conn_id!r}): {exc}"
            ) from exc

    def _read(self, deployment: str) -> dict[str, Any] | None:
        check_deployment_name(deployment)
        try:
            return self._call(
                "get",
                deployment,
                lambda api: api.get_namespaced_custom_object(
                    self.group,
                    self.version,
                    self.namespace,
                    self.plural,
                    deployment,
                    _request_timeout=self.timeout_s,
                ),
            )
        except KubernetesApiError as exc:
            if exc.status == 404:
                return None
            raise

    def _required(self, deployment: str) -> dict[str, Any]:
        found = self._read(deployment)
        if found is None:
            raise ValueError(
                f"deployment {deployment!r} is not deployed: no {self.kind} "
                f"{deployment!r} in namespace {self.namespace!r}"
            )
        return found

    def _create(self, deployment: str, manifest: dict[str, Any]) -> dict[str, Any]:
        created = self._call(
            "create",
            deployment,
            lambda api: api.create_namespaced_custom_object(
                self.group,
                self.version,
                self.namespace,
                self.plural,
                manifest,
                _request_timeout=self.timeout_s,
            ),
        )
        return self._describe(created)

    def _update(self, deployment: str, change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """Merge-patch the object with ``change(current object)``; recompute on a 409 conflict."""
        for _ in range(CONFLICT_RETRIES):
            current = self._required(deployment)
            patch = change(copy.deepcopy(current))
            patch.setdefault("metadata", {})["resourceVersion"] = current["metadata"].get("resourceVersion")
            try:
                updated = self._call(
                    "patch",
                    deployment,
                    functools.partial(_patch, self, name=deployment, body=patch),
                )
            except KubernetesApiError as exc:
                if exc.status == 409:
                    continue  # another writer changed it since our read
                raise
            return self._describe(updated)
        raise KubernetesApiError(
            f"patch {self.kind} {self.namespace}/{deployment}: still conflicting "
            f"after {CONFLICT_RETRIES} attempts (other writers keep changing it)"
        )

    # -- Prometheus --------------------------------------------------------------------------------
    def _query_url(self) -> str:
        if not self.prometheus_url:
            raise ValueError(
                "metrics() of the Seldon target needs 'prometheus_url' (the Prometheus that "
                "scrapes Seldon's executors) in the serving connection's extra"
            )
        return f"{self.prometheus_url.rstrip('/')}/api/v1/query"

    def _queries(self, deployment: str) -> dict[str, str]:
        scope = f'deployment_name="{deployment}",{self.namespace_label}="{self.namespace}"'
        # Feedback calls go through the executor too; only predictions are requests to compare.
        requests = f'{scope},service!="feedback"'
        return {
            "count": f"sum by (predictor_name, code) ({REQUESTS_METRIC}_count{{{requests}}})",
            "sum": f"sum by (predictor_name) ({REQUESTS_METRIC}_sum{{{requests}}})",
            "bucket": f"sum by (predictor_name, le) ({REQUESTS_METRIC}_bucket{{{requests}}})",
            "feedback": f"sum by (predictor_name, outcome) ({FEEDBACK_METRIC}{{{scope}}})",
            "predicted": f"sum by (predictor_name, class) ({PREDICTIONS_METRIC}{{{scope}}})",
        }

    def _query(self, get: Callable[..., httpx.Response], query: str) -> list[dict[str, Any]]:
        try:
            answer = get(self._query_url(), params={"query": query})
        except httpx.TransportError as exc:
            raise RuntimeError(f"Prometheus at {self.prometheus_url} does not answer: {exc!r}") from exc
        return self._checked_query(answer, query)

    async def _get(self, client: httpx.AsyncClient, query: str) -> httpx.Response:
        try:
            return await client.get(self._query_url(), params={"query": query})
        except httpx.TransportError as exc:
            raise RuntimeError(f"Prometheus at {self.prometheus_url} does not answer: {exc!r}") from exc

    def _checked_query(self, answer: httpx.Response, query: str) -> list[dict[str, Any]]:
        try:
            body = answer.json()
        except ValueError:
            body = {}
        if answer.is_error or body.get("status") != "success":
            raise RuntimeError(
                f"Prometheus at {self.prometheus_url} failed {query!r}: "
                f"HTTP {answer.status_code} {body.get('error') or answer.text[:200]}"
            )
        return body["data"]["result"]


def _patch(target: SeldonKubernetesTarget, api: CustomObjectsApi, *, name: str, body: dict[str, Any]) -> Any:
    """A merge patch of one custom object (a function, so a retry loop binds its own body)."""
    return api.patch_namespaced_custom_object(
        target.group,
        target.version,
        target.namespace,
        target.plural,
        name,
        body,
        _request_timeout=target.timeout_s,
    )


def _predictors_patch(
    change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A SeldonDeployment's patch: ``spec.predictors`` as ``change`` makes them (a merge patch replaces
    a list whole)."""
    return lambda current: {"spec": {"predictors": change(current["spec"]["predictors"])}}


def describe(custom_object: dict[str, Any]) -> dict[str, Any]:
    """The target state of a SeldonDeployment: endpoint, predictors with weight and health, Seldon's
    status."""
    deployment = custom_object["metadata"]["name"]
    status = custom_object.get("status") or {}
    replicas = status.get("deploymentStatus") or {}
    predictors = {}
    for predictor in custom_object["spec"]["predictors"]:
        name = predictor["name"]
        # Seldon names a predictor's Kubernetes Deployments "<sdep>-<predictor>-<index>-<container>".
        own = [s for key, s in replicas.items() if key.startswith(f"{deployment}-{name}-")]
        predictors[name] = {
            "model_version": (predictor.get("labels") or {}).get("version"),
            "weight": predictor.get("traffic", 0),
            "shadow": bool(predictor.get("shadow")),
            "replicas": predictor.get("replicas", 1),
            "model_uri": predictor["graph"].get("modelUri"),
            "healthy": status.get("state") == "Available"
            and bool(own)
            and all(s.get("availableReplicas", 0) >= max(s.get("replicas", 1), 1) for s in own),
        }
    return {
        "deployment": deployment,
        "namespace": custom_object["metadata"].get("namespace"),
        "endpoint": (status.get("address") or {}).get("url"),
        "status": status.get("state"),
        "description": status.get("description"),
        "predictors": predictors,
    }


def stats_from_prometheus(
    names: list[str], results: dict[str, list[dict[str, Any]]]
) -> dict[str, dict[str, Any]]:
    """Per-predictor counts in the shape of ``ServingTarget.metrics()`` from Prometheus instant vectors.

    ``results`` maps ``count``, ``sum``, ``bucket``, ``feedback`` and ``predicted`` to the
    ``data.result`` of the queries built by ``SeldonKubernetesTarget``; series of predictors not in
    ``names`` are ignored. Mirrored pairs are not known here (Istio drops a shadow's answers), so
    there is no ``pairs`` key.
    """
    stats = {
        name: {
            "requests": 0,
            "errors": 0,
            "latency_ms_sum": 0.0,
            "feedback": 0,
            "feedback_correct": 0,
            "latency_ms_buckets": {},
            "predicted": {},
        }
        for name in names
    }

    def samples(key: str) -> Any:
        for sample in results.get(key, []):
            entry = stats.get(sample["metric"].get("predictor_name"))
            value = float(sample["value"][1])
            if entry is not None and math.isfinite(value):
                yield entry, sample["metric"], value

    for entry, labels, value in samples("count"):
        entry["requests"] += int(value)
        if _is_error(labels.get("code", "")):
            entry["errors"] += int(value)
    for entry, _, value in samples("sum"):
        entry["latency_ms_sum"] += value * 1e3
    for entry, labels, value in samples("bucket"):
        le = labels["le"]
        # seconds -> ms, as the gateway keys them
        bound = le if le == "+Inf" else format(float(le) * 1e3, "g")
        entry["latency_ms_buckets"][bound] = entry["latency_ms_buckets"].get(bound, 0) + int(value)
    for entry, labels, value in samples("feedback"):
        entry["feedback"] += int(value)
        if labels.get("outcome") == "correct":
            entry["feedback_correct"] += int(value)
    for entry, labels, value in samples("predicted"):
        name = labels.get("class", "")
        entry["predicted"][name] = entry["predicted"].get(name, 0) + int(value)
    return stats


def _is_error(code: str) -> bool:
    """A server-side failure: HTTP 5xx, or a gRPC status other than OK and client errors."""
    if code.isdigit():
        return int(code) >= 500
    return code not in ("OK", "InvalidArgument", "NotFound", "")


def _message(body: Any) -> str:
    """The ``message`` of a Kubernetes Status body, else the body itself."""
    try:
        return json.loads(body).get("message") or str(body)
    except (TypeError, ValueError, AttributeError):
        return str(body)[:300]
