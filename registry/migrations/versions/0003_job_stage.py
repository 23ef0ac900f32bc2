"""Jobs of every stage: ``training_jobs.stage`` says what a job does (train, evaluate, build).

Revision ID: 0003_job_stage
Revises: 0002_webhook_outbox
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_job_stage"
down_revision = "0002_webhook_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every job recorded so far was a training job.
    with op.batch_alter_table("training_jobs") as batch:
        batch.add_column(sa.Column("stage", sa.String(32), nullable=False, server_default="train"))


def downgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.drop_column("stage")
