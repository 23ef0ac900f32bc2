"""Append-only record of human decisions (approve / reject) on model versions.

MLflow has no approvals, so they live next to the audit log in forgeline's control
database. Rows are only ever inserted: changing one's mind is a new row, and the
*standing* decision of each person is their latest one (:func:`standing`). Who may
decide, and the no-self-approval rule, are enforced by
:func:`registry.decisions.decide`, which also checks the version exists.

**Organisations.** A decision belongs to the organisation that owned the model when it
was made (column ``org``: ``Registry.governance_owner``, i.e. ``registry.authz.owner_org``
for governance), and every read takes the owning org and returns only that org's rows. A
model deleted in MLflow and registered again under the same name by another organisation
therefore starts with no decisions: org A's standing approval of version 3 never counts
toward org B's gates. Rows written before the column existed (migration
``0004_governance_org``) have ``org`` NULL and count for **nobody** until
:mod:`registry.legacy_orgs` claims them for the model's current owner (``forgeline db
upgrade`` and the control plane's start do); see that module for why not the operator's
default org.

**Registrations.** Each row also records which registration of the model it belongs to
(column ``model_created_ms``, MLflow's ``creation_timestamp``; migration
``0006_model_incarnation``), and reads take only the current one's rows
(:class:`registry.owner.Owner`): the same org deleting the model and registering the name
again starts with no decisions either.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import BigInteger, Column, Index, Integer, String, Table, Text, select

from registry.db import READ_ONLY, ControlStore, UTCDateTime, lock_model, metadata, now
from registry.owner import Owner, owned_by

logger = logging.getLogger(__name__)

Decision = Literal["approve", "reject"]
DECISIONS: tuple[str, ...] = ("approve", "reject")

approvals = Table(
    "approvals",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(256), nullable=False),
    Column("version", Integer, nullable=False),
    Column("approver", String(256), nullable=False),
    Column("role", String(32), nullable=False),
    Column("decision", String(16), nullable=False),
    Column("comment", Text, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("org", String(256), nullable=True),  # NULL: written before 0004, counts for nobody
    Column("model_created_ms", BigInteger, nullable=True),  # the registration; NULL: before 0006, nobody's
    Index("ix_approvals_model_version", "model", "version", "id"),
)


@dataclass(frozen=True)
class Approval:
    """One recorded decision."""

    id: int
    model: str
    version: int
    approver: str
    role: str
    decision: str
    comment: str
    created_at: datetime
    org: str | None = None
    model_created_ms: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``created_at`` as ISO 8601)."""
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "approver": self.approver,
            "role": self.role,
            "decision": self.decision,
            "comment": self.comment,
            "created_at": self.created_at.isoformat(),
            "org": self.org,
            "model_created_ms": self.model_created_ms,
        }


def _approval(row: Any) -> Approval:
    return Approval(
        id=row.id,
        model=row.model,
        version=row.version,
        approver=row.approver,
        role=row.role,
        decision=row.decision,
        comment=row.comment,
        created_at=row.created_at,
        org=row.org,
        model_created_ms=row.model_created_ms,
    )


def standing(decisions: Iterable[Approval]) -> dict[str, Approval]:
    """Each person's latest decision (by row id), keyed by approver."""
    latest: dict[str, Approval] = {}
    for decision in sorted(decisions, key=lambda d: d.id):
        latest[decision.approver] = decision
    return latest


class ApprovalStore(ControlStore):
    """The ``approvals`` table.

    Args:
        url: SQLAlchemy URL; defaults to ``registry.settings.control_db_url()``.
    """

    def append(
        self, *, model: str, version: int, approver: str, role: str, decision: Decision, comment: str, owner: Owner
    ) -> Approval:
        """Insert one decision for ``owner`` (the model's owner and registration now) and return it.

        No checks beyond the decision kind; see ``decisions.decide``.
        """
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
        values = {
            "org": owner.org,
            "model_created_ms": owner.model_created_ms,
            "model": model,
            "version": version,
            "approver": approver,
            "role": role,
            "decision": decision,
            "comment": comment,
            "created_at": now(),
        }
        with self.engine.begin() as conn:
            lock_model(conn, model)  # a decision never lands in the middle of an alias move
            result = conn.execute(approvals.insert().values(**values))
            (row_id,) = result.inserted_primary_key or (None,)
            row = conn.execute(select(approvals).where(approvals.c.id == row_id)).one()
        return _approval(row)

    def for_version(self, model: str, version: int, *, owner: Owner) -> list[Approval]:
        """Every decision recorded for ``owner`` on one version, oldest first."""
        query = (
            select(approvals)
            .where(approvals.c.model == model, approvals.c.version == version, owned_by(approvals, owner))
            .order_by(approvals.c.id)
        )
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            return [_approval(row) for row in conn.execute(query)]

    def for_model(self, model: str, *, owner: Owner) -> list[Approval]:
        """Every decision recorded for ``owner`` on any version of ``model``, oldest first."""
        query = select(approvals).where(approvals.c.model == model, owned_by(approvals, owner)).order_by(approvals.c.id)
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            return [_approval(row) for row in conn.execute(query)]

