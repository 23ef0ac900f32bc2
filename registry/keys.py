"""API keys shared by the control plane and the gateway, stored hashed.

A key is ``fl-<43 url-safe characters>`` (32 random bytes). Only its SHA-256 digest and a
short display prefix are stored; the secret is shown once, by :meth:`KeyStore.create`.
A fast hash is the right one here: the secret is 256 bits of randomness, not a password,
so a slow KDF (scrypt, bcrypt) would add latency to every gateway request and no
security. Lookup goes by the prefix and the digests are compared in constant time.

Each key carries roles (``trainer``, ``approver``, ``admin`` for the control plane;
``user`` for the gateway), an ``org``, a model glob and optional request/token quotas
(``rpm``/``tpm``) that the gateway enforces.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy import JSON, Column, Index, Integer, String, Table, select, update

from registry.db import READ_ONLY, ControlStore, UTCDateTime, metadata, now
from registry.errors import AuthenticationError, ErrorCode, ForgelineError, NotFoundError

logger = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("trainer", "approver", "admin", "user")
"""Roles a key can carry. ``admin`` may do anything on the control plane."""

SECRET_PREFIX = "fl-"
_SECRET_BYTES = 32
# "fl-" plus 9 random characters (54 bits): unique enough to find the row, too short to guess the key.
_DISPLAY_CHARS = len(SECRET_PREFIX) + 9

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("prefix", String(32), nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("roles", JSON, nullable=False),
    Column("org", String(256), nullable=False),
    Column("models", String(512), nullable=False),
    Column("rpm", Integer, nullable=True),
    Column("tpm", Integer, nullable=True),
    Column("expires_at", UTCDateTime(), nullable=True),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Index("ix_api_keys_prefix", "prefix"),
)


@dataclass(frozen=True)
class KeyRecord:
    """One API key as stored, without its secret."""

    id: str
    name: str
    prefix: str
    roles: tuple[str, ...]
    org: str
    models: str
    rpm: int | None
    tpm: int | None
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime

    def allows_model(self, name: str) -> bool:
        """Whether the key's ``models`` glob (``*``, ``support-*``) matches model ``name`` (case-sensitive)."""
        return self.models == "*" or fnmatch.fnmatchcase(name, self.models)  # "*" matches every name

    def has_role(self, role: str) -> bool:
        """Whether the key carries exactly ``role`` (``admin`` does not imply other roles here)."""
        return role in self.roles

    def active(self, at: datetime | None = None) -> bool:
        """Neither revoked nor expired at ``at`` (default: now)."""
        at = at or now()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > at)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (timestamps as ISO 8601 strings); never contains the secret."""
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "roles": list(self.roles),
            "org": self.org,
            "models": self.models,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "created_at": self.created_at.isoformat(),
        }


def _record(row: Any) -> KeyRecord:
    return KeyRecord(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        roles=tuple(row.roles),
        org=row.org,
        models=row.models,
        rpm=row.rpm,
        tpm=row.tpm,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        created_at=row.created_at,
    )


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _invalid(field: str, value: object, fix: str) -> ForgelineError:
    return ForgelineError(f"{field}: invalid value {value!r}; fix: {fix}", code=ErrorCode.INVALID_REQUEST, param=field)


def _check_roles(roles: Iterable[str]) -> tuple[str, ...]:
    if isinstance(roles, str):
        roles = (roles,)
    out = tuple(dict.fromkeys(roles))
    if not out or any(role not in ROLES for role in out):
        raise _invalid("roles", list(out), f"use one or more of {', '.join(ROLES)}")
    return out


def _check_quota(field: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise _invalid(field, value, "give a positive whole number, or leave it unset for no limit")
    return value


class KeyStore(ControlStore):
    """Create, verify, list and revoke API keys in the control database.

    Args:
        url: SQLAlchemy URL; defaults to ``registry.settings.control_db_url()``. The
            ``api_keys`` table is created on first use.
    """

    def create(
        self,
        name: str,
        *,
        roles: Iterable[str] = ("user",),
        org: str = "default",
        models: str = "*",
        rpm: int | None = None,
        tpm: int | None = None,
        expires_at: datetime | None = None,
    ) -> tuple[str, KeyRecord]:
        """Create a key.

        Args:
            name: who or what the key is for (shown in listings and audit rows).
            roles: any of :data:`ROLES`.
            org: organisation the key bills to.
            models: glob of model names the key may use (``*`` for all).
            rpm: requests per minute allowed (``None``: unlimited).
            tpm: tokens per minute allowed (``None``: unlimited).
            expires_at: timezone-aware expiry (``None``: never).

        Returns:
            ``(secret, record)``. The secret is not stored and cannot be shown again.

        Raises:
            ForgelineError: an argument is invalid (``invalid_request``, naming it).
        """
        if not name or not name.strip():
            raise _invalid("name", name, "name the key after its owner, e.g. `ci-trainer`")
        roles = _check_roles(roles)
        if not org or not org.strip():
            raise _invalid("org", org, "give an organisation name, e.g. `default`")
        if not models or not models.strip():
            raise _invalid("models", models, "give a glob such as `*` or `support-*`")
        rpm, tpm = _check_quota("rpm", rpm), _check_quota("tpm", tpm)
        if expires_at is not None and expires_at.tzinfo is None:
            raise _invalid("expires_at", expires_at, "give a timezone-aware datetime, e.g. datetime.now(UTC) + timedelta(days=30)")
        secret = SECRET_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
        values = {
            "id": uuid.uuid4().hex[:16],
            "name": name.strip(),
            "prefix": secret[:_DISPLAY_CHARS],
            "secret_sha256": _digest(secret),
            "roles": list(roles),
            "org": org.strip(),
            "models": models.strip(),
            "rpm": rpm,
            "tpm": tpm,
            "expires_at": expires_at,
            "revoked_at": None,
            "created_at": now(),
        }
        with self.engine.begin() as conn:
            conn.execute(api_keys.insert().values(**values))
        record = _record(SimpleNamespace(**values))
        logger.info("created API key %s (%s) roles=%s org=%s", record.prefix, record.name, ",".join(roles), record.org)
        return secret, record

    def verify(self, secret: str) -> KeyRecord:
        """The record of an active key.

        Raises:
            AuthenticationError: (code ``invalid_api_key``, HTTP 401) the key is unknown,
                revoked or expired. The message never repeats the secret.
        """
        if not secret or not secret.startswith(SECRET_PREFIX) or len(secret) < _DISPLAY_CHARS:
            raise AuthenticationError(
                "invalid API key: forgeline keys start with `fl-`; create one with `forgeline keys create`",
                param="api_key",
            )
        digest = _digest(secret)
        query = select(api_keys).where(api_keys.c.prefix == secret[:_DISPLAY_CHARS])
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            rows = conn.execute(query).all()
        # Compare every candidate in constant time; the prefix is public, the digest is not.
        match = None
        for row in rows:
            if hmac.compare_digest(row.secret_sha256, digest):
                match = row
        if match is None:
            raise AuthenticationError(
                "invalid API key: it is not known here; create one with `forgeline keys create`", param="api_key"
            )
        record = _record(match)
        if record.revoked_at is not None:
            raise AuthenticationError(
                f"API key {record.prefix}… was revoked at {record.revoked_at.isoformat()}; ask an admin for a new key",
                param="api_key",
            )
        if record.expires_at is not None and record.expires_at <= now():
            raise AuthenticationError(
                f"API key {record.prefix}… expired at {record.expires_at.isoformat()}; ask an admin for a new key",
                param="api_key",
            )
        return record

    def get(self, key_id: str) -> KeyRecord:
        """One key by id.

        Raises:
            NotFoundError: no key has that id.
        """
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one_or_none()
        if row is None:
            raise NotFoundError(f"no API key with id {key_id!r}; list them with `forgeline keys list`", param="key_id")
        return _record(row)

    def revoke(self, key_id: str) -> KeyRecord:
        """Revoke a key (idempotent: revoking twice keeps the first time).

        Raises:
            NotFoundError: no key has that id.
        """
        with self.engine.begin() as conn:
            conn.execute(
                update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None)).values(revoked_at=now())
            )
        record = self.get(key_id)
        logger.info("revoked API key %s (%s)", record.prefix, record.name)
        return record

    def list(self) -> list[KeyRecord]:
        """Every key, revoked and expired ones included, oldest first."""
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)).all()
        return [_record(row) for row in rows]


