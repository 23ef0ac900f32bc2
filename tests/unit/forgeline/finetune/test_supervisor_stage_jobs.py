"""The supervisor's evaluation and build jobs: reserved before they are submitted, submitted once,
adopted by a control plane started again, followed until they end (no scheduler runs here)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from forgeline.finetune.supervisor import Supervisor
from forgeline.stage_jobs import build_spec, evaluate_spec
from jobs import submission
from jobs.base import JobHandle, JobPhase, JobSpec, JobStatus
from jobs.config import ClusterSpec
from jobs.store import JobStore


class _Events:
    """The fine-tuning store's event log, as far as the supervisor's stage jobs use it (one event per key)."""

    def __init__(self) -> None:
        self.events: dict[str, str] = {}

    def add_event(self, job_id: str, key: str, message: str, **_: Any) -> None:
        self.events.setdefault(key, message)

    def event_keys(self, job_id: str) -> set[str]:
        return set(self.events)


class _Scheduler:
    """A launcher that records submissions and answers a phase set by the test."""

    kind = "slurm"

    def __init__(self) -> None:
        self.submitted: list[JobSpec] = []
        self.phase = JobPhase.RUNNING

    def submit(self, spec: JobSpec) -> JobHandle:
        self.submitted.append(spec)
        return JobHandle(id=spec.id, kind=self.kind, backend_id=str(100 + len(self.submitted)), name=spec.name,
                         job_dir=f"/shared/launches/{spec.id}", output_dir=f"/shared/launches/{spec.id}",
                         cluster=spec.cluster, stage=spec.stage)

    def status(self, handle: JobHandle) -> JobStatus:
        return JobStatus(phase=self.phase, detail=self.phase.value.upper())


@pytest.fixture
def scheduler(monkeypatch: pytest.MonkeyPatch) -> _Scheduler:
    fake = _Scheduler()
    monkeypatch.setattr(submission, "get_launcher", lambda kind: fake)
    return fake


def _plane() -> Supervisor:
    """A supervisor over the shared event log and job store (a new one is a restarted control plane)."""
    return Supervisor(SimpleNamespace(store=_EVENTS, launches=JobStore()))  # type: ignore[arg-type]


_EVENTS = _Events()
JOB = SimpleNamespace(id="ftjob-abc", attempt=1, created_by="tess",
                      cluster=ClusterSpec(kind="slurm", gpus_per_node=1).model_dump(mode="json"))


def _evaluate(supervisor: Supervisor) -> Any:
    return supervisor._stage_job(JOB, "evaluate", _EVENTS.event_keys(JOB.id),  # type: ignore[arg-type]
                                 lambda job_id, cluster: evaluate_spec("ft-m", 1, cluster, job_id=job_id), "Evaluation")


def test_an_evaluation_job_is_reserved_submitted_once_adopted_and_followed(scheduler: _Scheduler) -> None:
    _EVENTS.events.clear()
    assert _evaluate(_plane()) is None  # submitted; it runs
    assert _EVENTS.events["evaluate-job"] == "Evaluation runs as job ftjob-abc-1-evaluate on slurm"
    (spec,) = scheduler.submitted
    assert (spec.id, spec.stage, spec.command) == ("ftjob-abc-1-evaluate", "evaluate",
                                                  ["-m", "forgeline", "evaluate", "ft-m", "1"])
    assert spec.cluster.gpus_per_node == 1 and not spec.torchrun

    restarted = _plane()
    assert _evaluate(restarted) is None and len(scheduler.submitted) == 1  # adopted, not submitted again
    scheduler.phase = JobPhase.SUCCEEDED
    record = _evaluate(restarted)
    assert record.id == "ftjob-abc-1-evaluate" and record.status.phase is JobPhase.SUCCEEDED
    assert JobStore().get("ftjob-abc-1-evaluate").handle.stage == "evaluate"


def test_a_reserved_job_the_store_does_not_know_is_submitted(scheduler: _Scheduler) -> None:
    # The control plane stopped between the reservation and the submission.
    _EVENTS.events.clear()
    _EVENTS.events["build-job"] = "Serving artifact build runs as job ftjob-abc-1-build on slurm"
    ended = _plane()._stage_job(JOB, "build", _EVENTS.event_keys(JOB.id),  # type: ignore[arg-type]
                                lambda job_id, cluster: build_spec("ft-m", 1, cluster, job_id=job_id), "Build")
    assert ended is None
    (spec,) = scheduler.submitted
    assert spec.id == "ftjob-abc-1-build" and spec.command[-4:] == ["build", "ft-m@1", "--target", "torch"]


def test_a_refused_submission_is_reported_not_retried_forever(monkeypatch: pytest.MonkeyPatch, scheduler: _Scheduler) -> None:
    from jobs.base import LaunchError

    def refuse(spec: JobSpec) -> JobHandle:
        raise LaunchError("sbatch: error: invalid partition specified: h200")

    _EVENTS.events.clear()
    monkeypatch.setattr(scheduler, "submit", refuse)
    assert "invalid partition" in _evaluate(_plane())
