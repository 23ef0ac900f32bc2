"""Control-database migrations on SQLite and PostgreSQL: an install made by the old
``create_all`` upgrades in place and keeps its rows; a newer schema is refused."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import create_engine, insert, inspect, text

import forgeline.finetune.files  # noqa: F401  (declares `files` on registry.db.metadata)
import jobs.store  # noqa: F401  (declares `training_jobs`)
from registry import migrations
from registry.approvals import ApprovalStore
from registry.audit import AuditLog, alias_events
from registry.db import metadata, now
from registry.errors import ForgelineError

pytestmark = pytest.mark.integration


LATER_COLUMNS = {"training_jobs": ["stage"]}
"""Columns today's tables have that revisions after the baseline added (0003_job_stage)."""


def _legacy_install(url: str, tables: list[str] | None = None) -> None:
    """What forgeline did before migrations: ``create_all`` of the declared tables, then rows.

    Today's declarations have the columns later revisions add; a legacy install did not.
    """
    engine = create_engine(url)
    chosen = [metadata.tables[t] for t in tables] if tables else list(metadata.tables.values())
    metadata.create_all(engine, tables=chosen)
    with engine.begin() as conn:
        for table in chosen:
            for column in LATER_COLUMNS.get(table.name, []):
                conn.execute(text(f"ALTER TABLE {table.name} DROP COLUMN {column}"))
        conn.execute(insert(alias_events), [
            {"model": "m", "alias": "production", "from_version": None, "to_version": 1, "actor": "ana",
             "reason": "first", "action": "promote", "policy_result": None, "created_at": now() - timedelta(days=3)},
            {"model": "m", "alias": "production", "from_version": 1, "to_version": 2, "actor": "bo",
             "reason": "better", "action": "promote", "policy_result": None, "created_at": now() - timedelta(days=1)},
        ])
    engine.dispose()


def test_create_all_install_upgrades_in_place_and_keeps_rows(empty_db: str) -> None:
    legacy = [t for t in metadata.tables if t != "webhook_deliveries"]  # what today's create_all made
    _legacy_install(empty_db, legacy)

    audit = AuditLog(empty_db)
    try:
        history = audit.history("m", "production")
        assert [(e.to_version, e.actor, e.reason) for e in history] == [(1, "ana", "first"), (2, "bo", "better")]
        with audit.engine.connect() as conn:
            assert migrations.current(conn) == migrations.head()
            assert "webhook_deliveries" in inspect(conn).get_table_names()  # the revision after the baseline ran
        # and the upgraded database keeps working for writes
        audit.append(model="m", alias="production", from_version=2, to_version=3, actor="cy", reason="x", action="promote")
        assert len(audit.history("m")) == 3
    finally:
        audit.dispose()


def test_partial_create_all_install_gets_its_missing_tables(empty_db: str) -> None:
    _legacy_install(empty_db, ["alias_events"])  # a process that had imported only the audit log
    approvals = ApprovalStore(empty_db)
    try:
        approvals.append(model="m", version=2, approver="cy", role="approver", decision="approve", comment="ok")
        with approvals.engine.connect() as conn:
            assert set(metadata.tables) <= set(inspect(conn).get_table_names())
            assert conn.execute(text("SELECT count(*) FROM alias_events")).scalar() == 2
    finally:
        approvals.dispose()


def test_opening_twice_migrates_once_and_a_newer_schema_is_refused(empty_db: str) -> None:
    first, second = AuditLog(empty_db), AuditLog(empty_db)
    try:
        first.history("m"), second.history("m")
        with first.engine.begin() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
            conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    finally:
        first.dispose()
        second.dispose()
    newer = AuditLog(empty_db)
    with pytest.raises(ForgelineError, match="9999_from_the_future.*newer forgeline.*upgrade forgeline"):
        newer.history("m")
    newer.dispose()
