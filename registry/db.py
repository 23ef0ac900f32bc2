"""forgeline's control-plane database: one SQLAlchemy ``MetaData`` and engine factory.

The audit log, approvals and API keys all live in ``registry.settings.control_db_url()``
(SQLite by default, PostgreSQL for teams). Each module declares its table on
:data:`metadata`; :func:`create_control_engine` brings the schema to the newest
migration (:mod:`registry.migrations`), so tables are never made by ``create_all``.

SQLite writers take the database write lock at ``BEGIN`` (``BEGIN IMMEDIATE``) so a
transaction that reads and then writes cannot be overtaken between the two; connections
marked with :data:`READ_ONLY` use a plain deferred ``BEGIN`` and never wait for writers.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    DateTime,
    Dialect,
    Engine,
    MetaData,
    TypeDecorator,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import make_url

from registry import settings

logger = logging.getLogger(__name__)

READ_ONLY = "forgeline_read_only"
"""Execution option marking a read-only connection (SQLite: plain deferred ``BEGIN``)."""

metadata = MetaData()
"""Every control-plane table (``alias_events``, ``approvals``, ``api_keys``)."""


class UTCDateTime(TypeDecorator[datetime]):
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
            raise ValueError("control-plane timestamps must be timezone-aware")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def create_control_engine(url: str) -> Engine:
    """An engine on ``url`` with the control-plane schema migrated to the newest revision.

    Raises:
        MissingDependencyError: the URL names a driver that is not installed
            (``postgresql+psycopg://`` needs ``pip install 'forgeline[postgres]'``).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:" and Path(parsed.database).parent.is_dir():
            settings.private_file(Path(parsed.database))  # keys, audit and job data: 0600 before SQLite makes it
        # Writers wait for each other instead of failing at once with "database is locked".
        engine = create_engine(parsed, connect_args={"timeout": 30})

        # pysqlite defers BEGIN until the first write, so a transaction that reads first
        # would not hold the lock while it reads. Take over BEGIN and make it IMMEDIATE
        # (recipe from SQLAlchemy's SQLite dialect docs, "Serializable isolation / Savepoints").
        @event.listens_for(engine, "connect")
        def _no_driver_begin(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: Connection) -> None:
            deferred = conn.get_execution_options().get(READ_ONLY, False)
            conn.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")

    else:
        try:
            engine = create_engine(parsed, pool_pre_ping=True)
        except ModuleNotFoundError as exc:
            from registry.errors import MissingDependencyError

            raise MissingDependencyError(
                f"the control database {parsed.render_as_string(hide_password=True)} needs the "
                f"{exc.name!r} driver; fix: pip install 'forgeline[postgres]'",
                param="FORGELINE_DB_URL",
            ) from exc
    from registry import migrations  # Alembic loads only when a store first opens the database

    migrations.upgrade(engine, read_only={READ_ONLY: True})
    logger.debug("control database ready at %s", parsed.render_as_string(hide_password=True))
    return engine


def now() -> datetime:
    """The current time, timezone-aware UTC (what every control-plane row stores)."""
    return datetime.now(UTC)


def _lock_key(model: str) -> int:
    # A stable signed 64-bit key per model for pg_advisory_xact_lock; Python's hash() is
    # salted per process, so it cannot be shared between writers.
    digest = hashlib.blake2b(f"forgeline.alias:{model}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def lock_model(conn: Connection, model: str) -> None:
    """Hold the per-model writer lock until ``conn``'s transaction ends.

    PostgreSQL: ``pg_advisory_xact_lock`` on a key derived from the model name, so moves
    of different models do not wait for each other. SQLite: the connection already holds
    the database write lock (``BEGIN IMMEDIATE``). Alias moves and approval decisions of
    one model take this lock, so a decision cannot slip in while a promotion is deciding.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(_lock_key(model))))
    elif conn.dialect.name != "sqlite":
        logger.warning(
            "control database on %s: no writer lock implemented; concurrent moves of %s are not serialised",
            conn.dialect.name,
            model,
        )


class ControlStore:
    """Base of the control-plane stores (audit log, approvals, keys): one lazily created engine.

    Args:
    url: SQLAlchemy URL; defaults to ``registry.settings.control_db_url()``. The schema
            is migrated on first use.
    """

    def __init__(self, url: str | None = None) -> None:
        self.url = url or settings.control_db_url()
        self._engine: Engine | None = None
        self._init_lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, created (with the tables) on first use."""
        if self._engine is None:
            with self._init_lock:
                if self._engine is None:
                    self._engine = create_control_engine(self.url)
        return self._engine

    def dispose(self) -> None:
        """Close pooled connections (tests and short-lived CLIs)."""
        if self._engine is not None:
            self._engine.dispose()
