"""Control-database migrations on SQLite and PostgreSQL: an install made by the old
``create_all`` upgrades in place and keeps its rows; a newer schema is refused."""

from __future__ import annotations

from datetime import timedelta

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, create_engine, insert, inspect, text

import forgeline.finetune.base_models  # noqa: F401  (declare their tables on registry.db.metadata)
import forgeline.finetune.files  # noqa: F401
import forgeline.finetune.jobs  # noqa: F401
import jobs.store  # noqa: F401  (declares `jobs`)
import registry.events  # noqa: F401
import registry.keys  # noqa: F401
from registry import migrations
from registry.approvals import ApprovalStore
from registry.audit import AuditLog, alias_events
from registry.db import metadata, now
from registry.errors import ForgelineError
from registry.owner import Owner

DEFAULT = Owner("default", 1)  # the owning org and registration rows are written for

pytestmark = pytest.mark.integration


LATER_COLUMNS = {"jobs": ["stage"], "approvals": ["org", "model_created_ms"], "alias_events": ["org", "model_created_ms"]}
"""Columns today's tables have that revisions after the baseline added (0003_job_stage, 0004_governance_org,
0006_model_incarnation)."""
RENAMED = {"jobs": "training_jobs"}
"""Tables a revision after the baseline renamed (0005_jobs_table): today's name -> the legacy one."""


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
            if table.name in RENAMED:
                old = RENAMED[table.name]
                conn.execute(text(f"DROP INDEX ix_{table.name}_submitted"))
                conn.execute(text(f"ALTER TABLE {table.name} RENAME TO {old}"))
                conn.execute(text(f"CREATE INDEX ix_{old}_submitted ON {old} (submitted_at)"))
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
        assert audit.history("m", "production", owner=DEFAULT) == []  # legacy rows (no org) count for nobody...
        with audit.engine.connect() as conn:
            assert migrations.current(conn) == migrations.head()
            assert "webhook_deliveries" in inspect(conn).get_table_names()  # the revision after the baseline ran
            kept = conn.execute(text("SELECT to_version, actor, reason, org FROM alias_events ORDER BY id")).all()
        assert [tuple(r) for r in kept] == [(1, "ana", "first", None), (2, "bo", "better", None)]  # ...but are kept
        # and the upgraded database keeps working for writes
        audit.append(model="m", alias="production", from_version=2, to_version=3, actor="cy", reason="x",
                     action="promote", owner=DEFAULT)
        assert [e.to_version for e in audit.history("m", owner=DEFAULT)] == [3]
    finally:
        audit.dispose()


def test_partial_create_all_install_gets_its_missing_tables(empty_db: str) -> None:
    _legacy_install(empty_db, ["alias_events"])  # a process that had imported only the audit log
    approvals = ApprovalStore(empty_db)
    try:
        approvals.append(model="m", version=2, approver="cy", role="approver", decision="approve", comment="ok",
                         owner=DEFAULT)
        with approvals.engine.connect() as conn:
            assert set(metadata.tables) <= set(inspect(conn).get_table_names())
            assert conn.execute(text("SELECT count(*) FROM alias_events")).scalar() == 2
    finally:
        approvals.dispose()


def test_opening_twice_migrates_once_and_a_newer_schema_is_refused(empty_db: str) -> None:
    first, second = AuditLog(empty_db), AuditLog(empty_db)
    try:
        first.history("m", owner=DEFAULT), second.history("m", owner=DEFAULT)
        with first.engine.begin() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
            conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    finally:
        first.dispose()
        second.dispose()
    newer = AuditLog(empty_db)
    with pytest.raises(ForgelineError, match="9999_from_the_future.*newer forgeline.*upgrade forgeline"):
        newer.history("m", owner=DEFAULT)
    newer.dispose()


def _jobs_row(job_id: str) -> dict[str, object]:
    stamp = now().isoformat()
    return {"id": job_id, "name": "r", "kind": "local", "backend_id": "1", "phase": "succeeded", "detail": "", "restarts": 0,
            "nodes": "[]", "resumed_from_step": 0, "job_dir": "/j", "output_dir": "/o", "cluster": "{}", "actor": "ana",
            "submitted_at": stamp, "updated_at": stamp, "stage": "build"}


def _insert(conn: Connection, table: str, row: dict[str, object]) -> None:
    conn.execute(text(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)})"), row)


def _governance_rows(conn: Connection, **extra: object) -> None:
    """One approval and one alias move of model ``m``, with ``extra`` columns (those a later revision added)."""
    stamp = now().isoformat()
    _insert(conn, "approvals", {"model": "m", "version": 1, "approver": "ana", "role": "approver", "decision": "approve",
                                "comment": "ok", "created_at": stamp, **extra})
    _insert(conn, "alias_events", {"model": "m", "alias": "production", "to_version": 1, "actor": "bo", "reason": "r",
                                   "action": "promote", "created_at": stamp, **extra})


def test_0004_and_0005_upgrade_with_rows_and_downgrade_back(empty_db: str) -> None:
    """From 0003 with rows: org columns arrive NULL, `training_jobs` becomes `jobs`; and back again."""
    engine = create_engine(empty_db)
    try:
        with engine.begin() as conn:
            command.upgrade(migrations.config(conn), "0003_job_stage")
            _governance_rows(conn)
            _insert(conn, "training_jobs", _jobs_row("job-1"))
        migrations.upgrade(engine)
        with engine.connect() as conn:
            assert migrations.current(conn) == migrations.head()
            tables = set(inspect(conn).get_table_names())
            assert "jobs" in tables and "training_jobs" not in tables
            assert [i["name"] for i in inspect(conn).get_indexes("jobs")] == ["ix_jobs_submitted"]
            assert conn.execute(text("SELECT id, stage FROM jobs")).all() == [("job-1", "build")]
            for table in ("approvals", "alias_events"):
                assert conn.execute(text(f"SELECT model, org FROM {table}")).all() == [("m", None)]
            # the upgraded schema is the one the code declares (as for a database made at head)
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
            assert diff == [], diff
        with engine.begin() as conn:
            conn.execute(text("UPDATE approvals SET org = 'acme'"))
            command.downgrade(migrations.config(conn), "0003_job_stage")
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            assert "training_jobs" in tables and "jobs" not in tables
            assert [i["name"] for i in inspect(conn).get_indexes("training_jobs")] == ["ix_training_jobs_submitted"]
            assert conn.execute(text("SELECT id, stage FROM training_jobs")).all() == [("job-1", "build")]
            for table in ("approvals", "alias_events"):
                assert "org" not in {c["name"] for c in inspect(conn).get_columns(table)}
                assert conn.execute(text(f"SELECT model FROM {table}")).all() == [("m",)]
    finally:
        engine.dispose()


def test_0006_upgrade_with_rows_and_downgrade_back(empty_db: str) -> None:
    """From 0005 with rows (an org each): the registration column arrives NULL; downgrade drops it, rows and org kept."""
    engine = create_engine(empty_db)
    try:
        with engine.begin() as conn:
            command.upgrade(migrations.config(conn), "0005_jobs_table")
            _governance_rows(conn, org="acme")
        migrations.upgrade(engine)
        with engine.connect() as conn:
            assert migrations.current(conn) == migrations.head() == "0006_model_incarnation"
            for table in ("approvals", "alias_events"):
                rows = conn.execute(text(f"SELECT model, org, model_created_ms FROM {table}")).all()
                assert rows == [("m", "acme", None)]
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
            assert diff == [], diff
        with engine.begin() as conn:
            # a creation_timestamp in ms needs more than 32 bits
            conn.execute(text("UPDATE approvals SET model_created_ms = 1764648000123"))
            assert conn.execute(text("SELECT model_created_ms FROM approvals")).scalar() == 1764648000123
            command.downgrade(migrations.config(conn), "0005_jobs_table")
        with engine.connect() as conn:
            assert migrations.current(conn) == "0005_jobs_table"
            for table in ("approvals", "alias_events"):
                assert "model_created_ms" not in {c["name"] for c in inspect(conn).get_columns(table)}
                assert conn.execute(text(f"SELECT model, org FROM {table}")).all() == [("m", "acme")]
    finally:
        engine.dispose()
