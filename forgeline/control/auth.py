"""Who may call which control-plane route: the route table and the one dependency enforcing it.

A request carries ``Authorization: Bearer fl-...`` (or ``X-API-Key: fl-...``). The key's
``name`` is the actor written to the audit log and approvals, so name keys after the
people (or services) who hold them: self-approval is detected by comparing that name with
the version's ``forgeline.trained_by`` tag.

:data:`ROUTES` declares every route's operation and resource kind; :func:`authorize` (an
app-wide dependency) applies :func:`registry.authz.decide` to it before the endpoint runs:
401 without a valid key, 403 for a missing role or a model outside the key's pattern, and
404 (the message a missing model gets) for a model another organisation owns. Untagged
models belong to the operator's ``default`` organisation (:func:`registry.authz.owner_org`).
A route missing from the table is refused (403) and fails ``create_control_app``.
"""

from __future__ import annotations

from typing import cast

from fastapi import Depends, FastAPI, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from registry.authz import (
    Kind,
    Operation,
    Outcome,
    Rule,
    Scope,
    Verdict,
    decide,
    enforce,
    model_owner,
    owner_org,
    route_keys,
    undeclared,
)
from registry.client import Registry, missing_model_message
from registry.errors import AuthenticationError, ModelNotFoundError, NotFoundError, PermissionDeniedError
from registry.keys import KeyRecord, KeyStore
from serving.gateway.auth import http_routes

_bearer = HTTPBearer(auto_error=False, description="A forgeline API key: `forgeline keys create NAME --role ...`.")

_R, _T, _P, _D, _B = Operation.READ, Operation.TRAIN, Operation.PROMOTE, Operation.DECIDE, Operation.ROLLBACK

ROUTES: dict[tuple[str, str], Rule] = {
    ("GET", "/health"): Rule(Operation.PUBLIC, Kind.NONE),
    ("GET", "/openapi.json"): Rule(Operation.PUBLIC, Kind.NONE),
    ("GET", "/docs"): Rule(Operation.PUBLIC, Kind.NONE),
    ("GET", "/docs/oauth2-redirect"): Rule(Operation.PUBLIC, Kind.NONE),
    ("GET", "/redoc"): Rule(Operation.PUBLIC, Kind.NONE),
    ("GET", "/v1/models"): Rule(_R, Kind.MODELS),
    ("GET", "/v1/models/{name}/versions"): Rule(_R, Kind.MODEL),
    ("GET", "/v1/models/{name}/versions/{version}"): Rule(_R, Kind.VERSION),
    ("GET", "/v1/models/{name}/policy"): Rule(_R, Kind.MODEL),
    ("GET", "/v1/models/{name}/versions/{version}/gates"): Rule(_R, Kind.VERSION),
    ("GET", "/v1/models/{name}/versions/{version}/approvals"): Rule(_R, Kind.VERSION),
    ("POST", "/v1/models/{name}/versions/{version}/approvals"): Rule(_D, Kind.VERSION),
    ("POST", "/v1/models/{name}/versions/{version}/promote"): Rule(_P, Kind.VERSION),
    ("POST", "/v1/models/{name}/aliases/{alias}/rollback"): Rule(_B, Kind.MODEL),
    ("GET", "/v1/models/{name}/history"): Rule(_R, Kind.MODEL),
    ("POST", "/v1/files"): Rule(_T, Kind.FILES),
    ("GET", "/v1/files"): Rule(_R, Kind.FILES),
    ("GET", "/v1/files/{file_id}"): Rule(_R, Kind.FILES),
    ("DELETE", "/v1/files/{file_id}"): Rule(_T, Kind.FILES),
    ("GET", "/v1/files/{file_id}/content"): Rule(_R, Kind.FILES),
    ("POST", "/v1/fine_tuning/jobs"): Rule(_T, Kind.JOBS),
    ("GET", "/v1/fine_tuning/jobs"): Rule(_R, Kind.JOBS),
    ("GET", "/v1/fine_tuning/jobs/{job_id}"): Rule(_R, Kind.JOBS),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel"): Rule(_T, Kind.JOBS),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/pause"): Rule(_T, Kind.JOBS),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/resume"): Rule(_T, Kind.JOBS),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/events"): Rule(_R, Kind.JOBS),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints"): Rule(_R, Kind.JOBS),
    # The web console: a session cookie instead of a bearer key; each page and action decides
    # with registry.authz.decide on the session's key (forgeline.control.console.views).
    ("GET", "/console/login"): Rule(Operation.PUBLIC, Kind.NONE),
    ("POST", "/console/login"): Rule(Operation.PUBLIC, Kind.NONE),
    **{
        (method, "/console" + path): Rule(Operation.CONSOLE, kind)
        for method, path, kind in (
            ("POST", "/logout", Kind.NONE),
            ("GET", "", Kind.MODELS),
            ("GET", "/audit", Kind.MODELS),
            ("GET", "/models/{name}", Kind.MODEL),
            ("GET", "/models/{name}/history", Kind.MODEL),
            ("GET", "/models/{name}/versions/{version}", Kind.VERSION),
            ("POST", "/models/{name}/versions/{version}/confirm", Kind.VERSION),
            ("POST", "/models/{name}/versions/{version}/decide", Kind.VERSION),
            ("POST", "/models/{name}/versions/{version}/promote", Kind.VERSION),
            ("POST", "/models/{name}/aliases/{alias}/confirm-rollback", Kind.MODEL),
            ("POST", "/models/{name}/aliases/{alias}/rollback", Kind.MODEL),
            ("GET", "/jobs", Kind.JOBS),
            ("GET", "/jobs/{job_id}", Kind.JOBS),
            ("POST", "/jobs/{job_id}/{action}", Kind.JOBS),
        )
    },
}
"""Every control-plane route -> its declared decision. Files and jobs are owned by the
caller's org through their stores, which select by ``org`` (another org's id is 404)."""


def check_declared(app: FastAPI) -> None:
    """Raise `RuntimeError` when a route of the app has no rule in :data:`ROUTES`."""
    missing = undeclared(route_keys(http_routes(app)), ROUTES)
    if missing:
        raise RuntimeError(f"control-plane routes without an authorization rule in forgeline.control.auth.ROUTES: {missing}")


def key_store(request: Request) -> KeyStore:
    """The app's key store."""
    return cast(KeyStore, request.app.state.keys)


def verified_key(request: Request, credentials: HTTPAuthorizationCredentials | None) -> KeyRecord:
    """The verified key of the request.

    Raises:
        AuthenticationError: no key, or a malformed, unknown, revoked or expired one (401).
    """
    secret = credentials.credentials if credentials is not None else request.headers.get("x-api-key")
    if not secret:
        raise AuthenticationError(
            "no API key: send `Authorization: Bearer fl-...`; create a key with `forgeline keys create NAME --role ROLE`",
            param="api_key",
        )
    return key_store(request).verify(secret)


def caller(request: Request) -> KeyRecord:
    """The key :func:`authorize` admitted for this request (endpoints depend on this)."""
    key = getattr(request.state, "key", None)
    if not isinstance(key, KeyRecord):  # only reachable on a public route, which must not ask
        raise AuthenticationError("no API key was checked for this route", param="api_key")
    return key


def rule_of(request: Request) -> Rule | None:
    """The declared rule of the route ``request`` matched (None: undeclared)."""
    route = request.scope.get("route")
    path = route.path if isinstance(route, APIRoute) else request.url.path
    return ROUTES.get((request.method, path))


def authorize(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """App-wide dependency: apply the route's rule to the caller (see the module docstring)."""
    rule = rule_of(request)
    if rule is None:
        raise PermissionDeniedError(f"{request.method} {request.url.path} has no authorization rule; refused")
    if rule.operation in (Operation.PUBLIC, Operation.CONSOLE):
        return  # the console authenticates its session cookie and decides per page itself
    key = verified_key(request, credentials)
    params = request.path_params
    name = params.get("name") if rule.kind in (Kind.MODEL, Kind.VERSION) else None
    check_access(cast(Registry, request.app.state.registry), key, rule, name, params.get("version"))
    request.state.key = key


def check_access(registry: Registry, key: KeyRecord, rule: Rule, name: str | None, version: str | None = None) -> None:
    """Apply ``rule`` to model ``name`` (and ``version``) for ``key``; the CLI uses it too.

    Raises:
        PermissionDeniedError: the key lacks the role, or its pattern misses ``name`` (403).
        ModelNotFoundError: the model is missing or another org's (404, the same message).
        NotFoundError: the version is another org's (404).
    """
    verdict = decide(key, rule, model=name)
    if verdict.allowed and name is not None:
        verdict = _owned(registry, key, rule, name, version)
    enforce(verdict, missing=lambda: ModelNotFoundError(missing_model_message(str(name)), param="model"))


def _owned(registry: Registry, key: KeyRecord, rule: Rule, name: str, version: str | None) -> Verdict:
    try:
        orgs = registry.version_orgs(name)
    except ModelNotFoundError:
        return Verdict(Outcome.HIDDEN, "no such model")
    verdict = decide(key, rule, owner=model_owner(orgs.values()))
    if verdict.allowed and version is not None and version.isdecimal() and version.isascii():
        # A version of another org's under a shared name: absent too.
        if not owns_version(key, orgs.get(int(version))):
            raise NotFoundError(f"model {name!r} has no version {int(version)}", param="version")
    return verdict


def owns_version(key: KeyRecord, tagged: str | None) -> bool:
    """Whether ``key`` may see a version of a model it may see, given the version's org tag."""
    return not tagged or decide(key, Rule(Operation.READ, Kind.VERSION), owner=tagged).allowed


def visible_models(key: KeyRecord, model_orgs: dict[str, str | None]) -> list[str]:
    """The models of ``model_orgs`` (name -> org tag) that ``key`` may see, in order."""
    rule = Rule(Operation.READ, Kind.MODELS)
    return [
        name
        for name, org in model_orgs.items()
        if decide(key, rule, model=name, owner=owner_org(org, Scope.GOVERNANCE)).allowed
    ]
