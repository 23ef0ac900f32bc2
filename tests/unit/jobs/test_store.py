"""Submitted jobs in the control database: any later command finds, follows or cancels them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from jobs import submission as jobs
from jobs.base import JobHandle, JobPhase, JobSpec, JobStatus
from jobs.config import ClusterSpec
from jobs.store import JobStore
from registry.errors import ConflictError, NotFoundError
from training.cluster_job import train_spec
from training.job import TrainJob


def _handle(job_id: str, *, minutes_ago: int = 0, output_dir: str = "/shared/jobs/m/h", kind: str = "slurm") -> JobHandle:
    cluster = ClusterSpec(kind=kind, nodes=2, gpus_per_node=0, partition="debug") if kind == "slurm" else ClusterSpec()
    return JobHandle(id=job_id, kind=kind, backend_id="42", name="m", job_dir=f"/shared/launches/{job_id}",
                     output_dir=output_dir, cluster=cluster, submitted_at=datetime.now(UTC) - timedelta(minutes=minutes_ago))


def test_a_job_round_trips_with_its_cluster_section() -> None:
    store = JobStore()
    store.add(_handle("fl-1-aaa"), actor="ana")
    record = store.get("fl-1-aaa")
    assert record.handle.cluster.partition == "debug" and record.handle.cluster.nodes == 2
    assert (record.status.phase, record.actor) == (JobPhase.PENDING, "ana")


def test_status_updates_keep_a_found_version() -> None:
    store = JobStore()
    store.add(_handle("fl-1-aaa"), actor="ana")
    store.update("fl-1-aaa", JobStatus(phase=JobPhase.SUCCEEDED, detail="COMPLETED", restarts=1, version=3, run_id="r1"))
    store.update("fl-1-aaa", JobStatus(phase=JobPhase.SUCCEEDED, detail="COMPLETED (sacct)", restarts=1))
    status = store.get("fl-1-aaa").status
    assert (status.version, status.run_id, status.restarts, status.detail) == (3, "r1", 1, "COMPLETED (sacct)")


def test_jobs_are_found_by_a_unique_prefix() -> None:
    store = JobStore()
    store.add(_handle("fl-261129-abc123"), actor="ana")
    store.add(_handle("fl-261129-abd999", output_dir="/other"), actor="ana")
    assert store.get("fl-261129-abc").id == "fl-261129-abc123"
    with pytest.raises(NotFoundError, match="ambiguous"):
        store.get("fl-261129-ab")
    with pytest.raises(NotFoundError, match="forgeline jobs list"):
        store.get("fl-nope")


def test_list_is_newest_first_and_filters() -> None:
    store = JobStore()
    store.add(_handle("fl-old", minutes_ago=10), actor="ana")
    store.add(_handle("fl-new", minutes_ago=1, output_dir="/o2"), actor="ana")
    store.add(_handle("fl-local", minutes_ago=5, output_dir="/o3", kind="local"), actor="ana")
    assert [r.id for r in store.list_jobs()] == ["fl-new", "fl-local", "fl-old"]
    assert [r.id for r in store.list_jobs(kind="local")] == ["fl-local"]


class _Recorder:
    """A launcher that only records what it is asked (the scheduler side is tested elsewhere)."""

    kind = "slurm"

    def __init__(self) -> None:
        self.submitted: list[JobSpec] = []

    def submit(self, spec: JobSpec) -> JobHandle:
        self.submitted.append(spec)
        return _handle(spec.id, output_dir=spec.output_dir or "").model_copy(update={"stage": spec.stage})

    def status(self, handle: JobHandle) -> JobStatus:
        return JobStatus(phase=JobPhase.RUNNING, detail="RUNNING")


def test_a_second_job_on_the_same_checkpoints_is_refused_until_the_first_ends(train_job: TrainJob) -> None:
    store, launcher = JobStore(), _Recorder()
    cluster = ClusterSpec(kind="slurm", shared_dir="/shared", nodes=2, gpus_per_node=0)
    first = jobs.submit(train_spec(train_job, cluster, job_id="fl-1-first"), store=store, launcher=launcher)
    assert first.output_dir == "/shared/jobs/support-router/0123456789abcdef"
    with pytest.raises(ConflictError, match="fl-1-first"):
        jobs.submit(train_spec(train_job, cluster), store=store, launcher=launcher)
    store.update(first.id, JobStatus(phase=JobPhase.CANCELLED))
    jobs.submit(train_spec(train_job, cluster, job_id="fl-1-second"), store=store, launcher=launcher)
    assert [s.id for s in launcher.submitted] == ["fl-1-first", "fl-1-second"]


def test_jobs_of_every_stage_are_kept_and_listed_by_stage(train_job: TrainJob) -> None:
    store, launcher = JobStore(), _Recorder()
    cluster = ClusterSpec(kind="slurm", shared_dir="/shared", gpus_per_node=0)
    jobs.submit(train_spec(train_job, cluster, job_id="fl-1-t"), store=store, launcher=launcher)
    for stage in ("evaluate", "build"):
        jobs.submit(JobSpec(id=f"fl-1-{stage[0]}", stage=stage, name="m", command=["-m", "forgeline", stage],
                            cluster=cluster), store=store, launcher=launcher)
    assert {r.id: r.handle.stage for r in store.list_jobs()} == {"fl-1-t": "train", "fl-1-e": "evaluate", "fl-1-b": "build"}
    assert [r.id for r in store.list_jobs(stage="evaluate")] == ["fl-1-e"]
    # A finished evaluation has no version to wait for: it is final as the scheduler last said.
    store.update("fl-1-e", JobStatus(phase=JobPhase.SUCCEEDED, detail="COMPLETED"))
    assert jobs.refresh("fl-1-e", store=store, launcher=launcher).status.phase is JobPhase.SUCCEEDED
