"""Append-only audit log of alias moves (who, when, why, from, to).

MLflow keeps only the *current* holder of an alias, so forgeline records every move in
its own control-plane database (``registry.settings.control_db_url()``: SQLite by
default, PostgreSQL for teams). Rows are only ever inserted; this module has no code
path that updates or deletes one.

The log is also the serialisation point for alias moves: :meth:`AuditLog.transaction`
holds a writer lock (SQLite ``BEGIN IMMEDIATE``; PostgreSQL
``pg_advisory_xact_lock`` per model) until the move is committed, so two promotions of
the same model never interleave (see ``Registry.move_alias``).

**Organisations.** Each row records the organisation that owned the model when the alias
moved (column ``org``, from ``Registry.governance_owner``), and :meth:`AuditLog.history`
returns only the rows of the org it is given (the model's owner now). A model deleted in
MLflow and registered again under its name by another organisation starts with an empty
history: the new owner neither sees the old owner's trail nor rolls back into it. Rows
from before the column (migration ``0004_governance_org``, ``org`` NULL) belong to nobody
until :mod:`registry.legacy_orgs` claims them. Rows also record the registration of the
model (column ``model_created_ms``, MLflow's ``creation_timestamp``; migration
``0006_model_incarnation``) and history takes only the current one's
(:class:`registry.owner.Owner`), so the same org registering a deleted name again starts
with an empty history too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import BigInteger, Column, Connection, Index, Integer, String, Table, Text, func, select

from registry.db import READ_ONLY, ControlStore, UTCDateTime, lock_model, metadata, now
from registry.owner import Owner, owned_by

logger = logging.getLogger(__name__)

Action = Literal["promote", "rollback", "delete", "reconcile"]
ACTIONS: tuple[str, ...] = ("promote", "rollback", "delete", "reconcile")


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
    Column("created_at", UTCDateTime(), nullable=False),
    Column("org", String(256), nullable=True),  # NULL: written before 0004, visible to nobody
    Column("model_created_ms", BigInteger, nullable=True),  # the registration; NULL: before 0006, nobody's
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
    org: str | None = None
    model_created_ms: int | None = None

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
            "org": self.org,
            "model_created_ms": self.model_created_ms,
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
        org=row.org,
        model_created_ms=row.model_created_ms,
    )


class AuditTransaction:
    """An open audit-log transaction holding the writer lock; see :meth:`AuditLog.transaction`."""

    def __init__(self, conn: Connection, model: str, owner: Owner) -> None:
        self._conn = conn
        self.model = model
        self.owner = owner

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
            "org": self.owner.org,
            "model_created_ms": self.owner.model_created_ms,
            "alias": alias,
            "from_version": from_version,
            "to_version": to_version,
            "actor": actor,
            "reason": reason,
            "action": action,
            "policy_result": json.dumps(policy_result, sort_keys=True) if policy_result is not None else None,
            "created_at": now(),
        }
        result = self._conn.execute(alias_events.insert().values(**values))
        (row_id,) = result.inserted_primary_key or (None,)
        row = self._conn.execute(select(alias_events).where(alias_events.c.id == row_id)).one()
        return _entry(row)


class AuditLog(ControlStore):
    """forgeline's append-only log of alias moves.

    Args:
        url: SQLAlchemy URL; defaults to ``registry.settings.control_db_url()``.
            The table is created on first use.
    """

    @contextmanager
    def transaction(self, model: str, *, owner: Owner) -> Iterator[AuditTransaction]:
        """Open a transaction that holds the writer lock for ``model`` until it ends.

        Rows appended in it are recorded for ``owner`` (the model's owning org and
        registration). Commits when the block exits normally; rolls back (the appended rows
        disappear) when it raises.
        """
        with self.engine.begin() as conn:
            lock_model(conn, model)  # released automatically at commit/rollback
            yield AuditTransaction(conn, model, owner)

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
        owner: Owner,
        policy_result: dict[str, Any] | None = None,
    ) -> AuditEntry:
        """Append one row for ``owner`` in its own transaction and return it."""
        with self.transaction(model, owner=owner) as tx:
            return tx.append(
                alias=alias,
                from_version=from_version,
                to_version=to_version,
                actor=actor,
                reason=reason,
                action=action,
                policy_result=policy_result,
            )

    def history(self, model: str, alias: str | None = None, *, owner: Owner) -> list[AuditEntry]:
        """Every move of ``model``'s aliases (or of one ``alias``) recorded for ``owner``, oldest first."""
        query = select(alias_events).where(alias_events.c.model == model, owned_by(alias_events, owner))
        if alias is not None:
            query = query.where(alias_events.c.alias == alias)
        # Ids follow commit order per model because moves of one model are serialised.
        query = query.order_by(alias_events.c.id)
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            return [_entry(row) for row in conn.execute(query)]

    def change_mark(self) -> tuple[int, int]:
        """``(rows, newest id)`` of the log: it changes whenever an alias move commits.

        One aggregate query on a read-only connection (it never takes the write lock), cheap
        enough for a gateway to ask twice a second whether any alias moved and only then
        re-read the aliases from MLflow (``serving.rollout``). The row count is what makes
        it sound: on PostgreSQL moves of different models take different locks, so a row
        with a lower id may commit after a higher one, and the newest id alone would not
        change; rows are never deleted, so every commit raises the count. A move's row
        commits after MLflow's alias moved (``Registry.move_alias``), so whoever sees the
        mark change then reads the new holder.
        """
        query = select(func.count(alias_events.c.id), func.max(alias_events.c.id))
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            rows, newest = conn.execute(query).one()
        return int(rows or 0), int(newest or 0)
