"""AuditLog on SQLite: append-only rows, order, filters, transactional rollback, change mark."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from registry.audit import AuditLog, alias_events
from registry.db import now
from registry.owner import Owner

ACME = Owner("acme", 1)  # the owning org and registration rows are written for


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(f"sqlite:///{tmp_path / 'control.db'}")
    yield log
    log.dispose()


def test_append_and_history_in_order(audit: AuditLog) -> None:
    first = audit.append(
        model="m", alias="production", from_version=None, to_version=1, actor="ana", reason="first", action="promote", owner=ACME
    )
    audit.append(model="m", alias="staging", from_version=None, to_version=2, actor="bo", reason="", action="promote", owner=ACME)
    audit.append(
        model="m",
        alias="production",
        from_version=1,
        to_version=2,
        actor="bo",
        reason="better",
        action="promote",
        policy_result={"passed": True, "gates": []},
        owner=ACME,
    )
    audit.append(
        model="other", alias="production", from_version=None, to_version=1, actor="c", reason="", action="promote", owner=ACME
    )

    assert first.id > 0 and first.created_at.utcoffset() == timedelta(0)
    production = audit.history("m", "production", owner=ACME)
    assert [(e.from_version, e.to_version, e.actor) for e in production] == [(None, 1, "ana"), (1, 2, "bo")]
    assert production[1].policy_result == {"passed": True, "gates": []}
    assert [e.alias for e in audit.history("m", owner=ACME)] == ["production", "staging", "production"]
    assert production[0].to_dict()["created_at"].endswith("+00:00")


def test_history_survives_a_new_instance(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    AuditLog(url).append(model="m", alias="p", from_version=None, to_version=1, actor="a", reason="", action="promote", owner=ACME)
    assert len(AuditLog(url).history("m", owner=ACME)) == 1


def test_failed_transaction_leaves_no_row(audit: AuditLog) -> None:
    with pytest.raises(RuntimeError), audit.transaction("m", owner=ACME) as tx:
        tx.append(alias="p", from_version=None, to_version=1, actor="a", reason="", action="promote")
        raise RuntimeError("MLflow said no")
    assert audit.history("m", owner=ACME) == []


def test_unknown_action_is_rejected(audit: AuditLog) -> None:
    with pytest.raises(ValueError, match="action"):
        audit.append(model="m", alias="p", from_version=None, to_version=1, actor="a", reason="", action="nope", owner=ACME)  # type: ignore[arg-type]


def test_change_mark_moves_with_every_commit_and_only_then(audit: AuditLog) -> None:
    assert audit.change_mark() == (0, 0)
    other = AuditLog(audit.url)  # another process's view of the same control database
    try:
        with audit.transaction("m", owner=ACME) as tx:
            row = tx.append(alias="p", from_version=None, to_version=1, actor="a", reason="", action="promote")
            assert other.change_mark() == (0, 0)  # not committed yet: a gateway must not re-read now
        assert other.change_mark() == (1, row.id)
    finally:
        other.dispose()


def test_change_mark_sees_a_late_commit_with_a_lower_id(audit: AuditLog) -> None:
    # On PostgreSQL moves of two models hold different locks, so id 2 can commit after id 3;
    # the newest id alone would then not change. Simulate that order with explicit ids.
    values = {"model": "m", "alias": "p", "actor": "a", "reason": "", "action": "promote", "created_at": now()}
    with audit.engine.begin() as conn:
        conn.execute(alias_events.insert().values(id=3, to_version=1, **values))
    before = audit.change_mark()
    with audit.engine.begin() as conn:
        conn.execute(alias_events.insert().values(id=2, to_version=2, **values))
    after = audit.change_mark()
    assert before == (1, 3) and after == (2, 3)
