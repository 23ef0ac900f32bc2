"""Whose governance rows: the owning org of a model *and* which registration of its name.

Approvals and alias-audit rows are keyed by model name, but a name outlives the model:
MLflow can delete a registered model and register the name again (by another org, or by
the same one). :class:`Owner` names both the org that owns the model now and the
incarnation, MLflow's ``creation_timestamp`` of the registered model (ms since epoch; a
model registered again gets a new one). Rows are written for an ``Owner`` and read back only
for the same one, so a new model never inherits the old one's decisions or alias history.
The value is MLflow's own, compared for equality only: no clocks are compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, Table, and_


@dataclass(frozen=True)
class Owner:
    """The owning org of a registered model and the registration it belongs to."""

    org: str
    model_created_ms: int

    def __post_init__(self) -> None:
        if not self.org:
            raise ValueError("a governance row needs the model's owning org")

    @property
    def registered_at(self) -> datetime:
        """When MLflow registered the model (UTC), by MLflow's clock."""
        return datetime.fromtimestamp(self.model_created_ms / 1000, UTC)


def owned_by(table: Table, owner: Owner) -> ColumnElement[bool]:
    """The rows of ``table`` that belong to ``owner`` (its org and its registration of the model)."""
    return and_(table.c.org == owner.org, table.c.model_created_ms == owner.model_created_ms)
