"""One Kubernetes API for the tests, on 127.0.0.1: core/v1 pods (what KubernetesPodOperator calls) and
the custom objects of the serving targets: SeldonDeployments (Seldon) and InferenceServices (KServe).

An API server with no nodes and no controllers: a created pod stays Pending and never runs, and a
custom object has no status until a test sets one (``set_status``, what the operator would do).
Writes follow the rules the clients depend on: a resourceVersion that changes on every write, 409 for
a name that exists or a patch computed from a stale resourceVersion, JSON merge patch, 404 for what is
not there, and validation against the CRD's schema when ``../shared/schemas`` has it (CI has
``../shared`` beside the checkout; a user's clone does not). The clients are the real ones: the
cncf-kubernetes provider's hook and operator, through the Airflow connection ``connection()`` gives.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

SHARED_SCHEMAS = Path(__file__).resolve().parents[3] / "shared" / "schemas"
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/(pods|events)(?:/([^/]+))?$")
# The custom objects served: plural -> (API group/version, the CRD schema's file in ../shared/schemas).
KINDS = {
    "seldondeployments": ("machinelearning.seldon.io/v1", "seldondeployment-v1.json"),
    "inferenceservices": ("serving.kserve.io/v1beta1", "inferenceservice-v1beta1.json"),
}
CUSTOM = re.compile(
    r"^/apis/("
    + "|".join(re.escape(v) for v, _ in KINDS.values())
    + r")/namespaces/([^/]+)/([a-z]+)(?:/([^/]+))?$"
)


@functools.cache
def crd_validator(plural: str = "seldondeployments") -> Any:
    """A validator of a served kind's CRD schema, or None without ../shared (building it takes
    seconds, so once per session)."""
    path = SHARED_SCHEMAS / KINDS[plural][1]
    if not path.exists():
        return None
    import jsonschema

    schema = json.loads(path.read_text())
    schema = schema.get("openAPIV3Schema", schema)  # the Seldon file wraps it, KServe's is bare
    return jsonschema.validators.validator_for(schema)(schema)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class FakeKubernetes(ThreadingHTTPServer):
    """What the API holds and what it was asked.

    ``pods``, ``objects`` (SeldonDeployments) and ``inference_services`` by ``(namespace, name)``;
    ``created``: each pod as it was posted; ``served``: ``(method, path, status)`` of every request, in
    order; ``authorizations``: the Authorization headers seen; ``conflicts_to_inject``: how many of the
    next custom object patches meet a write by someone else first.
    """

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.created: list[dict[str, Any]] = []
        self.custom: dict[str, dict[tuple[str, str], dict[str, Any]]] = {plural: {} for plural in KINDS}
        self.objects = self.custom["seldondeployments"]
        self.inference_services = self.custom["inferenceservices"]
        self.served: list[tuple[str, str, int]] = []
        self.authorizations: set[str] = set()
        self.conflicts_to_inject = 0
        self.validators = {plural: crd_validator(plural) for plural in KINDS}
        self.version = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def connection(self, token: str, namespace: str | None = None) -> str:
        """An ``AIRFLOW_CONN_*`` value of type ``kubernetes``: a kubeconfig reaching this API as ``token``."""
        context = {"cluster": "test", "user": "test", **({"namespace": namespace} if namespace else {})}
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": context}],
        }
        return json.dumps({"conn_type": "kubernetes", "extra": {"kube_config": kubeconfig}})

    def bump(self, obj: dict[str, Any]) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        obj["metadata"]["generation"] = obj["metadata"].get("generation", 0) + 1

    def set_status(
        self, namespace: str, name: str, status: dict[str, Any], plural: str = "seldondeployments"
    ) -> None:
        """What the operator (Seldon's, KServe's) does once it has reconciled a custom object."""
        with self.lock:
            obj = self.custom[plural][(namespace, name)]
            obj["status"] = status
            self.bump(obj)


@contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[ThreadingHTTPServer]:
    """``server`` answering from a thread until the block ends."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _selected(labels: dict[str, str], selector: str) -> bool:
    """Equality, inequality and absence terms of a label selector, as KubernetesPodOperator writes them."""
    for term in filter(None, selector.split(",")):
        if term.startswith("!"):
            if term[1:] in labels:
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        else:
            key, value = term.split("=", 1)
            if labels.get(key) != value:
                return False
    return True


class _Handler(BaseHTTPRequestHandler):
    server: FakeKubernetes

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("get")

    def do_POST(self) -> None:
        self._dispatch("post")

    def do_PATCH(self) -> None:
        self._dispatch("patch")

    def do_DELETE(self) -> None:
        self._dispatch("delete")

    # -- the wire ----------------------------------------------------------------------------------
    def _dispatch(self, verb: str) -> None:
        url = urlparse(self.path)
        self.server.authorizations.add(self.headers.get("Authorization", ""))
        match = PODS.match(url.path)
        if match:
            return getattr(self, f"_pod_{verb}")(*match.groups(), parse_qs(url.query))
        match = CUSTOM.match(url.path)
        if match and match.group(3) in KINDS and KINDS[match.group(3)][0] == match.group(1):
            _, namespace, plural, name = match.groups()
            return getattr(self, f"_custom_{verb}")(plural, namespace, name)
        self._status(404, "NotFound", f"no route {url.path}")

    def _answer(self, code: int, body: dict[str, Any]) -> None:
        # Recorded before answering: the client goes on at once.
        self.server.served.append((self.command, urlparse(self.path).path, code))
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message}
        self._answer(code, {**body, "reason": reason, "code": code})

    def _body(self) -> Any:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")

    # -- pods: accepted, never scheduled -------------------------------------------------------------
    def _pod_post(self, namespace: str, _kind: str, _name: None, _query: dict) -> None:
        pod = self._body()
        with self.server.lock:
            self.server.created.append(json.loads(json.dumps(pod)))
            name = pod["metadata"]["name"]
            pod["metadata"].update(namespace=namespace, uid=f"uid-{name}")
            self.server.bump(pod)
            pod["status"] = {"phase": "Pending"}  # no node, no scheduler: never PodScheduled
            self.server.pods[(namespace, name)] = pod
        self._answer(201, pod)

    def _pod_get(self, namespace: str, kind: str, name: str | None, query: dict[str, list[str]]) -> None:
        if kind == "events":
            return self._answer(200, {"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": []})
        with self.server.lock:
            if name is None:
                selector = query.get("labelSelector", [""])[0]
                items = [
                    pod
                    for (ns, _), pod in self.server.pods.items()
                    if ns == namespace and _selected(pod["metadata"].get("labels", {}), selector)
                ]
                return self._answer(
                    200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
                )
            pod = self.server.pods.get((namespace, name))
        if pod is None:
            return self._status(404, "NotFound", f'pods "{name}" not found')
        self._answer(200, pod)

    def _pod_patch(self, namespace: str, _kind: str, name: str, _query: dict) -> None:
        patch = self._body()
        with self.server.lock:
            pod = self.server.pods.get((namespace, name))
            if pod is not None:
                pod["metadata"].setdefault("labels", {}).update(patch.get("metadata", {}).get("labels", {}))
        if pod is None:
            return self._status(404, "NotFound", f'pods "{name}" not found')
        self._answer(200, pod)

    def _pod_delete(self, namespace: str, _kind: str, name: str, _query: dict) -> None:
        with self.server.lock:
            pod = self.server.pods.pop((namespace, name), None)
        if pod is None:
            return self._status(404, "NotFound", f'pods "{name}" not found')
        self._answer(200, pod)

    # -- custom objects (SeldonDeployments, InferenceServices) ----------------------------------------
    def _invalid(self, plural: str, obj: dict[str, Any]) -> str | None:
        validator = self.server.validators[plural]
        if validator is None:
            return None
        error = next(iter(validator.iter_errors(obj)), None)
        return error and f"{error.message} (at {'.'.join(map(str, error.absolute_path))})"

    def _custom_post(self, plural: str, namespace: str, _name: None) -> None:
        obj = self._body()
        name = obj["metadata"]["name"]
        with self.server.lock:
            if (namespace, name) in self.server.custom[plural]:
                return self._status(409, "AlreadyExists", f'{plural} "{name}" already exists')
            problem = self._invalid(plural, obj)
            if problem:
                return self._status(422, "Invalid", problem)
            obj["metadata"].update(namespace=namespace, uid=f"uid-{name}")
            self.server.bump(obj)
            self.server.custom[plural][(namespace, name)] = obj
            self._answer(201, obj)

    def _custom_get(self, plural: str, namespace: str, name: str | None) -> None:
        with self.server.lock:
            obj = self.server.custom[plural].get((namespace, name or ""))
            if obj is None:
                return self._status(404, "NotFound", f'{plural} "{name}" not found')
            self._answer(200, obj)

    def _custom_patch(self, plural: str, namespace: str, name: str) -> None:
        if self.headers.get("Content-Type") != "application/merge-patch+json":
            return self._status(415, "UnsupportedMediaType", self.headers.get("Content-Type", ""))
        patch = self._body()
        with self.server.lock:
            obj = self.server.custom[plural].get((namespace, name))
            if obj is None:
                return self._status(404, "NotFound", f'{plural} "{name}" not found')
            if self.server.conflicts_to_inject:
                self.server.conflicts_to_inject -= 1
                self.server.bump(obj)  # another writer got there first
            wanted = (patch.get("metadata") or {}).get("resourceVersion")
            if wanted and wanted != obj["metadata"]["resourceVersion"]:
                return self._status(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes "
                    "to the latest version and try again",
                )
            updated = merge_patch(obj, patch)
            problem = self._invalid(plural, updated)
            if problem:
                return self._status(422, "Invalid", problem)
            self.server.bump(updated)
            self.server.custom[plural][(namespace, name)] = updated
            self._answer(200, updated)

    def _custom_delete(self, plural: str, namespace: str, name: str) -> None:
        with self.server.lock:
            if self.server.custom[plural].pop((namespace, name), None) is None:
                return self._status(404, "NotFound", f'{plural} "{name}" not found')
            self._answer(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
