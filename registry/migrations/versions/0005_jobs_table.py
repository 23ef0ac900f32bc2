"""The job table holds jobs of every stage, so ``training_jobs`` becomes ``jobs``.

Revision ID: 0005_jobs_table
Revises: 0004_governance_org
Create Date: 2026-12-02

A rename keeps every row; its index follows (``ix_training_jobs_submitted`` →
``ix_jobs_submitted``). Downgrade renames both back.
"""

from __future__ import annotations

from alembic import op

revision = "0005_jobs_table"
down_revision = "0004_governance_org"
branch_labels = None
depends_on = None


def _rename(old: str, new: str) -> None:
    op.drop_index(f"ix_{old}_submitted", table_name=old)
    op.rename_table(old, new)
    op.create_index(f"ix_{new}_submitted", new, ["submitted_at"])


def upgrade() -> None:
    _rename("training_jobs", "jobs")


def downgrade() -> None:
    _rename("jobs", "training_jobs")
