"""Baseline: the control-database schema as ``MetaData.create_all`` made it before migrations.

Revision ID: 0001_baseline
Revises:
Create Date: 2026-12-01

Each table is created only when missing, so an install made by ``create_all`` (all
tables, or the few its processes happened to import) upgrades in place and keeps its rows.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)  # registry.db.UTCDateTime stores this type


def _tables() -> list[tuple[sa.Table, list[sa.Index]]]:
    meta = sa.MetaData()
    alias_events = sa.Table(
        "alias_events", meta,
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("alias", sa.String(256), nullable=False),
        sa.Column("from_version", sa.Integer(), nullable=True),
        sa.Column("to_version", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("policy_result", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
    )
    api_keys = sa.Table(
        "api_keys", meta,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("roles", sa.JSON(), nullable=False),
        sa.Column("org", sa.String(256), nullable=False),
        sa.Column("models", sa.String(512), nullable=False),
        sa.Column("rpm", sa.Integer(), nullable=True),
        sa.Column("tpm", sa.Integer(), nullable=True),
        sa.Column("expires_at", _TS, nullable=True),
        sa.Column("revoked_at", _TS, nullable=True),
        sa.Column("created_at", _TS, nullable=False),
    )
    approvals = sa.Table(
        "approvals", meta,
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("approver", sa.String(256), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
    )
    base_models = sa.Table(
        "base_models", meta,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("chat_template", sa.Text(), nullable=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("adapter", sa.JSON(), nullable=False),
        sa.Column("train", sa.JSON(), nullable=False),
        sa.Column("added_by", sa.String(256), nullable=False),
        sa.Column("added_at", _TS, nullable=False),
    )
    files = sa.Table(
        "files", meta,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("org", sa.String(256), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("deleted_at", _TS, nullable=True),
    )
    fine_tuning_events = sa.Table(
        "fine_tuning_events", meta,
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.UniqueConstraint("job_id", "key", name="uq_fine_tuning_events_job_key"),
    )
    fine_tuning_jobs = sa.Table(
        "fine_tuning_jobs", meta,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("org", sa.String(256), nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("training_file", sa.String(64), nullable=False),
        sa.Column("validation_file", sa.String(64), nullable=True),
        sa.Column("method", sa.JSON(), nullable=False),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("suffix", sa.String(64), nullable=True),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("integrations", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("registered_name", sa.String(256), nullable=False),
        sa.Column("fine_tuned_model", sa.String(256), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("run_id", sa.String(64), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("launcher_job_id", sa.String(64), nullable=True),
        sa.Column("train_job", sa.JSON(), nullable=False),
        sa.Column("cluster", sa.JSON(), nullable=False),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("trained_tokens", sa.Integer(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("finished_at", _TS, nullable=True),
    )
    training_jobs = sa.Table(
        "training_jobs", meta,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("backend_id", sa.String(256), nullable=False),
        sa.Column("phase", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("restarts", sa.Integer(), nullable=False),
        sa.Column("nodes", sa.JSON(), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("run_id", sa.String(64), nullable=True),
        sa.Column("resumed_from_step", sa.Integer(), nullable=False),
        sa.Column("job_dir", sa.Text(), nullable=False),
        sa.Column("output_dir", sa.Text(), nullable=False),
        sa.Column("cluster", sa.JSON(), nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("submitted_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
    )
    return [
        (alias_events, [sa.Index("ix_alias_events_model_alias", alias_events.c.model, alias_events.c.alias, alias_events.c.id)]),
        (api_keys, [sa.Index("ix_api_keys_prefix", api_keys.c.prefix)]),
        (approvals, [sa.Index("ix_approvals_model_version", approvals.c.model, approvals.c.version, approvals.c.id)]),
        (base_models, []),
        (files, [sa.Index("ix_files_org_created", files.c.org, files.c.created_at), sa.Index("ix_files_sha256", files.c.sha256)]),
        (fine_tuning_events, [sa.Index("ix_fine_tuning_events_job_seq", fine_tuning_events.c.job_id, fine_tuning_events.c.seq)]),
        (fine_tuning_jobs, [sa.Index("ix_fine_tuning_jobs_org_created", fine_tuning_jobs.c.org, fine_tuning_jobs.c.created_at)]),
        (training_jobs, [sa.Index("ix_training_jobs_submitted", training_jobs.c.submitted_at)]),
    ]


def upgrade() -> None:
    bind = op.get_bind()
    existing = set(sa.inspect(bind).get_table_names())
    for tbl, _indexes in _tables():
        if tbl.name in existing:
            continue  # made by create_all before migrations existed: keep it and its rows
        tbl.create(bind)  # with its indexes, which are bound to its columns


def downgrade() -> None:
    for tbl, _ in reversed(_tables()):
        op.drop_table(tbl.name)
