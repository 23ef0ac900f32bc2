"""Submitted jobs of every stage, kept in forgeline's control database (table ``jobs``).

One row per job: its handle (stage, kind, scheduler id, folders, cluster section) and the last
status anyone saw, so ``forgeline jobs list`` answers without asking every scheduler and
any process (the CLI later, the control plane) can follow or cancel a job it did not submit.
The table lives beside the audit log and keys (``registry.settings.control_db_url()``); the
``stage`` column says what a job does (train, evaluate, build).
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import JSON, Column, Engine, Index, Integer, String, Table, Text, insert, select, update

from registry import settings
from registry.db import READ_ONLY, UTCDateTime, create_control_engine, metadata, now
from registry.errors import NotFoundError

from .base import JobHandle, JobPhase, JobStatus
from .config import ClusterSpec

log = logging.getLogger(__name__)

jobs_table = Table(
    "jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("stage", String(32), nullable=False, server_default="train"),
    Column("backend_id", String(256), nullable=False),
    Column("phase", String(32), nullable=False),
    Column("detail", Text, nullable=False, default=""),
    Column("restarts", Integer, nullable=False, default=0),
    Column("nodes", JSON, nullable=False, default=list),
    Column("exit_code", Integer, nullable=True),
    Column("version", Integer, nullable=True),
    Column("run_id", String(64), nullable=True),
    Column("resumed_from_step", Integer, nullable=False, default=0),
    Column("job_dir", Text, nullable=False),
    Column("output_dir", Text, nullable=False),
    Column("cluster", JSON, nullable=False),
    Column("actor", String(256), nullable=False),
    Column("submitted_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Index("ix_jobs_submitted", "submitted_at"),
)


class JobRecord:
    """A stored job: its handle and the last status seen."""

    def __init__(self, row: object) -> None:
        m = row._mapping  # type: ignore[attr-defined]
        self.handle = JobHandle(
            id=m["id"], kind=m["kind"], backend_id=m["backend_id"], name=m["name"], job_dir=m["job_dir"],
            output_dir=m["output_dir"], cluster=ClusterSpec.model_validate(m["cluster"]), submitted_at=m["submitted_at"],
            stage=m["stage"],
        )
        self.status = JobStatus(
            phase=JobPhase(m["phase"]), detail=m["detail"], restarts=m["restarts"], nodes=m["nodes"] or [],
            exit_code=m["exit_code"], version=m["version"], run_id=m["run_id"], resumed_from_step=m["resumed_from_step"],
        )
        self.actor: str = m["actor"]
        self.updated_at: datetime = m["updated_at"]

    @property
    def id(self) -> str:
        return self.handle.id


class JobStore:
    """The job table (SQLite by default, PostgreSQL for teams)."""

    def __init__(self, url: str | None = None, engine: Engine | None = None) -> None:
        self.engine = engine or create_control_engine(url or settings.control_db_url())

    def add(self, handle: JobHandle, *, actor: str, status: JobStatus | None = None) -> None:
        """Record a job just submitted."""
        status = status or JobStatus(phase=JobPhase.PENDING, detail="submitted")
        with self.engine.begin() as conn:
            conn.execute(
                insert(jobs_table).values(
                    id=handle.id, name=handle.name, kind=handle.kind, stage=handle.stage, backend_id=handle.backend_id,
                    phase=status.phase.value, detail=status.detail, restarts=status.restarts, nodes=status.nodes,
                    exit_code=status.exit_code, version=status.version, resumed_from_step=status.resumed_from_step,
                    run_id=status.run_id, job_dir=handle.job_dir, output_dir=handle.output_dir,
                    cluster=handle.cluster.model_dump(mode="json"), actor=actor,
                    submitted_at=handle.submitted_at, updated_at=now(),
                )
            )

    def update(self, job_id: str, status: JobStatus) -> None:
        """Keep the status just seen (a version once found is never forgotten)."""
        values: dict[str, object] = {
            "phase": status.phase.value, "detail": status.detail, "restarts": status.restarts, "updated_at": now(),
            "exit_code": status.exit_code,
        }
        if status.nodes:  # schedulers stop naming the nodes of a finished job; keep the last ones seen
            values["nodes"] = status.nodes
        if status.version is not None:
            values.update(version=status.version, run_id=status.run_id, resumed_from_step=status.resumed_from_step)
        with self.engine.begin() as conn:
            conn.execute(update(jobs_table).where(jobs_table.c.id == job_id).values(**values))

    def get(self, job_id: str) -> JobRecord:
        """One job by id, or by a unique prefix of it.

        Raises:
            NotFoundError: no job (or more than one) matches.
        """
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            row = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).first()
            if row is None:
                rows = conn.execute(select(jobs_table).where(jobs_table.c.id.startswith(job_id, autoescape=True))).all()
                if len(rows) == 1:
                    row = rows[0]
                elif rows:
                    raise NotFoundError(f"job id {job_id!r} is ambiguous ({len(rows)} jobs); fix: give more of it", param="job_id")
        if row is None:
            raise NotFoundError(f"no job {job_id!r}; fix: see `forgeline jobs list`", param="job_id")
        return JobRecord(row)

    def list_jobs(self, *, kind: str | None = None, name: str | None = None, stage: str | None = None,
                  limit: int = 50) -> list[JobRecord]:
        """The newest jobs first."""
        query = select(jobs_table).order_by(jobs_table.c.submitted_at.desc()).limit(limit)
        if stage:
            query = query.where(jobs_table.c.stage == stage)
        if kind:
            query = query.where(jobs_table.c.kind == kind)
        if name:
            query = query.where(jobs_table.c.name == name)
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            return [JobRecord(row) for row in conn.execute(query)]

    def active_for_output(self, output_dir: str) -> list[JobRecord]:
        """Unfinished jobs that write into ``output_dir`` (one recipe's checkpoints, one build's artifact)."""
        finished = [p.value for p in JobPhase if p.finished]
        query = select(jobs_table).where(jobs_table.c.output_dir == output_dir, jobs_table.c.phase.not_in(finished))
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            return [JobRecord(row) for row in conn.execute(query)]
