"""KServe on Kubernetes as a serving target: one InferenceService (serving.kserve.io/v1beta1) per
deployment, speaking the V2 inference protocol.

KServe splits traffic between two revisions of an InferenceService: the latest (its
``spec.predictor``) gets ``canaryTrafficPercent`` of the requests, the previous ready one the rest.
So a deployment here has at most two predictors with traffic: the stable one and one canary. The
predictors a deployment knows (model version, storage URI, weight) and which one is stable live in
the InferenceService's annotations, so any new target instance reads them back; the spec is rendered
from them on every change:

- one predictor at 100: it is the spec, no ``canaryTrafficPercent`` (a promotion ends this way);
- a predictor just deployed at 0 beside it: the spec, with ``canaryTrafficPercent: 0`` (deployed,
  no traffic yet); it stays so after a rollback to the stable one at 100;
- two predictors with traffic: the one that is not stable is the spec, at its weight.

KServe has no shadow predictor: a shadow is refused (``supports_shadow`` is False).

Kubernetes calls, conflict retries and the Prometheus queries are the Seldon target's
(``airloop.serving.seldon``); series are told apart by the ``predictor_name`` label, which the
Prometheus scrape config relabels from the pods' ``airloop.io/predictor`` label.
"""

from __future__ import annotations

import json
from typing import Any

from airloop.serving.base import check_deployment_name, check_predictor, merge_traffic
from airloop.serving.seldon import SeldonKubernetesTarget

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
PREDICTORS = "airloop.io/predictors"  # annotation: {name: {"model_version", "storage_uri", "weight"}}
STABLE = "airloop.io/stable"  # annotation: the predictor KServe's previous revision serves
LATEST = "airloop.io/latest"  # annotation: the predictor of spec.predictor
PREDICTOR_LABEL = "airloop.io/predictor"


def render_inference_service(
    deployment: str,
    predictors: dict[str, dict[str, Any]],
    stable: str,
    latest: str,
    *,
    namespace: str = "default",
    runtime: str | None = None,
    model_format: str = "openvino",
    replicas: int = 1,
) -> dict[str, Any]:
    """The InferenceService serving ``predictors[latest]`` as its spec (``{name: {"model_version",
    "storage_uri", "weight"}}``), ``stable`` being the revision before it."""
    spec = predictors[latest]
    model: dict[str, Any] = {
        "modelFormat": {"name": model_format},
        "protocolVersion": "v2",
        "storageUri": spec["storage_uri"],
    }
    if runtime:
        model["runtime"] = runtime
    predictor: dict[str, Any] = {
        "minReplicas": replicas,
        "labels": {PREDICTOR_LABEL: latest, "airloop.io/model-version": spec["model_version"]},
        "model": model,
    }
    if latest != stable:
        predictor["canaryTrafficPercent"] = spec["weight"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceService",
        "metadata": {
            "name": deployment,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "airloop"},
            "annotations": {
                PREDICTORS: json.dumps(predictors, sort_keys=True),
                STABLE: stable,
                LATEST: latest,
                # The serving.kserve.io/deploymentMode annotation is the cluster's choice: both
                # Serverless and RawDeployment honour canaryTrafficPercent.
            },
        },
        "spec": {"predictor": predictor},
    }


def plan(
    predictors: dict[str, dict[str, Any]], stable: str | None, latest: str | None, added: list[str]
) -> tuple[str, str]:
    """(stable, latest) for predictors with their new weights; ValueError where KServe cannot serve
    that split. ``added``: predictors deployed by this call, in order."""
    live = [name for name, p in predictors.items() if p["weight"] > 0]
    if len(live) > 2:
        raise ValueError(
            "KServe splits traffic between two revisions at most (the stable one and a canary), "
            f"got weights { ({n: predictors[n]['weight'] for n in live}) }"
        )
    if len(live) == 2:
        if stable not in live:
            raise ValueError(
                f"KServe splits traffic between the stable predictor {stable!r} and one canary, "
                f"got weights { ({n: predictors[n]['weight'] for n in live}) }"
            )
        return stable, next(n for n in live if n != stable)
    (only,) = live
    waiting = [n for n in added if n != only] or [n for n in [latest] if n in predictors and n != only]
    return only, waiting[-1] if waiting else only


class KServeTarget(SeldonKubernetesTarget):
    """Serve deployments as KServe InferenceServices in a Kubernetes namespace.

    :param namespace: where the InferenceServices live.
    :param kubernetes_conn_id: Airflow connection of type ``kubernetes`` (cncf-kubernetes provider).
    :param prometheus_url: base URL of the Prometheus that scrapes the predictors (for ``metrics()``).
    :param runtime: the ServingRuntime to use (else KServe picks one for ``model_format``).
    :param model_format: the model format KServe matches a runtime with.
    :param replicas: ``minReplicas`` of the predictor.
    :param timeout_s: timeout of each Kubernetes and Prometheus request.
    :param namespace_label: the label holding a series' namespace in that Prometheus.
    """

    group, version, plural, kind = GROUP, VERSION, PLURAL, "InferenceService"
    supports_shadow = False

    def __init__(
        self,
        namespace: str = "default",
        kubernetes_conn_id: str = "kubernetes_default",
        prometheus_url: str | None = None,
        *,
        runtime: str | None = None,
        model_format: str = "openvino",
        replicas: int = 1,
        timeout_s: float = 10.0,
        namespace_label: str = "namespace",
    ) -> None:
        super().__init__(
            namespace,
            kubernetes_conn_id,
            prometheus_url,
            replicas=replicas,
            timeout_s=timeout_s,
            namespace_label=namespace_label,
        )
        self.runtime = runtime
        self.model_format = model_format

    # -- the interface -----------------------------------------------------------------------------
    def deploy(self, deployment: str, predictors: list[dict[str, Any]]) -> dict[str, Any]:
        check_deployment_name(deployment)
        wanted: dict[str, dict[str, Any]] = {}
        for predictor in predictors:
            check_predictor(predictor)
            if predictor["name"] in wanted:
                raise ValueError(f"predictor {predictor['name']!r} is listed twice")
            wanted[predictor["name"]] = predictor

        def change(known: dict[str, dict[str, Any]], stable: str | None, latest: str | None) -> Any:
            for name, predictor in wanted.items():
                old = known.get(name)
                if old and old["model_version"] != str(predictor["model_version"]):
                    raise ValueError(
                        f"predictor {name!r} already serves model version {old['model_version']}: "
                        "remove it first or use another name"
                    )
            traffic = merge_traffic(
                {**{n: {"weight": 0} for n in wanted}, **_traffic(known)},
                {n: p["weight"] for n, p in wanted.items() if not p.get("shadow")},
                {n: p["weight"] for n, p in wanted.items() if p.get("shadow")},
            )
            _refuse_shadow(traffic)
            added = [n for n in wanted if n not in known]
            for name in added:
                predictor = wanted[name]
                known[name] = {
                    "model_version": str(predictor["model_version"]),
                    "storage_uri": str(predictor.get("model_uri") or predictor["model_dir"]),
                }
            return _with_weights(known, traffic), stable, latest, added

        current = self._read(deployment)
        if current is None:
            known, stable, latest, added = change({}, None, None)
            stable, latest = plan(known, None, None, added)
            return self._create(deployment, self._render(deployment, known, stable, latest))
        return self._update(deployment, self._changing(deployment, change))

    def set_traffic(
        self, deployment: str, weights: dict[str, int], *, shadow: dict[str, int] | None = None
    ) -> dict[str, Any]:
        def change(known: dict[str, dict[str, Any]], stable: str | None, latest: str | None) -> Any:
            traffic = merge_traffic(_traffic(known), weights, shadow)
            _refuse_shadow(traffic)
            return _with_weights(known, traffic), stable, latest, []

        return self._update(deployment, self._changing(deployment, change))

    def remove(self, deployment: str, predictor: str) -> dict[str, Any]:
        def change(known: dict[str, dict[str, Any]], stable: str | None, latest: str | None) -> Any:
            if predictor not in known:
                raise ValueError(
                    f"deployment {deployment!r} has no predictor {predictor!r}: it has {sorted(known)}"
                )
            if known[predictor]["weight"] != 0:
                raise ValueError(
                    f"predictor {predictor!r} still receives {known[predictor]['weight']}% of "
                    "the traffic: set its weight to 0 first"
                )
            return {n: p for n, p in known.items() if n != predictor}, stable, latest, []

        return self._update(deployment, self._changing(deployment, change))

    # -- the custom object -------------------------------------------------------------------------
    def _render(self, deployment: str, known: dict[str, Any], stable: str, latest: str) -> dict[str, Any]:
        return render_inference_service(
            deployment,
            known,
            stable,
            latest,
            namespace=self.namespace,
            runtime=self.runtime,
            model_format=self.model_format,
            replicas=self.replicas,
        )

    def _changing(self, deployment: str, change: Any) -> Any:
        """A whole-object change for ``_update`` from a change of the annotated predictors."""

        def patch(current: dict[str, Any]) -> dict[str, Any]:
            known, stable, latest = _known(current)
            known, stable, latest, added = change(known, stable, latest)
            stable, latest = plan(known, stable, latest, added)
            rendered = self._render(deployment, known, stable, latest)
            # A merge patch: keys of the old predictor spec that the new one lacks are removed.
            old = current["spec"]["predictor"]
            predictor = {**{key: None for key in old}, **rendered["spec"]["predictor"]}
            return {
                "metadata": {"annotations": rendered["metadata"]["annotations"]},
                "spec": {"predictor": predictor},
            }

        return patch

    def _describe(self, custom_object: dict[str, Any]) -> dict[str, Any]:
        known, stable, latest = _known(custom_object)
        status = custom_object.get("status") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
        )
        return {
            "deployment": custom_object["metadata"]["name"],
            "namespace": custom_object["metadata"].get("namespace"),
            "endpoint": status.get("url"),
            "predictors": {
                name: {
                    "model_version": p["model_version"],
                    "weight": p["weight"],
                    "shadow": False,
                    "storage_uri": p["storage_uri"],
                    "healthy": ready and name in (stable, latest),
                }
                for name, p in known.items()
            },
        }

    def _predictor_names(self, custom_object: dict[str, Any]) -> list[str]:
        return list(_known(custom_object)[0])


def _known(custom_object: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], str | None, str | None]:
    annotations = custom_object["metadata"].get("annotations") or {}
    return json.loads(annotations.get(PREDICTORS, "{}")), annotations.get(STABLE), annotations.get(LATEST)


def _traffic(known: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: {"weight": p["weight"], "shadow": False} for name, p in known.items()}


def _with_weights(known: dict[str, dict[str, Any]], traffic: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {name: {**p, "weight": traffic[name]["weight"]} for name, p in known.items()}


def _refuse_shadow(traffic: dict[str, dict[str, Any]]) -> None:
    shadows = sorted(name for name, t in traffic.items() if t["shadow"])
    if shadows:
        raise ValueError(f"KServe has no shadow predictor (InferenceServices mirror no traffic): {shadows}")
