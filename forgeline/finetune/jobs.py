"""Fine-tuning jobs and their events, kept in the control database.

A job row holds what the customer asked for (base model, files, method, hyper-parameters
as resolved), the ``TrainJob`` built from it, and where it is: ``status`` in OpenAI's
words, the launcher job of the current attempt (``jobs.id``), the registered
version once there is one. Events are append-only; each has a ``key`` unique per job, so
whoever writes an event twice (a control plane restarted mid-way, two replicas) writes
it once. Status changes are compare-and-set: a cancel racing the supervisor's submit
cannot be lost.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from registry.db import READ_ONLY, ControlStore, UTCDateTime, metadata, now
from registry.errors import NotFoundError

QUEUED = "queued"
RUNNING = "running"
PAUSED = "paused"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
ACTIVE = (QUEUED, RUNNING)
"""Statuses the supervisor drives forward."""
FINISHED = (SUCCEEDED, FAILED, CANCELLED)

fine_tuning_jobs = Table(
    "fine_tuning_jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("org", String(256), nullable=False),
    Column("created_by", String(256), nullable=False),
    Column("model", String(256), nullable=False),
    Column("training_file", String(64), nullable=False),
    Column("validation_file", String(64), nullable=True),
    Column("method", JSON, nullable=False),
    Column("hyperparameters", JSON, nullable=False),
    Column("suffix", String(64), nullable=True),
    Column("seed", Integer, nullable=False),
    Column("integrations", JSON, nullable=False, default=list),
    Column("metadata", JSON, nullable=True),
    Column("status", String(32), nullable=False),
    Column("registered_name", String(256), nullable=False),
    Column("fine_tuned_model", String(256), nullable=True),
    Column("version", Integer, nullable=True),
    Column("run_id", String(64), nullable=True),
    Column("attempt", Integer, nullable=False, default=1),
    Column("launcher_job_id", String(64), nullable=True),
    Column("train_job", JSON, nullable=False),
    Column("cluster", JSON, nullable=False),
    Column("error", JSON, nullable=True),
    Column("trained_tokens", Integer, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime(), nullable=True),
    Index("ix_fine_tuning_jobs_org_created", "org", "created_at"),
)

fine_tuning_events = Table(
    "fine_tuning_events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("job_id", String(64), nullable=False),
    Column("key", String(128), nullable=False),
    Column("level", String(16), nullable=False),
    Column("type", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("data", JSON, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    UniqueConstraint("job_id", "key", name="uq_fine_tuning_events_job_key"),
    Index("ix_fine_tuning_events_job_seq", "job_id", "seq"),
)


def new_id(prefix: str) -> str:
    """``ftjob-…`` / ``ftevent-…``: a prefix and 24 random hex digits (lower case: valid in
    Slurm job names and Kubernetes object names)."""
    return f"{prefix}-{secrets.token_hex(12)}"


@dataclass(frozen=True)
class NewJob:
    """What the customer asked for, resolved: the columns ``FineTuningStore.create`` writes."""

    id: str
    org: str
    created_by: str
    model: str
    training_file: str
    validation_file: str | None
    method: dict[str, Any]
    hyperparameters: dict[str, Any]
    suffix: str | None
    seed: int
    integrations: list[dict[str, Any]]
    metadata: dict[str, str] | None
    registered_name: str
    train_job: dict[str, Any]
    cluster: dict[str, Any]


@dataclass(frozen=True)
class JobRow(NewJob):
    """One fine-tuning job as stored: the request plus where the job is."""

    status: str
    fine_tuned_model: str | None
    version: int | None
    run_id: str | None
    attempt: int
    launcher_job_id: str | None
    error: dict[str, Any] | None
    trained_tokens: int | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> JobRow:
        return cls(**{name: row._mapping[name] for name in cls.__dataclass_fields__})

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass(frozen=True)
class EventRow:
    seq: int
    id: str
    job_id: str
    key: str
    level: str
    type: str
    message: str
    data: dict[str, Any] | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> EventRow:
        return cls(**{name: row._mapping[name] for name in cls.__dataclass_fields__})


class FineTuningStore(ControlStore):
    """The ``fine_tuning_jobs`` and ``fine_tuning_events`` tables (SQLite or PostgreSQL)."""

    def create(self, job: NewJob, *, first_events: Sequence[tuple[str, str]] = ()) -> JobRow:
        """Store a new ``queued`` job and its first events (``(key, message)``) in one transaction."""
        at = now()
        with self.engine.begin() as conn:
            conn.execute(
                insert(fine_tuning_jobs).values(
                    **asdict(job), status=QUEUED, attempt=1, created_at=at, updated_at=at
                )
            )
            for key, message in first_events:
                conn.execute(insert(fine_tuning_events).values(
                    id=new_id("ftevent"), job_id=job.id, key=key, level="info", type="message", message=message,
                    data=None, created_at=at,
                ))
        return self.get(job.id)

    def get(self, job_id: str, *, org: str | None = None) -> JobRow:
        """One job; with ``org``, another organisation's job is reported as missing.

        Raises:
            NotFoundError: no such job (for this organisation).
        """
        query = select(fine_tuning_jobs).where(fine_tuning_jobs.c.id == job_id)
        if org is not None:
            query = query.where(fine_tuning_jobs.c.org == org)
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            row = conn.execute(query).first()
        if row is None:
            raise NotFoundError(
                f"no fine-tuning job {job_id!r}; fix: list yours with `client.fine_tuning.jobs.list()`",
                param="fine_tuning_job_id",
            )
        return JobRow.from_row(row)

    def list_jobs(self, org: str, *, after: str | None = None, limit: int = 20,
                  metadata_filter: dict[str, str] | None = None) -> tuple[list[JobRow], bool]:
        """The organisation's jobs, newest first, starting after job ``after``; and whether more follow."""
        query = select(fine_tuning_jobs).where(fine_tuning_jobs.c.org == org)
        if after:
            cursor = self.get(after, org=org)
            query = query.where(
                (fine_tuning_jobs.c.created_at < cursor.created_at)
                | ((fine_tuning_jobs.c.created_at == cursor.created_at) & (fine_tuning_jobs.c.id < cursor.id))
            )
        query = query.order_by(fine_tuning_jobs.c.created_at.desc(), fine_tuning_jobs.c.id.desc())
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            rows = [JobRow.from_row(r) for r in conn.execute(query)]
        if metadata_filter:  # JSON columns do not compare alike on SQLite and PostgreSQL: filter here
            rows = [r for r in rows if all((r.metadata or {}).get(k) == v for k, v in metadata_filter.items())]
        return rows[:limit], len(rows) > limit

    def active(self) -> list[JobRow]:
        """Jobs the supervisor still has to drive (queued or running), oldest first."""
        query = (select(fine_tuning_jobs).where(fine_tuning_jobs.c.status.in_(ACTIVE))
                 .order_by(fine_tuning_jobs.c.created_at))
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            return [JobRow.from_row(r) for r in conn.execute(query)]

    def using_file(self, org: str, file_id: str) -> list[JobRow]:
        """The organisation's jobs that train or validate on ``file_id``, oldest first."""
        c = fine_tuning_jobs.c
        query = (select(fine_tuning_jobs).where(c.org == org, (c.training_file == file_id) | (c.validation_file == file_id))
                 .order_by(c.created_at))
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            return [JobRow.from_row(r) for r in conn.execute(query)]

    def orgs_registering(self, registered_name: str) -> set[str]:
        """The organisations whose jobs register versions into ``registered_name``."""
        c = fine_tuning_jobs.c
        query = select(c.org).where(c.registered_name == registered_name).distinct()
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            return {row.org for row in conn.execute(query)}

    def transition(self, job_id: str, *, from_status: tuple[str, ...], **values: Any) -> bool:
        """Set ``values`` only while the job is in one of ``from_status`` (compare-and-set).

        Returns:
            Whether the row changed; False means someone else moved the job first.
        """
        values["updated_at"] = now()
        if values.get("status") in FINISHED:
            values.setdefault("finished_at", values["updated_at"])
        with self.engine.begin() as conn:
            result = conn.execute(
                update(fine_tuning_jobs)
                .where(fine_tuning_jobs.c.id == job_id, fine_tuning_jobs.c.status.in_(from_status))
                .values(**values)
            )
        return bool(result.rowcount)

    def add_event(self, job_id: str, key: str, message: str, *, level: str = "info", type: str = "message",
                  data: dict[str, Any] | None = None) -> bool:
        """Append an event unless one with ``key`` exists already; returns whether it was new."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(fine_tuning_events).values(
                    id=new_id("ftevent"), job_id=job_id, key=key, level=level, type=type, message=message,
                    data=data, created_at=now(),
                ))
        except IntegrityError:
            return False
        return True

    def event_keys(self, job_id: str) -> set[str]:
        """The keys of a job's events so far (what has already been reported)."""
        query = select(fine_tuning_events.c.key).where(fine_tuning_events.c.job_id == job_id)
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            return set(conn.execute(query).scalars())

    def events(self, job_id: str, *, after: str | None = None, limit: int = 20) -> tuple[list[EventRow], bool]:
        """A job's events newest first (as OpenAI lists them), after event id ``after``; and whether more follow."""
        query = select(fine_tuning_events).where(fine_tuning_events.c.job_id == job_id)
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            if after:
                seq = conn.execute(select(fine_tuning_events.c.seq).where(
                    fine_tuning_events.c.job_id == job_id, fine_tuning_events.c.id == after)).scalar()
                if seq is None:
                    raise NotFoundError(f"no event {after!r} in job {job_id}; fix: pass an event id from this job",
                                        param="after")
                query = query.where(fine_tuning_events.c.seq < seq)
            rows = conn.execute(query.order_by(fine_tuning_events.c.seq.desc()).limit(limit + 1)).all()
        return [EventRow.from_row(r) for r in rows[:limit]], len(rows) > limit
