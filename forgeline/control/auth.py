"""API-key authentication and role checks for the control plane.

A request carries ``Authorization: Bearer fl-...`` (or ``X-API-Key: fl-...``). The key's
``name`` is the actor written to the audit log and approvals, so name keys after the
people (or services) who hold them: self-approval is detected by comparing that name with
the version's ``forgeline.trained_by`` tag. ``admin`` passes every role check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from registry.errors import AuthenticationError, PermissionDeniedError
from registry.keys import KeyRecord, KeyStore

_bearer = HTTPBearer(auto_error=False, description="A forgeline API key: `forgeline keys create NAME --role ...`.")


def key_store(request: Request) -> KeyStore:
    """The app's key store."""
    return cast(KeyStore, request.app.state.keys)


def caller(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> KeyRecord:
    """The verified key of the request.

    Raises:
        AuthenticationError: no key, or an unknown, revoked or expired one (401).
    """
    secret = credentials.credentials if credentials is not None else request.headers.get("x-api-key")
    if not secret:
        raise AuthenticationError(
            "no API key: send `Authorization: Bearer fl-...`; create a key with `forgeline keys create NAME --role ROLE`",
            param="api_key",
        )
    return key_store(request).verify(secret)


def require_role(*roles: str) -> Callable[..., KeyRecord]:
    """A dependency that admits keys holding one of ``roles`` (or ``admin``)."""

    def dependency(request: Request, key: KeyRecord = Depends(caller)) -> KeyRecord:
        if not any(key.has_role(role) for role in (*roles, "admin")):
            raise PermissionDeniedError(
                f"API key {key.prefix}… ({key.name}) has roles {', '.join(key.roles)}; "
                f"{request.method} {request.url.path} needs one of: {', '.join(roles)} (or admin)",
                param="api_key",
            )
        return key

    return dependency


def check_model_scope(key: KeyRecord, name: str) -> None:
    """Refuse keys whose ``models`` glob does not cover model ``name`` (403)."""
    if not key.allows_model(name):
        raise PermissionDeniedError(
            f"API key {key.prefix}… ({key.name}) may only act on models matching {key.models!r}, not {name!r}",
            param="model",
        )
