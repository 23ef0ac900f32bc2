"""Launchers: how a training job's processes get started.

The seam is small on purpose: a launcher takes a ``TrainJob`` and returns its result.
``LocalLauncher`` runs one process in this interpreter, and several with ``torchrun`` on
this machine, each running the common entry point (``python -m training.entry``). Cluster
launchers (Slurm, Kubernetes) start the same entry point on their nodes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from registry.client import Registry
from registry.errors import ErrorCode, ForgelineError
from registry.settings import private_dir

from .checkpoints import write_atomic
from .data import load_data
from .job import RESULT_FILE, JobOutcome, TrainJob, TrainResult, run_job

log = logging.getLogger(__name__)

JOB_FILE = "job.json"


class TrainingFailed(ForgelineError):
    code = ErrorCode.INTERNAL


class Launcher(Protocol):
    """Starts a job's processes and waits for its registered version."""

    def run(self, job: TrainJob, *, registry: Registry | None = None) -> TrainResult:
        """Run ``job`` to the end.

        Raises:
            TrainingFailed: the processes exited with an error.
        """
        ...


def entry_command(job_file: Path) -> list[str]:
    """The per-process command every launcher runs (after its own ``torchrun`` arguments)."""
    return ["-m", "training.entry", str(job_file)]


def torchrun_command(job_file: Path, nproc: int) -> list[str]:
    """``torchrun`` for ``nproc`` processes on this machine; ``--standalone`` picks a free rendezvous port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            *entry_command(job_file)]


def write_job(job: TrainJob) -> Path:
    """Write the job where its processes (and a later rerun) can read it."""
    out = job.resolved_output_dir()
    private_dir(out)
    path = out / JOB_FILE
    write_atomic(path, job.model_dump_json(indent=2) + "\n")
    return path


def read_outcome(job: TrainJob) -> JobOutcome:
    """What rank 0 reported in ``result.json``.

    Raises:
        TrainingFailed: no result was written (the job did not finish).
    """
    path = job.resolved_output_dir() / RESULT_FILE
    if not path.is_file():
        raise TrainingFailed(f"training job {job.name} finished without a result ({path} is missing); see its log above")
    return JobOutcome.model_validate_json(path.read_text())


class LocalLauncher:
    """Runs a job on this machine: in-process for one process, ``torchrun`` for several."""

    def run(self, job: TrainJob, *, registry: Registry | None = None) -> TrainResult:
        if job.distributed.nproc == 1:
            result = run_job(job, registry=registry)
            assert result is not None  # a single process is rank 0
            return result
        job_file = write_job(job)
        (job_file.parent / RESULT_FILE).unlink(missing_ok=True)
        command = torchrun_command(job_file, job.distributed.nproc)
        log.info("launching %d processes: %s", job.distributed.nproc, " ".join(command))
        # The processes inherit the environment: FORGELINE_HOME / MLFLOW_TRACKING_URI, and
        # TORCH_EXTENSIONS_DIR, where DeepSpeed caches the C++ ops it compiles on first use.
        proc = subprocess.run(command, env=dict(os.environ), check=False)
        registered = (job_file.parent / RESULT_FILE).is_file()  # removed above: this attempt wrote it
        if proc.returncode != 0 and registered:
            # The version exists: a process that failed after rank 0 registered it (at exit,
            # in teardown) does not undo that; reporting failure would invite a duplicate rerun.
            log.warning("training job %s registered its version, but torchrun exited with status %d afterwards; "
                        "the job succeeded (the per-rank errors are in the log above)", job.name, proc.returncode)
        elif proc.returncode != 0:
            raise TrainingFailed(
                f"training job {job.name} failed: torchrun exited with status {proc.returncode}; "
                "the per-rank errors are in the log above; rerun to resume from the last complete checkpoint"
            )
        outcome = read_outcome(job)
        registry = registry or Registry()
        data = load_data(job.data, seed=job.train.seed, method=job.method)
        return TrainResult(
            run_id=outcome.run_id, version=registry.get_version(outcome.name, outcome.version),
            adapter_dir=Path(outcome.adapter_dir), data=data, train_loss=outcome.train_loss,
            resumed_from_step=outcome.resumed_from_step,
        )
