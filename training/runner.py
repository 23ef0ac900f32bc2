"""Running a training job in the foreground, and the command its processes run.

``ForegroundRunner`` runs one process in this interpreter, and several with ``torchrun``
on this machine, and waits for the registered version (``forgeline train`` without a
cluster). Jobs that outlive the command (``--detach``, Slurm, Kubernetes, a hostfile) go
through ``jobs`` with the same command (see ``training.cluster_job``).
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from jobs.base import JOB_FILE, torchrun_command
from jobs.outcome import RESULT_FILE, read_outcome
from registry.client import Registry
from registry.errors import ErrorCode, ForgelineError
from registry.settings import private_dir

from .checkpoints import write_atomic
from .data import load_data
from .job import JobOutcome, TrainJob, TrainResult, run_job

log = logging.getLogger(__name__)


class TrainingFailed(ForgelineError):
    code = ErrorCode.INTERNAL


def entry_command(job_file: Path | str) -> list[str]:
    """The per-process arguments every launcher runs after the interpreter (and its own ``torchrun`` arguments)."""
    return ["-m", "training.entry", str(job_file)]


def write_job(job: TrainJob) -> Path:
    """Write the job where its processes (and a later rerun) can read it."""
    out = job.resolved_output_dir()
    private_dir(out)
    path = out / JOB_FILE
    write_atomic(path, job.model_dump_json(indent=2) + "\n")
    return path


class ForegroundRunner:
    """Runs a job on this machine and waits: in-process for one process, ``torchrun`` for several."""

    def run(self, job: TrainJob, *, registry: Registry | None = None) -> TrainResult:
        """Run ``job`` to the end.

        Raises:
            TrainingFailed: the processes exited with an error, or without a result.
        """
        if job.distributed.nproc == 1:
            result = run_job(job, registry=registry)
            assert result is not None  # a single process is rank 0
            return result
        job_file = write_job(job)
        (job_file.parent / RESULT_FILE).unlink(missing_ok=True)
        command = torchrun_command(entry_command(job_file), job.distributed.nproc)
        log.info("launching %d processes: %s", job.distributed.nproc, " ".join(command))
        # The processes inherit the environment: FORGELINE_HOME / MLFLOW_TRACKING_URI, and
        # TORCH_EXTENSIONS_DIR, where DeepSpeed caches the C++ ops it compiles on first use.
        proc = subprocess.run(command, env=dict(os.environ), check=False)
        outcome = read_outcome(job_file.parent, JobOutcome)  # removed above: this attempt wrote it
        if proc.returncode != 0 and outcome is not None:
            # The version exists: a process that failed after rank 0 registered it (at exit,
            # in teardown) does not undo that; reporting failure would invite a duplicate rerun.
            log.warning("training job %s registered its version, but torchrun exited with status %d afterwards; "
                        "the job succeeded (the per-rank errors are in the log above)", job.name, proc.returncode)
        elif proc.returncode != 0:
            raise TrainingFailed(
                f"training job {job.name} failed: torchrun exited with status {proc.returncode}; "
                "the per-rank errors are in the log above; rerun to resume from the last complete checkpoint"
            )
        if outcome is None:
            raise TrainingFailed(f"training job {job.name} finished without a result "
                                 f"({job_file.parent / RESULT_FILE} is missing); see its log above")
        registry = registry or Registry()
        data = load_data(job.data, seed=job.train.seed, method=job.method)
        return TrainResult(
            run_id=outcome.run_id or "", version=registry.get_version(outcome.name, outcome.version),
            adapter_dir=Path(outcome.adapter_dir), data=data, train_loss=outcome.train_loss,
            resumed_from_step=outcome.resumed_from_step,
        )
