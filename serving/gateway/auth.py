"""API-key authentication and the route table of the gateway: ``Authorization: Bearer <key>``.

Every route is declared in :data:`ROUTES`; the decision itself is :func:`registry.authz.decide`,
shared with the control plane. Untagged (operator) models are served to every organisation's
keys; an org-tagged version, or an adapter, only to its organisation's, and to the others it
does not exist (404, as an unknown model).

Keys live in the control database (`registry.keys.KeyStore`, stored hashed). A verified
key is trusted for ``cache_s`` seconds so the database is not hit on every request; a
revoked key therefore stops working within that delay. Failures are never cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from functools import partial
from typing import Protocol

import fastapi.routing
from fastapi import FastAPI, Request
from fastapi.routing import APIRoute

from registry.authz import Kind, Operation, Rule, Scope, decide, enforce, owner_org, route_keys, undeclared
from registry.errors import AuthenticationError, PermissionDeniedError
from registry.keys import KeyRecord
from serving import telemetry
from serving.gateway.catalog import Route, ServedModel

logger = logging.getLogger(__name__)

INFER = Rule(Operation.INFER, Kind.SERVED)
"""What every model route does: call (or list) served models."""

ROUTES: dict[tuple[str, str], Rule] = {
    ("GET", "/health"): Rule(Operation.PUBLIC, Kind.NONE),
    ("GET", "/ready"): Rule(Operation.PUBLIC, Kind.NONE),
    ("GET", "/metrics"): Rule(Operation.PUBLIC, Kind.NONE),
    ("GET", "/openapi.json"): Rule(Operation.PUBLIC, Kind.NONE),
    ("GET", "/docs"): Rule(Operation.PUBLIC, Kind.NONE),
    ("GET", "/docs/oauth2-redirect"): Rule(Operation.PUBLIC, Kind.NONE),
    ("GET", "/redoc"): Rule(Operation.PUBLIC, Kind.NONE),
    ("GET", "/v1/models"): INFER,
    ("GET", "/v1/models/{model:path}"): INFER,
    ("POST", "/v1/chat/completions"): INFER,
    ("POST", "/v1/completions"): INFER,
}
"""Every gateway route -> its declared decision (see :mod:`registry.authz`)."""


class KeyVerifier(Protocol):
    """What the gateway needs of a key store (`registry.keys.KeyStore` is one)."""

    def verify(self, secret: str) -> KeyRecord:
        """The key's record; raises `AuthenticationError` for unknown, revoked or expired keys."""
        ...


class KeyAuth:
    """Verifies bearer keys against a store, with a short cache of successes.

    Args:
        store: the key store (blocking; called off the event loop).
        cache_s: seconds a verified key is trusted before it is checked again.
    """

    def __init__(self, store: KeyVerifier, *, cache_s: float = 2.0) -> None:
        self.store = store
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, KeyRecord]] = {}
        self._verifying: dict[str, asyncio.Future[KeyRecord]] = {}

    async def authenticate(self, authorization: str | None) -> KeyRecord:
        """The key record for an ``Authorization`` header value.

        Raises:
            AuthenticationError: no bearer key, or the store refuses it (HTTP 401). Roles are
                the route rule's business (:func:`get_principal`).
        """
        secret = _bearer(authorization)
        digest = hashlib.sha256(secret.encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and now - cached[0] < self.cache_s and cached[1].active():
            return cached[1]
        # One lookup per key at a time: when a busy key's entry expires, every request in flight
        # misses together, and each lookup in its own thread made N store queries and a GIL
        # contest between them (at concurrency 64, 64 queries every `cache_s`).
        verifying = self._verifying.get(digest)
        # (A lookup left behind by an event loop that closed mid-way is not awaited from another.)
        if verifying is None or verifying.get_loop() is not asyncio.get_running_loop():
            verifying = self._verifying[digest] = asyncio.ensure_future(self._verify(digest, secret, now))
            verifying.add_done_callback(partial(self._verified, digest))
        return await asyncio.shield(verifying)  # a waiter that leaves does not cancel the others' lookup

    def _verified(self, digest: str, done: asyncio.Future[KeyRecord]) -> None:
        self._verifying.pop(digest, None)
        if not done.cancelled():
            done.exception()  # retrieved, so a refusal that every waiter left before is not logged as lost

    async def _verify(self, digest: str, secret: str, now: float) -> KeyRecord:
        record = await asyncio.to_thread(self.store.verify, secret)
        if self.cache_s > 0:
            if len(self._cache) > 10_000:
                self._cache.clear()  # bounded; a refill costs one lookup per key
            self._cache[digest] = (now, record)
        return record


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise AuthenticationError(
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). Create one with `forgeline keys create`.",
            param="api_key",
        )
    scheme, _, secret = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise AuthenticationError(
            "The Authorization header must be `Bearer YOUR_KEY`.",
            param="api_key",
        )
    return secret.strip()


def http_routes(app: FastAPI) -> list[object]:
    """Every route an app serves, those of included routers too (FastAPI >= 0.160 keeps
    included routers unflattened in ``app.routes``; ``iter_route_contexts`` walks them),
    and those a middleware answers before the router (`serving.gateway.fast_chat`: it
    declares its ``path`` and ``methods`` as a route does)."""
    walk = getattr(fastapi.routing, "iter_route_contexts", None)
    routes = list(walk(app.routes)) if walk is not None else list(app.routes)
    return routes + [m.cls for m in app.user_middleware if isinstance(getattr(m.cls, "path", None), str)]


def check_declared(app: FastAPI) -> None:
    """Raise `RuntimeError` when a route of the app has no rule in :data:`ROUTES`."""
    missing = undeclared(route_keys(http_routes(app)), ROUTES)
    if missing:
        raise RuntimeError(f"gateway routes without an authorization rule in serving.gateway.auth.ROUTES: {missing}")


async def get_principal(request: Request) -> KeyRecord | None:
    """FastAPI dependency of every non-public route: the caller's key (None when auth is off).

    Applies the route's declared rule: 401 without a valid key, 403 without the ``user``
    role (or ``admin``); an undeclared route is refused (403).
    """
    route = request.scope.get("route")
    rule = ROUTES.get((request.method, route.path if isinstance(route, APIRoute) else request.url.path))
    if rule is None:
        raise PermissionDeniedError(f"{request.method} {request.url.path} has no authorization rule; refused")
    auth: KeyAuth | None = request.app.state.auth
    if auth is None or rule.operation is Operation.PUBLIC:
        return None
    with telemetry.span("gateway.auth"):
        record = await auth.authenticate(request.headers.get("authorization"))
    enforce(decide(record, rule), missing=lambda: PermissionDeniedError("refused", param="api_key"))
    request.scope.setdefault("state", {})["key_id"] = record.id  # request.state.key_id, without its wrapper
    return record


def check_model_allowed(principal: KeyRecord | None, model: str) -> None:
    """Raise `PermissionDeniedError` (403) when the key's pattern does not cover ``model``,
    the name the client sent (decided from the name alone: it says nothing about existence)."""
    verdict = decide(principal, INFER, model=model)
    if not verdict.allowed:
        raise PermissionDeniedError(
            f"API key {principal.prefix if principal else '?'}… may not use model `{model}` (it allows "
            f"`{principal.models if principal else ''}`); ask an admin for a key whose --models pattern covers it",
            param="model",
        )


def may_see(principal: KeyRecord | None, served: ServedModel, name: str | None = None) -> bool:
    """Whether ``principal`` may see ``served`` (under ``name``, when given: its pattern must
    cover it). Versions owned by an organisation (fine-tuned ones) are served to that
    organisation's keys only; untagged operator models to every key."""
    return decide(principal, INFER, model=name, owner=owner_org(served.org, Scope.SERVING)).allowed


def may_route(principal: KeyRecord | None, route: Route) -> bool:
    """Whether ``principal`` may run what ``route`` runs: the served model, and the adapter
    (its org, and the registered model it is a version of, which the key's pattern must
    cover: ``tiny:quickstart`` runs ``quickstart``'s weights)."""
    adapter_models = (route.adapter_model,) if route.adapter_model else ()
    return may_see(principal, route.served) and decide(
        principal, INFER, owner=owner_org(route.adapter_org, Scope.SERVING), looked_up=adapter_models
    ).allowed
