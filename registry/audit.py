"""Append-only audit log of alias moves (who, when, why, from, to).

MLflow keeps only the *current* holder of an alias, so forgeline records every move in
its own control-plane database (``registry.settings.control_db_url()``: SQLite by
default, PostgreSQL for teams). Rows are only ever inserted; this module has no code
path that updates or deletes one.

The log is also the serialisation point for alias moves: :meth:`AuditLog.transaction`
holds a writer lock (SQLite ``BEGIN IMMEDIATE``; PostgreSQL
``pg_advisory_xact_lock`` per model) until the move is committed, so two promotions of
the same model never interleave (see ``Registry.move_alias``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Dialect,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from registry import settings

logger = logging.getLogger(__name__)

# Execution option marking a read-only connection (SQLite: plain deferred BEGIN).
_READ_ONLY = "forgeline_read_only"

Action = Literal["promote", "rollback", "delete"]
ACTIONS: tuple[str, ...] = ("promote", "rollback", "delete")


class _UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    SQLite has no timezone type and hands back naive values; we store UTC and re-attach
    the zone on read so callers always get an aware datetime.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("audit timestamps must be timezone-aware")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


metadata = MetaData()

alias_events = Table(
    "alias_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(256), nullable=False),
    Column("alias", String(256), nullable=False),
    Column("from_version", Integer, nullable=True),
    Column("to_version", Integer, nullable=True),
    Column("actor", String(256), nullable=False),
    Column("reason", Text, nullable=False),
    Column("action", String(16), nullable=False),
    Column("policy_result", Text, nullable=True),
    Column("created_at", _UTCDateTime(), nullable=False),
    Index("ix_alias_events_model_alias", "model", "alias", "id"),
)


@dataclass(frozen=True)
class AuditEntry:
    """One alias move as recorded in the audit log."""

    id: int
    model: str
    alias: str
    from_version: int | None
    to_version: int | None
    actor: str
    reason: str
    action: str
    policy_result: dict[str, Any] | None
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``created_at`` as an ISO 8601 string with ``+00:00``)."""
        return {
            "id": self.id,
            "model": self.model,
            "alias": self.alias,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "actor": self.actor,
            "reason": self.reason,
            "action": self.action,
            "policy_result": self.policy_result,
            "created_at": self.created_at.isoformat(),
        }


def _entry(row: Any) -> AuditEntry:
    return AuditEntry(
        id=row.id,
        model=row.model,
        alias=row.alias,
        from_version=row.from_version,
        to_version=row.to_version,
        actor=row.actor,
        reason=row.reason,
        action=row.action,
        policy_result=json.loads(row.policy_result) if row.policy_result is not None else None,
        created_at=row.created_at,
    )


def _lock_key(model: str) -> int:
    # A stable signed 64-bit key per model for pg_advisory_xact_lock; Python's hash() is
    # salted per process, so it cannot be shared between writers.
    digest = hashlib.blake2b(f"forgeline.alias:{model}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class AuditTransaction:
    """An open audit-log transaction holding the writer lock; see :meth:`AuditLog.transaction`."""

    def __init__(self, conn: Connection, model: str) -> None:
        self._conn = conn
        self.model = model

    def append(
        self,
        *,
        alias: str,
        from_version: int | None,
        to_version: int | None,
        actor: str,
        reason: str,
        action: Action,
        policy_result: dict[str, Any] | None = None,
    ) -> AuditEntry:
        """Insert one row; it becomes visible to others only when the transaction commits."""
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        values = {
            "model": self.model,
            "alias": alias,
            "from_version": from_version,
            "to_version": to_version,
            "actor": actor,
            "reason": reason,
            "action": action,
            "policy_result": json.dumps(policy_result, sort_keys=True) if policy_result is not None else None,
            "created_at": datetime.now(UTC),
        }
        result = self._conn.execute(alias_events.insert().values(**values))
        (row_id,) = result.inserted_primary_key or (None,)
        row = self._conn.execute(select(alias_events).where(alias_events.c.id == row_id)).one()
        return _entry(row)


class AuditLog:
    """forgeline's append-only log of alias moves.

    Args:
        url: SQLAlchemy URL; defaults to ``registry.settings.control_db_url()``.
            The table is created on first use.
    """

    def __init__(self, url: str | None = None) -> None:
        self.url = url or settings.control_db_url()
        self._engine: Engine | None = None
        self._init_lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, created (with the table) on first use."""
        if self._engine is None:
            with self._init_lock:
                if self._engine is None:
                    self._engine = self._create_engine()
        return self._engine

    def _create_engine(self) -> Engine:
        url = make_url(self.url)
        if url.get_backend_name() == "sqlite":
            # Writers wait for each other instead of failing at once with "database is locked".
            engine = create_engine(url, connect_args={"timeout": 30})

            # pysqlite defers BEGIN until the first write, so a transaction that reads the
            # alias holder first would not hold the lock while it reads. Take over BEGIN and
            # make it IMMEDIATE: the write lock is held from the start (recipe from
            # SQLAlchemy's SQLite dialect docs, "Serializable isolation / Savepoints").
            @event.listens_for(engine, "connect")
            def _no_driver_begin(dbapi_connection: Any, _record: Any) -> None:
                dbapi_connection.isolation_level = None

            @event.listens_for(engine, "begin")
            def _begin_immediate(conn: Connection) -> None:
                # Readers opt out so that history() never waits behind an alias move.
                deferred = conn.get_execution_options().get(_READ_ONLY, False)
                conn.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")

        else:
            engine = create_engine(url, pool_pre_ping=True)
        try:
            metadata.create_all(engine, checkfirst=True)
        except DBAPIError:
            # Another process created the table between our check and CREATE; try once more.
            logger.debug("create_all raced with another writer; retrying", exc_info=True)
            metadata.create_all(engine, checkfirst=True)
        logger.debug("audit log ready at %s", url.render_as_string(hide_password=True))
        return engine

    @contextmanager
    def transaction(self, model: str) -> Iterator[AuditTransaction]:
        """Open a transaction that holds the writer lock for ``model`` until it ends.

        Commits when the block exits normally; rolls back (the appended rows disappear)
        when it raises.
        """
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Per-model lock, released automatically at commit/rollback.
                conn.execute(select(func.pg_advisory_xact_lock(_lock_key(model))))
            elif conn.dialect.name != "sqlite":
                logger.warning(
                    "audit log on %s: no writer lock implemented; concurrent moves of %s are not serialised",
                    conn.dialect.name,
                    model,
                )
            yield AuditTransaction(conn, model)

    def append(
        self,
        *,
        model: str,
        alias: str,
        from_version: int | None,
        to_version: int | None,
        actor: str,
        reason: str,
        action: Action,
        policy_result: dict[str, Any] | None = None,
    ) -> AuditEntry:
        """Append one row in its own transaction and return it."""
        with self.transaction(model) as tx:
            return tx.append(
                alias=alias,
                from_version=from_version,
                to_version=to_version,
                actor=actor,
                reason=reason,
                action=action,
                policy_result=policy_result,
            )

    def history(self, model: str, alias: str | None = None) -> list[AuditEntry]:
        """Every recorded move of ``model``'s aliases (or of one ``alias``), oldest first."""
        query = select(alias_events).where(alias_events.c.model == model)
        if alias is not None:
            query = query.where(alias_events.c.alias == alias)
        # Ids follow commit order per model because moves of one model are serialised.
        query = query.order_by(alias_events.c.id)
        with self.engine.connect().execution_options(**{_READ_ONLY: True}) as conn:
            return [_entry(row) for row in conn.execute(query)]

    def dispose(self) -> None:
        """Close pooled connections (tests and short-lived CLIs)."""
        if self._engine is not None:
            self._engine.dispose()
