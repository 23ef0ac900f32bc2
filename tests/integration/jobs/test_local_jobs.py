"""`forgeline jobs` on this machine: detached process groups that outlive the command that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from forgeline.cli import app
from jobs.base import JobHandle, JobPhase
from jobs.config import ClusterSpec
from jobs.local import (
    PROCESS_FILE,
    ProcessRecord,
    _start_ticks,
    process_alive,
    process_status,
    spawn_detached,
)
from jobs.store import JobStore
from registry.client import Registry

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
runner = CliRunner()


def _local_job(tmp_path: Path, job_id: str, command: list[str]) -> JobHandle:
    job_dir = tmp_path / "launches" / job_id
    job_dir.mkdir(parents=True)
    record = spawn_detached(command, job_dir, {"FROM_LAUNCHER": "yes"}, log_name="train.log")
    handle = JobHandle(id=job_id, kind="local", backend_id=str(record.pid), name="m", job_dir=str(job_dir),
                       output_dir=str(tmp_path / "out"), cluster=ClusterSpec())
    JobStore().add(handle, actor="test")
    return handle


def _group_members(pgid: int, timeout: float = 5) -> list[int]:
    """Live (non-zombie) processes of a process group, after giving the reaper a moment."""
    deadline = time.monotonic() + timeout
    while True:
        members = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                    members.append(int(entry.name))
        if not members or time.monotonic() > deadline:
            return members
        time.sleep(0.1)


def _wait_finished(handle: JobHandle, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while process_status(handle).phase is JobPhase.RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)


def test_exit_status_and_output_of_a_detached_job(tmp_path: Path) -> None:
    ok = _local_job(tmp_path, "fl-ok", ["sh", "-c", 'echo "hello $FROM_LAUNCHER"'])
    bad = _local_job(tmp_path, "fl-bad", ["sh", "-c", "echo oops >&2; exit 3"])
    for handle in (ok, bad):
        _wait_finished(handle)
    assert (process_status(ok).phase, process_status(ok).exit_code) == (JobPhase.SUCCEEDED, 0)
    assert (process_status(bad).phase, process_status(bad).exit_code) == (JobPhase.FAILED, 3)
    result = runner.invoke(app, ["jobs", "logs", "fl-ok"])
    assert result.exit_code == 0 and result.output == "hello yes\n"
    assert "oops" in runner.invoke(app, ["jobs", "logs", "fl-bad"]).output


def test_status_logs_and_cancel_through_the_cli(tmp_path: Path) -> None:
    handle = _local_job(tmp_path, "fl-261129-sleepy", ["sh", "-c", "echo started; sleep 60"])
    record = ProcessRecord.model_validate_json((Path(handle.job_dir) / PROCESS_FILE).read_text())
    status = runner.invoke(app, ["jobs", "status", "fl-261129-sle"])
    assert status.exit_code == 0, status.output
    assert "fl-261129-sleepy m on local" in status.output and "running" in status.output
    cancelled = runner.invoke(app, ["jobs", "cancel", "fl-261129-sleepy"])
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.output
    assert not process_alive(record)
    assert _group_members(record.pid) == []  # the whole group is gone, `sleep` included
    listing = runner.invoke(app, ["jobs", "list"])
    assert "fl-261129-sleepy" in listing.output and "cancelled" in listing.output


def test_a_killed_job_is_failed_not_running(tmp_path: Path) -> None:
    handle = _local_job(tmp_path, "fl-killed", ["sleep", "60"])
    record = ProcessRecord.model_validate_json((Path(handle.job_dir) / PROCESS_FILE).read_text())
    os.killpg(record.pid, signal.SIGKILL)
    _wait_finished(handle)
    status = process_status(handle)
    assert status.phase is JobPhase.FAILED and "without an exit status" in status.detail


def test_a_reused_process_id_is_not_taken_for_the_job(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert process_alive(ProcessRecord(pid=proc.pid, start_ticks=_start_ticks(proc.pid)))
        assert not process_alive(ProcessRecord(pid=proc.pid, start_ticks=1))  # same id, another start time
    finally:
        proc.kill()
        proc.wait()


def test_unknown_job_ids_fail_with_the_fix() -> None:
    result = runner.invoke(app, ["jobs", "status", "fl-missing"])
    assert result.exit_code == 1
    assert "no job 'fl-missing'" in result.output and "forgeline jobs list" in result.output


@pytest.mark.slow
def test_detached_local_training_registers_one_version(tmp_path: Path, small_data: tuple[Path, Path]) -> None:
    train, eval_ = small_data
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: detached\nmodel: {{base: {REPO / 'assets' / 'tiny-base'}}}\n"
        f"data: {{train: {train}, eval: {eval_}}}\n"
        "adapter: {kind: lora, r: 4, alpha: 8}\n"
        "train: {max_steps: 2, batch_size: 4, max_length: 64, logging_steps: 1, save_steps: 2}\n"
    )
    submitted = runner.invoke(app, ["train", str(recipe), "--detach"])
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.output.split()[1]
    waited = runner.invoke(app, ["jobs", "wait", job_id, "--timeout", "300"])
    assert waited.exit_code == 0, waited.output + runner.invoke(app, ["jobs", "logs", job_id, "--tail", "40"]).output
    assert "registered detached version 1" in waited.output
    assert [v.version for v in Registry().list_versions("detached")] == [1]
