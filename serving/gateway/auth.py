"""API-key authentication for the gateway: ``Authorization: Bearer <key>``.

Keys live in the control database (`registry.keys.KeyStore`, stored hashed). A verified
key is trusted for ``cache_s`` seconds so the database is not hit on every request; a
revoked key therefore stops working within that delay. Failures are never cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Protocol

from fastapi import Request

from registry.errors import AuthenticationError, PermissionDeniedError
from registry.keys import KeyRecord
from serving.gateway.catalog import Route, ServedModel

logger = logging.getLogger(__name__)

USER_ROLE = "user"


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

    async def authenticate(self, authorization: str | None) -> KeyRecord:
        """The key record for an ``Authorization`` header value.

        Raises:
            AuthenticationError: no bearer key, or the store refuses it (HTTP 401).
            PermissionDeniedError: the key lacks the ``user`` role (HTTP 403).
        """
        secret = _bearer(authorization)
        digest = hashlib.sha256(secret.encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and now - cached[0] < self.cache_s and cached[1].active():
            return cached[1]
        record = await asyncio.to_thread(self.store.verify, secret)
        if not record.has_role(USER_ROLE) and not record.has_role("admin"):
            raise PermissionDeniedError(
                f"API key {record.prefix}… has roles {', '.join(record.roles)}; calling models needs the "
                f"`{USER_ROLE}` role: create a key with `forgeline keys create --role user`",
                param="api_key",
            )
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


async def get_principal(request: Request) -> KeyRecord | None:
    """FastAPI dependency: the caller's key (None when auth is off); 401 without a valid key."""
    auth: KeyAuth | None = request.app.state.auth
    if auth is None:
        return None
    record = await auth.authenticate(request.headers.get("authorization"))
    request.state.key_id = record.id
    return record


def check_model_allowed(principal: KeyRecord | None, model: str) -> None:
    """Raise `PermissionDeniedError` (403) when the key may not use ``model``."""
    if principal is None or principal.allows_model(model):
        return
    raise PermissionDeniedError(
        f"API key {principal.prefix}… may not use model `{model}` (it allows `{principal.models}`); "
        "ask an admin for a key whose --models pattern covers it",
        param="model",
    )


def same_org(principal: KeyRecord | None, served: ServedModel) -> bool:
    """Whether ``principal`` may see ``served``: versions owned by an organisation (fine-tuned
    ones) are served to that organisation's keys only; to the others they do not exist."""
    return org_allows(principal, served.org)


def org_allows(principal: KeyRecord | None, org: str | None) -> bool:
    """Whether ``principal`` may see something owned by ``org`` (None: owned by nobody)."""
    return principal is None or org is None or principal.org == org


def may_route(principal: KeyRecord | None, route: Route) -> bool:
    """Whether ``principal`` may see both the served model and the adapter ``route`` names."""
    return same_org(principal, route.served) and org_allows(principal, route.adapter_org)


def may_use(principal: KeyRecord | None, model: str) -> bool:
    """Whether ``principal`` may use ``model`` (always, when auth is off)."""
    return principal is None or principal.allows_model(model)
