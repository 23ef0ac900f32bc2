"""Approval and audit rows from before organisations were recorded: who they belong to.

Migration ``0004_governance_org`` added the ``org`` column to ``approvals`` and
``alias_events``; rows already there have NULL, because the owner of a model is an MLflow
tag that the control database never saw. The rule:

* **A NULL row counts for nobody.** Reads take only the rows of the model's current
  owner and registration (``Registry.governance_owner``), and NULL equals neither. Failing closed costs a
  re-approval or an explicit rollback target at worst; any guess could leak one
  organisation's decisions into another's gates. Counting NULL for the operator's
  ``default`` org was rejected for that reason: an org's model deleted in MLflow and
  registered again untagged by the operator would show the org's history to the operator.
* **:func:`claim` gives NULL rows to the model's current owner** when they were written
  *after* MLflow registered the model now carrying the name (``Owner.registered_at``).
  A row older than the registration belongs to a model deleted since and stays NULL, so a
  name taken over by another organisation starts empty. Rows of a model missing from
  MLflow stay NULL too.
* **Registrations** (migration ``0006_model_incarnation``, column ``model_created_ms``):
  a claimed row also gets the current registration's ``creation_timestamp``, by the same
  rule; so does a row that has an org but no registration (written between 0004 and 0006).

``forgeline db upgrade`` claims after Alembic has run, and so does the control plane when
it starts (:func:`claim` is one query when no row is NULL; a model whose rows stay NULL
costs two MLflow reads each time).
``forgeline db status`` shows how many rows are still unclaimed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, Engine, Table, func, or_, select, union, update

from registry.approvals import approvals
from registry.audit import alias_events
from registry.client import Registry
from registry.db import READ_ONLY, lock_model
from registry.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

TABLES: tuple[Table, ...] = (approvals, alias_events)


@dataclass
class Claimed:
    """What :func:`claim` did: rows given an org per table, and the rows left NULL."""

    rows: dict[str, int] = field(default_factory=dict)
    left: int = 0

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def _unowned(table: Table) -> ColumnElement[bool]:
    return or_(table.c.org.is_(None), table.c.model_created_ms.is_(None))


def unclaimed(engine: Engine) -> int:
    """How many approval and audit rows of the control database at ``engine`` lack an org or a registration (nobody's)."""
    with engine.connect().execution_options(**{READ_ONLY: True}) as conn:
        return sum(int(conn.execute(select(func.count()).select_from(t).where(_unowned(t))).scalar() or 0) for t in TABLES)


def claim(registry: Registry) -> Claimed:
    """Give each row without an org or registration to its model's current owner and registration if newer than it.

    See the module docstring for the rule. Each model is updated under its writer lock, so
    a claim never interleaves with an alias move or a decision of that model.
    """
    result = Claimed(rows={t.name: 0 for t in TABLES})
    engine = registry.audit.engine
    with engine.connect().execution_options(**{READ_ONLY: True}) as conn:
        names = sorted(conn.execute(union(*(select(t.c.model).where(_unowned(t)) for t in TABLES))).scalars())
    if not names:
        return result
    for name in names:
        try:
            owner = registry.governance_owner(name)
        except ModelNotFoundError:
            logger.info("legacy governance rows of %r stay unclaimed: no such model in MLflow", name)
            continue
        since = owner.registered_at
        with engine.begin() as conn:
            lock_model(conn, name)
            for table in TABLES:
                done = conn.execute(
                    update(table)
                    .where(table.c.model == name, _unowned(table), table.c.created_at >= since)
                    # a row with an org keeps it (the owner when it was written); a NULL one gets the owner now
                    .values(org=func.coalesce(table.c.org, owner.org), model_created_ms=owner.model_created_ms)
                )
                result.rows[table.name] += done.rowcount or 0
    result.left = unclaimed(engine)
    if result.total or result.left:
        logger.info("claimed %s legacy governance rows for their models' owners; %d left to nobody", result.rows, result.left)
    return result
