"""Approvals and audit rows record which registration of the model they belong to (``model_created_ms``).

Revision ID: 0006_model_incarnation
Revises: 0005_jobs_table
Create Date: 2026-12-02

The value is MLflow's ``creation_timestamp`` of the registered model (ms since epoch): a
model deleted and registered again under its name gets a new one, so its rows are told
apart from the old model's. Rows already there get NULL and count for nobody until
``registry.legacy_orgs`` claims them (``forgeline db upgrade``, the control plane's start).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_model_incarnation"
down_revision = "0005_jobs_table"
branch_labels = None
depends_on = None

TABLES = ("approvals", "alias_events")
COLUMN = "model_created_ms"


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for name in TABLES:
        if COLUMN in {c["name"] for c in inspector.get_columns(name)}:
            continue  # a table ``create_all`` made from today's declaration (tests) has it already
        with op.batch_alter_table(name) as batch:
            batch.add_column(sa.Column(COLUMN, sa.BigInteger(), nullable=True))


def downgrade() -> None:
    for name in TABLES:
        with op.batch_alter_table(name) as batch:
            batch.drop_column(COLUMN)
