"""The auth matrix: every route of both apps × every kind of credential, from the route tables.

Both apps are built in-process (``TestClient``) on a real SQLite MLflow registry and control
database. Each route's expected answer follows from the operation its table declares and
the spec below (not from ``registry.authz`` itself): no key, a malformed, unknown, revoked
or expired key is 401; a key without the role is 403; a key whose pattern misses the named
model is 403; a key of another organisation gets 404 for org A's resources, with the very
body a missing one gets; everyone else gets past authorization. A route missing from a
table fails here, and already when the app is built.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from forgeline.control import auth as control_auth
from forgeline.control import create_control_app
from registry import lineage
from registry.audit import AuditLog
from registry.authz import Kind, Operation, route_keys
from registry.client import Registry
from registry.keys import KeyStore
from serving.adapter_routes import AdapterRoutes
from serving.engine.base import Chunk, SamplingParams
from serving.gateway import auth as gateway_auth
from serving.gateway.app import ServedModel, StaticCatalog, create_app
from serving.gateway.auth import http_routes
from serving.gateway.catalog import Route

# What each operation admits, stated here independently of registry.authz.ROLES_FOR.
SPEC_ROLES: dict[Operation, set[str]] = {
    Operation.READ: {"trainer", "approver", "user", "admin"},
    Operation.TRAIN: {"trainer", "admin"},
    Operation.PROMOTE: {"trainer", "approver", "admin"},
    Operation.DECIDE: {"approver", "admin"},
    Operation.ROLLBACK: {"approver", "admin"},
    Operation.INFER: {"user", "admin"},
}
UNAUTHENTICATED = ("none", "malformed", "unknown", "revoked", "expired")
ROLES = ("trainer", "approver", "user", "admin")
CREDENTIALS = (*UNAUTHENTICATED, *ROLES, "other_org", "pattern_miss")
ORG = "acme"
MODEL = "acme-model"  # org A's fine-tuned model (tagged)
BASE_DIR = "/bases/tiny"
CHAT_LINE = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@dataclass
class World:
    registry: Registry
    keys: KeyStore
    headers: dict[str, dict[str, str]]
    records: dict[str, Any]
    root: Path


def _key_headers(keys: KeyStore, names: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, str]], dict[str, Any]]:
    headers: dict[str, dict[str, str]] = {
        "none": {},
        "malformed": {"Authorization": "Basic not-a-bearer-key"},
        "unknown": {"Authorization": "Bearer fl-" + "x" * 43},
    }
    records: dict[str, Any] = {}
    for credential, options in names.items():
        secret, record = keys.create(credential, **options)
        headers[credential] = {"Authorization": f"Bearer {secret}"}
        records[credential] = record
    keys.revoke(records["revoked"].id)
    return headers, records


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("auth-matrix")
    with pytest.MonkeyPatch.context() as mp:
        # Module-scoped: the per-test $FORGELINE_HOME does not exist yet, so give this one its own.
        mp.setenv("FORGELINE_HOME", str(root / "home"))
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "FORGELINE_DB_URL", "FORGELINE_WEBHOOK_URLS"):
            mp.delenv(var, raising=False)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        MlflowClient(tracking_uri=uri).search_experiments()  # migrate the schema once
        control_url = f"sqlite:///{root / 'control.db'}"
        registry = Registry(tracking_uri=uri, audit=AuditLog(control_url))
        keys = KeyStore(control_url)
        source = root / "weights"
        source.mkdir()
        # Org A's fine-tuned model, an operator model (untagged: the operator's `default` org),
        # and two LoRA versions on the served tiny base: the operator's and org A's.
        lora = {lineage.ADAPTER: "lora", lineage.BASE_MODEL: BASE_DIR, lineage.TRAINED_BY: "tom"}
        registry.create_version(MODEL, source=str(source), run_id=None, tags={**lora, lineage.ORG: ORG})
        registry.create_version("quickstart", source=str(source), run_id=None, tags=lora)
        registry.create_version("ft-acme-support", source=str(source), run_id=None, tags={**lora, lineage.ORG: ORG})
        for name in (MODEL, "quickstart", "ft-acme-support"):
            registry.move_alias(name, "production", 1, actor="tom", reason="first")
        expired = datetime.now(UTC) - timedelta(seconds=1)
        headers, records = _key_headers(
            keys,
            {
                **{role: {"roles": (role,), "org": ORG} for role in ROLES},
                "revoked": {"roles": ("admin",), "org": ORG},
                "expired": {"roles": ("admin",), "org": ORG, "expires_at": expired},
                "other_org": {"roles": ROLES, "org": "beta"},  # every role: the org alone must refuse
                "pattern_miss": {"roles": ROLES, "org": ORG, "models": "tiny*"},
            },
        )
        try:
            yield World(registry, keys, headers, records, root)
        finally:
            keys.dispose()
            registry.close()


# ------------------------------------------------------------------------------------ control plane


@pytest.fixture(scope="module")
def control(world: World) -> Iterator[TestClient]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGELINE_HOME", str(world.root / "home"))
        app = create_control_app(registry=world.registry, keys=world.keys, supervise=False)
        with TestClient(app) as client:
            yield client


def _upload(client: TestClient, credential: str, world: World) -> Any:
    payload = io.BytesIO((json.dumps(CHAT_LINE) + "\n").encode() * 3)
    return client.post(
        "/v1/files", headers=world.headers[credential], files={"file": ("t.jsonl", payload)}, data={"purpose": "fine-tune"}
    )


def _control_request(client: TestClient, world: World, method: str, path: str, credential: str,
                     name: str = MODEL, file_id: str = "file-nope") -> Any:
    url = path.format(name=name, version=1, alias="production", file_id=file_id, job_id="ftjob-matrix")
    body: dict[str, Any] | None = None
    if path.endswith("/approvals") and method == "POST":
        body = {"decision": "approve", "comment": "reviewed"}
    elif path.endswith("/promote") or path.endswith("/rollback"):
        body = {"alias": "staging", "reason": "matrix"} if path.endswith("/promote") else {"reason": "matrix"}
    elif path == "/v1/fine_tuning/jobs" and method == "POST":
        body = {"model": "none", "training_file": "file-none"}
    if path == "/v1/files" and method == "POST":
        return _upload(client, credential, world)
    return client.request(method, url, headers=world.headers[credential], json=body)


def _expected(operation: Operation, kind: Kind, credential: str, addressed: bool = True) -> str:
    """Past authorization (``"pass"``), or the status the spec demands. ``addressed``: the
    route names one resource of org A (not a collection, which is filtered to the caller's org)."""
    if operation is Operation.PUBLIC:
        return "200"
    if credential in UNAUTHENTICATED:
        return "401"
    if credential in ROLES and credential not in SPEC_ROLES[operation]:
        return "403"
    if credential == "pattern_miss" and kind in (Kind.MODEL, Kind.VERSION, Kind.SERVED) and addressed:
        return "403"
    if credential == "other_org" and addressed:
        return "404"
    return "pass"


def _check(response: Any, expected: str, where: str) -> None:
    status = response.status_code
    if expected == "pass":
        assert status not in (401, 403), f"{where}: refused an authorized caller: {status} {response.text[:300]}"
    else:
        assert status == int(expected), f"{where}: expected {expected}, got {status} {response.text[:300]}"
    if status >= 400:
        assert set(response.json()) == {"error"}, f"{where}: not an OpenAI error body: {response.text[:300]}"


def test_every_control_route_is_declared(control: TestClient) -> None:
    routes = route_keys(http_routes(control.app))  # type: ignore[arg-type]
    assert routes and all(route in control_auth.ROUTES for route in routes), set(routes) - set(control_auth.ROUTES)
    assert not set(control_auth.ROUTES) - set(routes), "the table declares routes the app does not have"


def test_control_plane_matrix(control: TestClient, world: World) -> None:
    cells = unauthorized_2xx = 0
    for method, path in route_keys(http_routes(control.app)):  # type: ignore[arg-type]
        rule = control_auth.ROUTES[(method, path)]
        if path.startswith("/console"):
            # The console ignores bearer keys: without its session cookie every page sends the
            # caller to the login page and every form is refused (its own session matrix is in
            # tests/integration/control/test_console.py).
            for credential in CREDENTIALS:
                url = path.format(name=MODEL, version=1, alias="production", job_id="ftjob-matrix", action="cancel")
                response = control.request(method, url, headers=world.headers[credential], follow_redirects=False)
                if path == "/console/login" and method == "GET":
                    assert response.status_code == 200, (path, credential)  # the login form itself
                elif method == "GET":
                    assert response.status_code == 303 and "/console/login" in response.headers["location"], (path, credential)
                else:  # forms, and a login without a valid key in its form
                    assert response.status_code == 401, (path, credential, response.status_code)
                cells += 1
            continue
        for credential in CREDENTIALS:
            # A fresh file of org A for every cell: an allowed DELETE must not empty the next one.
            file_id = _upload(control, "trainer", world).json()["id"] if "{file_id}" in path else "file-nope"
            response = _control_request(control, world, method, path, credential, file_id=file_id)
            expected = _expected(rule.operation, rule.kind, credential, addressed="{" in path)
            _check(response, expected, f"{method} {path} as {credential}")
            cells += 1
            unauthorized_2xx += expected not in ("pass", "200") and response.status_code < 300
            if expected == "404" and rule.kind in (Kind.MODEL, Kind.VERSION):
                # Another org's model answers exactly like a model that does not exist.
                missing = _control_request(control, world, method, path, credential, name="no-such-model")
                assert missing.status_code == 404
                assert response.json() == json.loads(missing.text.replace("no-such-model", MODEL)), (path, response.text)
            if expected == "404" and "{file_id}" in path:
                # Another org's file answers exactly like a file that does not exist.
                missing = _control_request(control, world, method, path, credential, file_id="file-nope")
                assert response.json() == json.loads(missing.text.replace("file-nope", file_id)), response.text
    print(f"control-plane auth matrix: {cells} cells, {unauthorized_2xx} unauthorized 2xx")
    assert unauthorized_2xx == 0 and cells >= 25 * len(CREDENTIALS)


def test_lists_hold_only_the_callers_org(control: TestClient, world: World) -> None:
    def models(credential: str) -> list[str]:
        response = control.get("/v1/models", headers=world.headers[credential])
        assert response.status_code == 200
        return response.json()["models"]

    assert set(models("user")) == {MODEL, "ft-acme-support"}  # org A's own; untagged ones are `default`'s
    assert models("other_org") == [] and models("pattern_miss") == []
    ours = _upload(control, "trainer", world).json()["id"]

    def files(credential: str) -> set[str]:
        return {f["id"] for f in control.get("/v1/files", headers=world.headers[credential]).json()["data"]}

    assert ours in files("user") and ours not in files("other_org")


def test_other_org_cannot_promote_approve_or_roll_back(control: TestClient, world: World) -> None:
    """Org B's trainer promoted org A's model (200) and B's approvals counted in A's gate."""
    versions = f"/v1/models/{MODEL}/versions/1"
    for path, body in ((f"{versions}/promote", {"alias": "canary", "reason": "b"}),
                       (f"{versions}/approvals", {"decision": "approve", "comment": "b"}),
                       (f"{versions}/approvals", {"decision": "reject", "comment": "b"}),
                       (f"/v1/models/{MODEL}/aliases/production/rollback", {"reason": "b"}),
                       (f"/v1/models/{MODEL}/history", None), (f"{versions}/gates", None), (f"/v1/models/{MODEL}/versions", None)):
        response = control.request("POST" if body else "GET", path, headers=world.headers["other_org"], json=body)
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found", (path, response.text)
    assert all(d.approver != "other_org" for d in world.registry.decisions(MODEL, 1))
    assert world.registry.alias_holder(MODEL, "canary") is None
    assert all(e.actor != "other_org" for e in world.registry.alias_history(MODEL))


def test_not_found_names_only_what_was_asked(control: TestClient, world: World) -> None:
    response = control.get("/v1/models/nope/history", headers=world.headers["admin"])
    message = response.json()["error"]["message"]
    assert response.status_code == 404 and "'nope'" in message
    assert MODEL not in message and "quickstart" not in message and "ft-acme-support" not in message


# ------------------------------------------------------------------------------------ gateway


class EchoEngine:
    """Answers every prompt with one fixed chunk; records the adapter it ran."""

    model_id = "echo"
    reports_logprobs = False
    serves_adapters = True
    step_listener = None
    ready = True

    def __init__(self) -> None:
        self.adapters: list[str | None] = []

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def render_chat(self, messages: list[dict[str, str]], adapter: str | None = None) -> str:
        return " ".join(m["content"] for m in messages)

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stats(self) -> None:
        return None

    async def generate(self, prompt: str, params: SamplingParams, *, adapter: str | None = None) -> AsyncIterator[Chunk]:
        self.adapters.append(adapter)
        yield Chunk(text="ok", token_ids=[1], finish_reason="stop")


class AdapterCatalog(StaticCatalog):
    """Static served models, with registry LoRA versions routed onto them (as `RegistryCatalog` does)."""

    def __init__(self, models: list[ServedModel], adapters: AdapterRoutes) -> None:
        super().__init__(models)
        self.adapters = adapters

    def _routes(self) -> dict[str, ServedModel]:
        return {name: served for served in self.list() for name in served.names}

    async def prepare(self, model: str) -> None:
        await self.adapters.prepare(model, self._routes())

    def route(self, model: str) -> Route:
        return self.adapters.route(model, self._routes())


@pytest.fixture(scope="module")
def gateway(world: World) -> Iterator[tuple[TestClient, EchoEngine]]:
    engine = EchoEngine()
    served = [
        ServedModel(name="tiny", version="1", engine=engine, base_model=BASE_DIR),  # operator base: every org
        ServedModel(name=MODEL, version="1", engine=engine, org=ORG),  # org A's
    ]
    catalog = AdapterCatalog(served, AdapterRoutes(world.registry, ttl_s=60))
    app = create_app(catalog, keys=world.keys, key_cache_s=0)
    with TestClient(app) as client:
        yield client, engine


def _gateway_request(client: TestClient, world: World, method: str, path: str, credential: str, model: str = MODEL) -> Any:
    headers = world.headers[credential]
    if path == "/v1/chat/completions":
        return client.post(path, headers=headers, json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    if path == "/v1/completions":
        return client.post(path, headers=headers, json={"model": model, "prompt": "hi", "max_tokens": 4})
    return client.request(method, path.replace("{model:path}", model), headers=headers)


def test_every_gateway_route_is_declared(gateway: tuple[TestClient, EchoEngine]) -> None:
    routes = route_keys(http_routes(gateway[0].app))  # type: ignore[arg-type]
    assert routes and all(route in gateway_auth.ROUTES for route in routes), set(routes) - set(gateway_auth.ROUTES)


def test_gateway_matrix(gateway: tuple[TestClient, EchoEngine], world: World) -> None:
    client, _ = gateway
    cells = unauthorized_2xx = 0
    for method, path in route_keys(http_routes(client.app)):  # type: ignore[arg-type]
        rule = gateway_auth.ROUTES[(method, path)]
        for credential in CREDENTIALS:
            response = _gateway_request(client, world, method, path, credential)
            expected = _expected(rule.operation, rule.kind, credential, addressed=path != "/v1/models")
            _check(response, expected, f"{method} {path} as {credential}")
            cells += 1
            unauthorized_2xx += expected not in ("pass", "200") and response.status_code < 300
            if expected == "404":
                missing = _gateway_request(client, world, method, path, credential, model="no-such-model")
                assert response.json() == json.loads(missing.text.replace("no-such-model", MODEL))
    print(f"gateway auth matrix: {cells} cells, {unauthorized_2xx} unauthorized 2xx")
    assert unauthorized_2xx == 0 and cells >= 11 * len(CREDENTIALS)

    def listed(credential: str) -> set[str]:
        return {card["id"] for card in client.get("/v1/models", headers=world.headers[credential]).json()["data"]}

    assert listed("user") == {"tiny", MODEL} and listed("other_org") == {"tiny"} and listed("pattern_miss") == {"tiny"}


@pytest.mark.parametrize(
    ("credential", "model", "status"),
    [
        ("pattern_miss", "tiny:quickstart", 404),  # was 200: `tiny*` ran quickstart's weights
        ("pattern_miss", "tiny:ft-acme-support", 404),
        ("pattern_miss", "quickstart", 403),  # named outright: refused by the pattern
        ("other_org", "tiny:ft-acme-support", 404),  # org A's adapter does not exist for org B
        ("other_org", "ft-acme-support", 404),
        ("other_org", "tiny:quickstart", 200),  # an operator adapter: every org's
        ("user", "tiny:ft-acme-support", 200),
        ("user", "ft-acme-support", 200),
    ],
)
def test_adapters_are_checked_like_the_models_they_are(
    gateway: tuple[TestClient, EchoEngine], world: World, credential: str, model: str, status: int
) -> None:
    client, engine = gateway
    before = len(engine.adapters)
    response = _gateway_request(client, world, "POST", "/v1/chat/completions", credential, model=model)
    assert response.status_code == status, response.text
    assert (len(engine.adapters) > before) == (status == 200)  # refused requests never reach the engine
    retrieved = client.get(f"/v1/models/{model}", headers=world.headers[credential])
    assert retrieved.status_code == status, retrieved.text


def test_a_version_of_another_org_under_a_shared_name_is_absent(control: TestClient, world: World) -> None:
    # `ft-<org>-…` names of two orgs can collide (org slugs drop case and punctuation).
    for org in (ORG, "beta"):
        world.registry.create_version("ft-shared", source=str(world.root / "weights"), run_id=None, tags={lineage.ORG: org})
    listed = control.get("/v1/models/ft-shared/versions", headers=world.headers["user"])
    assert [v["version"] for v in listed.json()["versions"]] == [1]
    theirs = control.get("/v1/models/ft-shared/versions/2", headers=world.headers["user"])
    assert theirs.status_code == 404 and theirs.json()["error"]["param"] == "version"
    assert control.get("/v1/models/ft-shared/versions", headers=world.headers["other_org"]).status_code == 404
