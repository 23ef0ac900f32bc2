"""The audit log on PostgreSQL: same behaviour as SQLite, and a per-model writer lock.

Uses ``FORGELINE_TEST_POSTGRES_URL`` when set, else starts PostgreSQL itself (see
``backends.postgres_server``); skipped only when PostgreSQL is not installed.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest

from registry.audit import AuditLog
from registry.owner import Owner
from tests.support.backends import fresh_database

ACME = Owner("acme", 1)  # the owning org and registration rows are written for

pytestmark = pytest.mark.integration


@pytest.fixture
def audit(postgres_server: str) -> Iterator[AuditLog]:
    log = AuditLog(fresh_database(postgres_server, prefix="audit"))
    yield log
    log.dispose()


def test_append_and_history_on_postgres(audit: AuditLog) -> None:
    model = f"m-{uuid.uuid4().hex}"  # tables persist between runs on a shared database
    audit.append(
        model=model, alias="production", from_version=None, to_version=1, actor="a", reason="", action="promote", owner=ACME
    )
    audit.append(
        model=model,
        alias="production",
        from_version=1,
        to_version=2,
        actor="b",
        reason="why",
        action="promote",
        policy_result={"passed": True, "gates": []},
        owner=ACME,
    )
    history = audit.history(model, "production", owner=ACME)
    assert [(e.from_version, e.to_version) for e in history] == [(None, 1), (1, 2)]
    assert history[1].policy_result == {"passed": True, "gates": []}
    assert history[0].created_at.utcoffset() == timedelta(0)

    with pytest.raises(RuntimeError), audit.transaction(model, owner=ACME) as tx:
        tx.append(alias="production", from_version=2, to_version=3, actor="c", reason="", action="promote")
        raise RuntimeError("MLflow said no")
    assert len(audit.history(model, owner=ACME)) == 2


def test_transactions_on_one_model_are_serialised(audit: AuditLog) -> None:
    model = f"m-{uuid.uuid4().hex}"
    held = threading.Event()
    order: list[str] = []

    def first() -> None:
        with audit.transaction(model, owner=ACME):
            held.set()
            time.sleep(0.5)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    held.wait(10)
    with audit.transaction(f"{model}-other", owner=ACME):
        order.append("other model")  # a different model does not wait
    with audit.transaction(model, owner=ACME):
        order.append("second")  # waits for the lock of `first`
    thread.join(10)
    assert order == ["other model", "first done", "second"]
