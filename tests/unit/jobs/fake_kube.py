"""A fake Kubernetes API server at urllib3's ``PoolManager.request`` level (a test helper, not a test module).

The real ``kubernetes`` client builds the requests and reads the answers (serialisation,
URLs, error handling); only the HTTP layer underneath is played here.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from typing import Any
from urllib.parse import urlparse

import urllib3

NOT_FOUND: tuple[int, Any] = (404, {"kind": "Status", "reason": "NotFound", "code": 404})


class FakeApiServer:
    """Answers each request from a table of fixed routes, and keeps every request it got."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.routes: dict[tuple[str, str], tuple[int, Any]] = {}
        self._lock = threading.Lock()  # the control plane's supervisor calls from its own thread

    def route(self, method: str, path: str, status: int, body: Any) -> None:
        self.routes[(method, path)] = (status, body)

    def respond(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        """The status and payload for one request (a str payload is sent as text/plain)."""
        return self.routes.get((method, path), NOT_FOUND)

    def request(self, method: str, url: str, **kwargs: Any) -> urllib3.HTTPResponse:
        parsed = urlparse(url)
        raw = kwargs.get("body")
        body = json.loads(raw) if raw else None
        with self._lock:
            self.requests.append((method, parsed.path + (f"?{parsed.query}" if parsed.query else ""), body))
            status, payload = self.respond(method, parsed.path, body)
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        content_type = "text/plain" if isinstance(payload, str) else "application/json"
        return urllib3.HTTPResponse(
            body=data,
            status=status,
            reason="OK" if status < 400 else "Error",
            headers={"Content-Type": content_type},
            preload_content=False,
        )


_JOBS = re.compile(r"^/apis/kubeflow\.org/v1/namespaces/(?P<ns>[^/]+)/pytorchjobs(?:/(?P<name>[^/]+))?$")
_CONFIG_MAPS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/configmaps$")
_PODS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods$")


class FakeKubeCluster(FakeApiServer):
    """An API server that keeps what it is given: PyTorchJobs (POST, GET, DELETE) and ConfigMaps.

    No operator runs: :meth:`set_condition` moves a PyTorchJob on as the training operator
    would (``status.conditions``, the last true one being where the job is). Pods are not
    modelled: the pod list is empty.
    """

    def __init__(self) -> None:
        super().__init__()
        self.jobs: dict[str, dict[str, Any]] = {}
        self.config_maps: dict[str, dict[str, Any]] = {}

    def respond(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if (m := _JOBS.match(path)) is not None:
            return self._job(method, m["ns"], m["name"], body)
        if (m := _CONFIG_MAPS.match(path)) is not None and method == "POST":
            self.config_maps[body["metadata"]["name"]] = body
            return 201, body
        if _PODS.match(path) is not None and method == "GET":
            return 200, {"kind": "PodList", "apiVersion": "v1", "items": []}
        return super().respond(method, path, body)

    def _job(self, method: str, namespace: str, name: str | None, body: Any) -> tuple[int, Any]:
        if method == "POST" and name is None:
            name = body["metadata"]["name"]
            if name in self.jobs:
                return 409, {"kind": "Status", "reason": "AlreadyExists", "code": 409}
            created = {
                **body,
                "metadata": {**body["metadata"], "namespace": namespace, "uid": str(uuid.uuid4())},
                "status": {"conditions": []},
            }
            self.jobs[name] = created
            return 201, created
        if name is None or name not in self.jobs:
            return NOT_FOUND
        if method == "GET":
            return 200, self.jobs[name]
        if method == "DELETE":
            del self.jobs[name]
            # Owned objects go with their owner (the garbage collector, Foreground propagation).
            for key in [
                k
                for k, cm in self.config_maps.items()
                if any(o.get("name") == name for o in cm["metadata"].get("ownerReferences") or [])
            ]:
                del self.config_maps[key]
            return 200, {"kind": "Status", "status": "Success"}
        return NOT_FOUND

    def set_condition(self, name: str, condition: str, message: str = "") -> None:
        """Play the training operator: ``condition`` (Created, Running, Succeeded, Failed...) becomes true."""
        with self._lock:
            conditions = self.jobs[name]["status"]["conditions"]
            if condition in ("Succeeded", "Failed"):
                for c in conditions:  # the operator marks Running false when the job ends
                    if c["type"] == "Running":
                        c["status"] = "False"
            conditions.append({"type": condition, "status": "True", "message": message})

    def deleted(self) -> list[str]:
        """Paths of every DELETE received."""
        return [path.partition("?")[0] for method, path, _ in self.requests if method == "DELETE"]


def api_client(server: FakeApiServer) -> Any:
    """A real ``kubernetes`` ``ApiClient`` whose HTTP requests go to ``server``."""
    import kubernetes

    api = kubernetes.client.ApiClient(kubernetes.client.Configuration(host="https://k8s.test"))
    api.rest_client.pool_manager = server
    return api
