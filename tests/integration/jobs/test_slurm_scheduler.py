"""The Slurm launcher against a real Slurm (slurmctld + slurmd on this machine), with a
stand-in for Python so each job takes seconds: submit, status, logs, requeue, cancel.

tests/integration/jobs/test_slurm_training.py runs real training the same way.
"""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from forgeline.cli import app
from jobs import submission as jobs
from jobs.base import JobHandle, JobPhase, JobSpec
from jobs.config import ClusterSpec
from jobs.slurm import SlurmLauncher
from training.cluster_job import train_spec
from training.job import TrainJob

pytestmark = pytest.mark.integration
runner = CliRunner()


def _fake_python(folder: Path, body: str) -> Path:
    """Stands in for the nodes' Python: prints what torchrun would have been asked, then ``body``."""
    path = folder / "fake-python"
    path.write_text('#!/bin/bash\necho "attempt=${SLURM_RESTART_COUNT:-0} args: $*"\n' + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture(autouse=True)
def _slurm(slurm_cluster, on_slurm) -> None:  # type: ignore[no-untyped-def]
    on_slurm(slurm_cluster)


def _cluster(tmp_path: Path, body: str, **fields: object) -> ClusterSpec:
    return ClusterSpec(kind="slurm", gpus_per_node=0, python=str(_fake_python(tmp_path, body)), **fields)


def test_a_failed_attempt_is_requeued_and_the_next_one_succeeds(train_job: TrainJob, tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, '[ -z "$SLURM_RESTART_COUNT" ] && exit 1\nexit 0\n', max_restarts=1)
    handle = jobs.submit(train_spec(train_job, cluster))
    record = jobs.wait(handle.id, poll_s=0.5, timeout_s=120)
    log = jobs.job_logs(handle.id)
    assert record.status.phase is JobPhase.SUCCEEDED, log
    assert record.status.restarts == 1
    assert record.status.nodes == ["fl1"]
    assert "attempt 1 failed with status 1; requeueing job" in log
    assert "attempt=0 args: -m torch.distributed.run" in log and "attempt=1 args: -m torch.distributed.run" in log
    for flag in ("--nnodes=1", "--nproc-per-node=1", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:29500",
                 "--rdzv-conf=is_host=true", "--local-addr=127.0.0.1", f"-m training.entry {handle.job_dir}/job.json"):
        assert flag in log, flag


def test_a_job_out_of_restarts_fails_with_its_exit_code(train_job: TrainJob, tmp_path: Path) -> None:
    handle = jobs.submit(train_spec(train_job, _cluster(tmp_path, "exit 3\n", max_restarts=0)))
    record = jobs.wait(handle.id, poll_s=0.5, timeout_s=120)
    assert (record.status.phase, record.status.restarts) == (JobPhase.FAILED, 0)
    assert SlurmLauncher().status(record.handle).exit_code == 3
    assert "requeue" not in jobs.job_logs(handle.id)


def test_cancel_through_the_cli(train_job: TrainJob, tmp_path: Path) -> None:
    handle = jobs.submit(train_spec(train_job, _cluster(tmp_path, "sleep 120\n")))
    deadline = time.monotonic() + 60
    while jobs.refresh(handle.id).status.phase is not JobPhase.RUNNING and time.monotonic() < deadline:
        time.sleep(0.2)
    listing = runner.invoke(app, ["jobs", "list", "--kind", "slurm"])
    assert handle.id in listing.output and "running" in listing.output, listing.output
    result = runner.invoke(app, ["jobs", "cancel", handle.id])
    assert result.exit_code == 0, result.output
    launcher, deadline = SlurmLauncher(), time.monotonic() + 30
    while (status := launcher.status(handle)).phase is JobPhase.RUNNING and time.monotonic() < deadline:
        time.sleep(0.2)  # COMPLETING: Slurm is stopping the job's processes
    assert status.phase is JobPhase.CANCELLED, status
    shown = runner.invoke(app, ["jobs", "status", handle.id])
    assert "cancelled" in shown.output and f"slurm ({handle.backend_id})" in shown.output


def test_an_evaluation_job_is_one_slurm_task_running_the_plain_command(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, 'echo "evaluated on $SLURM_JOB_NODELIST"\n')
    spec = JobSpec(stage="evaluate", name="m", command=["-m", "forgeline", "evaluate", "m", "3"], cluster=cluster)
    handle = jobs.submit(spec)
    record = jobs.wait(handle.id, poll_s=0.5, timeout_s=120)
    log = jobs.job_logs(handle.id)
    assert (record.handle.stage, record.status.phase, record.status.nodes) == ("evaluate", JobPhase.SUCCEEDED, ["fl1"]), log
    assert "attempt=0 args: -m forgeline evaluate m 3" in log and "evaluated on fl1" in log
    assert "torch.distributed.run" not in log
    assert (Path(handle.job_dir) / "evaluate.sbatch").is_file() and not (Path(handle.job_dir) / "train-node.sh").exists()


def test_a_job_slurm_does_not_know_is_unknown_without_accounting(train_job: TrainJob) -> None:
    handle = JobHandle(id="fl-gone", kind="slurm", backend_id="999999", name="m", job_dir="/nonexistent",
                       output_dir="/nonexistent", cluster=ClusterSpec(kind="slurm"))
    status = SlurmLauncher().status(handle)
    assert status.phase is JobPhase.UNKNOWN and "sacct" in status.detail


def test_forgeline_train_reports_a_failed_cluster_job_with_its_log(tmp_path: Path) -> None:
    data = Path(__file__).resolve().parents[3] / "recipes" / "data" / "support-tickets"
    fake = _fake_python(tmp_path, 'echo "CUDA error: out of memory" >&2\nexit 1\n')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: doomed\nmodel: {{base: {data.parents[2] / 'assets' / 'tiny-base'}}}\n"
        f"data: {{train: {data / 'train.jsonl'}}}\n"
        f"cluster: {{kind: slurm, gpus_per_node: 0, max_restarts: 0, python: {fake}}}\n"
    )
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 1, result.output
    assert "failed" in result.output and "CUDA error: out of memory" in result.output
    assert "submitting the recipe again resumes" in result.output
