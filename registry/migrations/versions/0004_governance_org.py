"""Approvals and audit rows record the organisation that owned the model (column ``org``).

Revision ID: 0004_governance_org
Revises: 0003_job_stage
Create Date: 2026-12-02

Rows already there get NULL: the owner when they were written is not in this database
(it is an MLflow tag), so they count for nobody until ``registry.legacy_orgs`` claims them
from the registry (``forgeline db upgrade``, the control plane's start).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_governance_org"
down_revision = "0003_job_stage"
branch_labels = None
depends_on = None

TABLES = ("approvals", "alias_events")


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for name in TABLES:
        if "org" in {c["name"] for c in inspector.get_columns(name)}:
            continue  # a table ``create_all`` made from today's declaration (tests) has it already
        with op.batch_alter_table(name) as batch:
            batch.add_column(sa.Column("org", sa.String(256), nullable=True))


def downgrade() -> None:
    for name in TABLES:
        with op.batch_alter_table(name) as batch:
            batch.drop_column("org")
