"""KeyStore on SQLite: keys stored hashed, verified, scoped, revoked and expired."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from registry.errors import AuthenticationError, ForgelineError, NotFoundError
from registry.keys import KeyStore


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "control.db"


@pytest.fixture
def store(db: Path) -> Iterator[KeyStore]:
    keys = KeyStore(f"sqlite:///{db}")
    yield keys
    keys.dispose()


def test_create_returns_secret_once_and_stores_only_its_hash(store: KeyStore, db: Path) -> None:
    secret, record = store.create("ci-trainer", roles=("trainer",), org="acme", models="support-*", rpm=60, tpm=10_000)
    assert secret.startswith("fl-") and len(secret) >= 3 + 43
    assert secret.startswith(record.prefix) and len(record.prefix) < len(secret) // 2
    assert (record.roles, record.org, record.models, record.rpm, record.tpm) == (("trainer",), "acme", "support-*", 60, 10_000)
    stored = sqlite3.connect(db).execute("select * from api_keys").fetchall()
    assert len(stored) == 1
    flat = " ".join(str(value) for value in stored[0])
    assert secret not in flat
    assert hashlib.sha256(secret.encode()).hexdigest() in flat


def test_verify_returns_the_record_and_the_store_is_shared_across_instances(store: KeyStore, db: Path) -> None:
    secret, record = store.create("alice", roles=("approver", "user"))
    other = KeyStore(f"sqlite:///{db}")  # e.g. the gateway process
    try:
        assert other.verify(secret) == record
    finally:
        other.dispose()
    assert record.has_role("approver") and record.has_role("user") and not record.has_role("admin")
    assert record.created_at.utcoffset() == timedelta(0)


def test_unknown_or_malformed_secrets_are_refused_with_401(store: KeyStore) -> None:
    secret, _ = store.create("alice")
    wrong = secret[:-4] + ("aaaa" if not secret.endswith("aaaa") else "bbbb")  # same prefix, other secret
    for bad in (wrong, "", "sk-123", "fl-"):
        with pytest.raises(AuthenticationError) as info:
            store.verify(bad)
        assert info.value.code == "invalid_api_key" and info.value.http_status == 401
        assert wrong not in str(info.value)  # never echo a secret


def test_revoked_and_expired_keys_are_refused(store: KeyStore) -> None:
    secret, record = store.create("bob")
    soon, _ = store.create("temp", expires_at=datetime.now(UTC) + timedelta(hours=1))
    past, _ = store.create("old", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    store.verify(soon)
    revoked = store.revoke(record.id)
    assert revoked.revoked_at is not None and not revoked.active()
    assert store.revoke(record.id).revoked_at == revoked.revoked_at  # idempotent
    with pytest.raises(AuthenticationError, match="revoked"):
        store.verify(secret)
    with pytest.raises(AuthenticationError, match="expired"):
        store.verify(past)
    assert [k.name for k in store.list()] == ["bob", "temp", "old"]
    with pytest.raises(NotFoundError):
        store.revoke("nope")


def test_model_globs() -> None:
    store = KeyStore("sqlite://")  # in-memory is enough for a record
    _, scoped = store.create("scoped", models="support-*")
    _, everything = store.create("all")
    assert scoped.allows_model("support-router") and not scoped.allows_model("other")
    assert not scoped.allows_model("Support-router")  # case-sensitive on every OS
    assert everything.allows_model("anything")


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"roles": ("root",)}, "roles"),
        ({"roles": ()}, "roles"),
        ({"rpm": 0}, "rpm"),
        ({"tpm": -5}, "tpm"),
        ({"models": ""}, "models"),
        ({"expires_at": datetime(2030, 1, 1)}, "expires_at"),  # naive
    ],
)
def test_invalid_arguments_name_the_field(store: KeyStore, kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(ForgelineError) as info:
        store.create("x", **kwargs)  # type: ignore[arg-type]
    assert info.value.param == param and info.value.code == "invalid_request"
    assert store.list() == []
