"""Schema migrations of the control database (Alembic), applied when a store opens it.

One migration tree for the whole control database, here in ``registry``: the database
is the registry's (``registry.db`` owns its ``MetaData`` and engine), and every package
that keeps a table there (``forgeline.finetune``, ``jobs``) may import
``registry`` while ``registry`` may import none of them. Revisions are plain DDL and
import no table module, so the tree covers those packages' tables without breaking the
layering. One tree (rather than one per package) also keeps one ``alembic_version`` row
and one linear history, which is what an operator reads when something goes wrong.

Policy: **upgrade on open**. :func:`upgrade` runs from
:func:`registry.db.create_control_engine`, under the database's writer lock (SQLite
``BEGIN IMMEDIATE``; PostgreSQL an advisory transaction lock), so concurrent processes
migrate once and the others wait and find the schema at head. A database written by a
*newer* forgeline (a revision this code does not know) is refused with a clear error
instead of being used half-understood. ``forgeline db status`` shows the revision and
``forgeline db upgrade`` migrates ahead of a rollout.

Installs made before migrations existed (tables from ``MetaData.create_all``, no
``alembic_version``) upgrade in place: the baseline revision creates only the tables that
are missing and leaves existing ones and their rows untouched.

Adding a column or table: declare it on :data:`registry.db.metadata` as before, then add
a revision file to ``versions/`` (next number, ``down_revision`` = the current head).
``tests/unit/registry/test_migrations.py`` compares the migrated schema with the declared
tables and fails, naming the difference, when a revision is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, String, column, func, inspect, select, table
from sqlalchemy.engine import make_url

from registry.errors import ErrorCode, ForgelineError

logger = logging.getLogger(__name__)

LOCATION = Path(__file__).parent
VERSION_TABLE = "alembic_version"
_LOCK_KEY = 0x666F72676C6E6D67  # "forglnmg": the migration advisory lock on PostgreSQL


def config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for this tree (``connection`` is handed to ``env.py``)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(LOCATION))
    cfg.attributes["connection"] = connection
    return cfg


@cache
def head() -> str:
    """The newest revision this forgeline knows."""
    revision = ScriptDirectory.from_config(config()).get_current_head()
    assert revision is not None, "the migration tree has no head"
    return revision


def current(conn: Connection) -> str | None:
    """The revision the database is at (``None``: never migrated, maybe made by ``create_all``)."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    versions = table(VERSION_TABLE, column("version_num", String))
    return conn.execute(select(versions.c.version_num)).scalar()


def upgrade(engine: Engine, *, read_only: Mapping[str, Any] | None = None) -> None:
    """Bring the control database at ``engine`` to :func:`head`; a no-op when it is there.

    Args:
        engine: the control database.
        read_only: execution options of a read-only connection (``registry.db`` passes its
            own, so the check for "already at head" takes no write lock on SQLite).

    Raises:
        ForgelineError: the database is at a revision this forgeline does not know
            (a newer forgeline migrated it).
    """
    with engine.connect().execution_options(**(read_only or {})) as conn, conn.begin():
        if current(conn) == head():
            return
    where = make_url(engine.url).render_as_string(hide_password=True)
    with engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE, so one process migrates at a time
        if conn.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(_LOCK_KEY)))
        before = current(conn)
        if before == head():
            return  # another process migrated while we waited for the lock
        try:
            command.upgrade(config(conn), "head")
        except CommandError as exc:
            raise ForgelineError(
                f"the control database {where} is at schema revision {before!r}, which this forgeline "
                f"(newest revision {head()!r}) does not know: a newer forgeline migrated it; fix: upgrade "
                f"forgeline, or point FORGELINE_DB_URL at another database ({exc})",
                code=ErrorCode.INVALID_CONFIG,
                param="FORGELINE_DB_URL",
            ) from exc
    logger.info("control database %s migrated from %s to %s", where, before or "an unversioned schema", head())
