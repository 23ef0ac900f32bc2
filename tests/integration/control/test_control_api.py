"""The control-plane HTTP API on a real uvicorn server, with real API keys: approvals
(self-approval refused, approver role required, a rejection blocks), promotion, rollback
and history, on SQLite and on PostgreSQL + a real ``mlflow server``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from forgeline.control import create_control_app
from registry.client import Registry
from registry.keys import KeyStore
from registry.policy import PolicyBook
from serving.gateway.server import serve_in_background
from tests.support.backends import TRAINER, Backend, trained_version, unique_name

pytestmark = pytest.mark.integration

POLICIES = PolicyBook.model_validate(
    {"default": {"thresholds": {"accuracy": {"min": 0.8}}, "approvals": {"count": 2, "roles": ["approver"]}}}
)


@dataclass
class Plane:
    url: str
    registry: Registry
    keys: KeyStore
    secrets: dict[str, str]

    def call(self, method: str, path: str, who: str | None, **kwargs: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.secrets[who]}"} if who else {}
        return httpx.request(method, self.url + path, headers=headers, timeout=60, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def plane(backend: Backend) -> Iterator[Plane]:
    registry = Registry()
    keys = KeyStore()  # the same control database, from FORGELINE_DB_URL
    secrets = {
        TRAINER: keys.create(TRAINER, roles=("trainer", "approver"))[0],  # trains *and* approves others' work
        "ana": keys.create("ana", roles=("approver",))[0],
        "bo": keys.create("bo", roles=("approver", "user"))[0],
        "root": keys.create("root", roles=("admin",))[0],
        "uma": keys.create("uma", roles=("user",))[0],
        "scoped": keys.create("scoped", roles=("approver",), models="other-*")[0],
    }
    revoked_secret, revoked = keys.create("gone", roles=("admin",))
    keys.revoke(revoked.id)
    secrets["gone"] = revoked_secret
    secrets["expired"] = keys.create("old", roles=("admin",), expires_at=datetime.now(UTC) - timedelta(seconds=1))[0]
    app = create_control_app(registry=registry, keys=keys, policies=POLICIES)
    url, stop = serve_in_background(app)
    try:
        yield Plane(url, registry, keys, secrets)
    finally:
        stop()
        registry.close()
        keys.dispose()


def error(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


def test_approve_promote_rollback_history_over_http(plane: Plane) -> None:
    name = unique_name()
    trained_version(plane.registry, name, accuracy=0.9)  # trained by TRAINER
    trained_version(plane.registry, name, accuracy=0.92)
    versions = f"/v1/models/{name}/versions"

    # Authentication: no key, unknown, revoked and expired keys are 401 in the OpenAI error shape.
    for who in (None, "gone", "expired"):
        response = plane.call("GET", "/v1/models", who)
        assert response.status_code == 401 and error(response)["code"] == "invalid_api_key", response.text
    bogus = httpx.get(plane.url + "/v1/models", headers={"Authorization": "Bearer fl-" + "x" * 43}, timeout=30)
    assert bogus.status_code == 401
    assert name in plane.call("GET", "/v1/models", "uma").json()["models"]
    assert name not in plane.call("GET", "/v1/models", "scoped").json()["models"]

    # Not yet approved: the promotion is refused and every gate is reported.
    refused = plane.call("POST", f"{versions}/1/promote", TRAINER, json={"reason": "ship it"})
    assert refused.status_code == 409 and error(refused)["code"] == "policy_refused"
    gates = {g["name"]: g["passed"] for g in error(refused)["policy_result"]["gates"]}
    assert gates == {"threshold:accuracy": True, "approvals": False}

    # Who may decide.
    comment = {"decision": "approve", "comment": "eval set and outputs reviewed"}
    user = plane.call("POST", f"{versions}/1/approvals", "uma", json=comment)
    assert user.status_code == 403 and "needs one of: approver" in error(user)["message"]
    own = plane.call("POST", f"{versions}/1/approvals", TRAINER, json=comment)
    assert own.status_code == 403 and "no self-approval" in error(own)["message"]
    scoped = plane.call("POST", f"{versions}/1/approvals", "scoped", json=comment)
    assert scoped.status_code == 403 and "other-*" in error(scoped)["message"]
    no_comment = plane.call("POST", f"{versions}/1/approvals", "ana", json={"decision": "approve"})
    assert no_comment.status_code == 400 and error(no_comment)["param"] == "comment"

    ana = plane.call("POST", f"{versions}/1/approvals", "ana", json=comment)
    assert ana.status_code == 201 and ana.json()["approver"] == "ana" and ana.json()["role"] == "approver"
    reject = plane.call("POST", f"{versions}/1/approvals", "bo", json={"decision": "reject", "comment": "leaks PII"})
    assert reject.status_code == 201
    blocked = plane.call("POST", f"{versions}/1/promote", TRAINER, json={})
    assert blocked.status_code == 409 and "rejected by bo" in error(blocked)["message"]
    assert plane.call("GET", f"{versions}/1", "uma").json()["state"] == "rejected"

    assert plane.call("POST", f"{versions}/1/approvals", "bo", json=comment).status_code == 201
    dry_run = plane.call("GET", f"{versions}/1/gates", "uma").json()
    assert dry_run["passed"] and "(ana, bo)" in dry_run["gates"][-1]["detail"]
    promoted = plane.call("POST", f"{versions}/1/promote", TRAINER, json={"reason": "first release"})
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["audit"]["actor"] == TRAINER and promoted.json()["audit"]["to_version"] == 1

    # Version 2 (approved by ana and the admin), promoted; then rolled back.
    for who in ("ana", "root"):
        assert plane.call("POST", f"{versions}/2/approvals", who, json=comment).status_code == 201
    assert plane.call("POST", f"{versions}/2/promote", "ana", json={}).status_code == 200
    detail = plane.call("GET", f"{versions}/2", "uma").json()
    assert detail["state"] == "production" and [d["approver"] for d in detail["decisions"]] == ["ana", "root"]

    rollback = f"/v1/models/{name}/aliases/production/rollback"
    denied = plane.call("POST", rollback, "uma", json={"reason": "bad"})
    assert denied.status_code == 403
    rolled = plane.call("POST", rollback, "bo", json={"reason": "bad answers"})
    assert rolled.status_code == 200 and (rolled.json()["from_version"], rolled.json()["to_version"]) == (2, 1)

    history = plane.call("GET", f"/v1/models/{name}/history", "uma").json()
    assert [(e["action"], e["from_version"], e["to_version"], e["actor"]) for e in history["entries"]] == [
        ("promote", None, 1, TRAINER),
        ("promote", 1, 2, "ana"),
        ("rollback", 2, 1, "bo"),
    ]
    assert history["aliases"] == {"production": 1}
    assert plane.registry.resolve(name).version == 1 and plane.registry.audit_drift(name) == {}

    missing = plane.call("GET", "/v1/models/no-such-model/history", "uma")
    assert missing.status_code == 404 and error(missing)["code"] == "model_not_found"
