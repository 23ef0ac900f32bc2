"""The launcher seam: every kind behind one protocol, ids every scheduler accepts, results read once."""

from __future__ import annotations

import os
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from jobs.base import (
    JobHandle,
    JobPhase,
    JobStatus,
    Launcher,
    dns_label,
    new_job_id,
    read_log,
)
from jobs.config import ClusterSpec
from jobs.outcome import with_outcome
from jobs.submission import get_launcher
from registry.errors import ForgelineError
from training.job import RESULT_FILE, JobOutcome


@pytest.mark.parametrize("kind", ["local", "slurm", "kubernetes", "hostfile"])
def test_every_kind_has_a_launcher_behind_the_seam(kind: str) -> None:
    launcher = get_launcher(kind)
    assert isinstance(launcher, Launcher) and launcher.kind == kind


def test_unknown_kinds_are_refused() -> None:
    with pytest.raises(ForgelineError, match="use local, slurm, kubernetes or hostfile"):
        get_launcher("nomad")


def test_job_ids_are_unique_and_valid_as_slurm_and_kubernetes_names() -> None:
    ids = {new_job_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"fl-\d{6}-[0-9a-f]{6}", i) for i in ids)
    assert dns_label("Support_Router v2!") == "support-router-v2"
    assert len(dns_label("x" * 100, limit=45)) == 45


def _handle(tmp_path: Path, submitted_at: datetime) -> JobHandle:
    return JobHandle(id="fl-1", kind="slurm", backend_id="1", name="m", job_dir=str(tmp_path), output_dir=str(tmp_path),
                     cluster=ClusterSpec(kind="slurm"), submitted_at=submitted_at)


def _write_result(tmp_path: Path, version: int) -> None:
    outcome = JobOutcome(run_id="r", name="m", version=version, adapter_dir="/a", resumed_from_step=4)
    (tmp_path / RESULT_FILE).write_text(outcome.model_dump_json())


def test_the_version_comes_from_this_jobs_result(tmp_path: Path) -> None:
    _write_result(tmp_path, 7)
    status = with_outcome(JobStatus(phase=JobPhase.SUCCEEDED), _handle(tmp_path, datetime.now(UTC) - timedelta(minutes=1)))
    assert (status.version, status.run_id, status.resumed_from_step) == (7, "r", 4)


def test_an_earlier_jobs_result_is_not_taken_for_this_one(tmp_path: Path) -> None:
    _write_result(tmp_path, 6)
    old = time.time() - 3600
    os.utime(tmp_path / RESULT_FILE, (old, old))
    status = with_outcome(JobStatus(phase=JobPhase.RUNNING), _handle(tmp_path, datetime.now(UTC) - timedelta(minutes=1)))
    assert status.version is None


def test_logs_are_empty_before_the_job_writes_them_and_can_be_tailed(tmp_path: Path) -> None:
    assert read_log(tmp_path / "train.log") == ""
    (tmp_path / "train.log").write_text("a\nb\nc\n")
    assert read_log(tmp_path / "train.log", tail=2) == "b\nc\n"


def test_a_registered_version_makes_a_failed_exit_a_success(tmp_path: Path) -> None:
    # A rank aborting at exit after rank 0 registered the version must not fail the job.
    _write_result(tmp_path, 3)
    failed = JobStatus(phase=JobPhase.FAILED, detail="exited 134", exit_code=134)
    status = with_outcome(failed, _handle(tmp_path, datetime.now(UTC) - timedelta(minutes=1)))
    assert (status.phase, status.version, status.exit_code) == (JobPhase.SUCCEEDED, 3, 134)
    assert "version 3 registered" in status.detail and "exited 134" in status.detail


def test_a_failed_job_without_its_own_result_stays_failed(tmp_path: Path) -> None:
    failed = JobStatus(phase=JobPhase.FAILED, detail="exited 1", exit_code=1)
    assert with_outcome(failed, _handle(tmp_path, datetime.now(UTC))).phase is JobPhase.FAILED
    _write_result(tmp_path, 2)
    old = time.time() - 3600
    os.utime(tmp_path / RESULT_FILE, (old, old))  # an earlier job's version
    assert with_outcome(failed, _handle(tmp_path, datetime.now(UTC) - timedelta(minutes=1))).phase is JobPhase.FAILED
