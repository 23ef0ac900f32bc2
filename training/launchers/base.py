"""The launcher seam: ``submit(spec) -> handle``, ``status``, ``logs``, ``cancel``.

Every launcher starts the same training entry point (``python -m training.entry JOB.json``
under ``torchrun``) somewhere else: a detached process group on this machine, one
``srun torchrun`` per Slurm node, a Kubeflow ``PyTorchJob``, or DeepSpeed's hostfile
launcher. A ``JobHandle`` is what forgeline keeps about a submitted job (it is stored in
the control database), so any later process can ask for its status, logs or cancel it.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from registry.errors import ErrorCode, ForgelineError
from registry.settings import forgeline_home

from ..job import RESULT_FILE, JobOutcome, TrainJob
from .config import ClusterSpec

JOB_FILE = "job.json"

# Forwarded to every node so the processes find the same tracking server, registry and
# control database as the machine that submitted the job.
FORWARDED_ENV = (
    "FORGELINE_HOME",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "FORGELINE_DB_URL",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TORCH_EXTENSIONS_DIR",
)


class LaunchError(ForgelineError):
    """The cluster refused or lost a job (a scheduler command failed, the API answered an error)."""

    code = ErrorCode.UNAVAILABLE


class JobPhase(StrEnum):
    """Where a job is, in words common to every scheduler."""

    PENDING = "pending"
    RUNNING = "running"
    REQUEUED = "requeued"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"

    @property
    def finished(self) -> bool:
        return self in (JobPhase.SUCCEEDED, JobPhase.FAILED, JobPhase.CANCELLED)


class JobHandle(BaseModel):
    """A submitted job: forgeline's id, the scheduler's id, and where its files are."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="forgeline's job id (`fl-...`).")
    kind: str = Field(description="Launcher kind: local, slurm, kubernetes or hostfile.")
    backend_id: str = Field(description="The scheduler's id: Slurm job id, PyTorchJob name, or process id.")
    name: str = Field(description="Registered model name the job trains.")
    job_dir: str = Field(description="Job files on this side: job.json, rendered script or manifest, logs.")
    output_dir: str = Field(description="Checkpoints and result.json, as the training processes see it.")
    cluster: ClusterSpec
    submitted_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class JobStatus(BaseModel):
    """What a launcher found out about a job just now."""

    phase: JobPhase
    detail: str = Field(default="", description="The scheduler's own words (e.g. `PENDING (BeginTime)`).")
    restarts: int = Field(default=0, description="Requeues or restarts so far.")
    nodes: list[str] = Field(default_factory=list)
    exit_code: int | None = None
    version: int | None = Field(default=None, description="The registered version, once the job reported it.")
    run_id: str | None = None
    resumed_from_step: int = 0


class LaunchSpec(BaseModel):
    """What ``submit`` needs: the training job (resolved) and where to run it."""

    model_config = ConfigDict(frozen=True)

    job: TrainJob
    cluster: ClusterSpec
    job_id: str = Field(default_factory=lambda: new_job_id())


@runtime_checkable
class Launcher(Protocol):
    """Submits a training job to a cluster engine and reports on it."""

    kind: str

    def submit(self, spec: LaunchSpec) -> JobHandle:
        """Start the job; returns as soon as the scheduler has it."""
        ...

    def status(self, handle: JobHandle) -> JobStatus:
        """Where the job is now."""
        ...

    def logs(self, handle: JobHandle, *, tail: int | None = None) -> str:
        """The job's output so far (the last ``tail`` lines when given)."""
        ...

    def cancel(self, handle: JobHandle) -> None:
        """Stop the job (its checkpoints stay; submitting the recipe again resumes)."""
        ...


def job_json(job: TrainJob) -> str:
    """``job`` as the file the entry point reads back (``TrainJob.model_validate_json``)."""
    return job.model_dump_json(indent=2) + "\n"


def new_job_id() -> str:
    """A short unique job id, valid as a Slurm job name and a Kubernetes name."""
    return f"fl-{datetime.now(UTC):%y%m%d}-{secrets.token_hex(3)}"


_SAFE = re.compile(r"[^a-z0-9-]+")


def dns_label(text: str, *, limit: int = 40) -> str:
    """``text`` as a lower-case DNS label (Kubernetes names, Slurm job names)."""
    label = _SAFE.sub("-", text.lower()).strip("-")
    return label[:limit].strip("-") or "job"


def job_root(cluster: ClusterSpec) -> Path:
    """The folder every node sees: the cluster's shared folder or ``$FORGELINE_HOME``."""
    return Path(cluster.shared_dir).expanduser().resolve() if cluster.shared_dir else forgeline_home()


def output_dir_for(job: TrainJob, root: Path) -> Path:
    """Where a job's checkpoints go under ``root``: one folder per model and recipe, so
    submitting the same recipe again resumes an interrupted attempt (``train.resume: auto``)."""
    return root / "jobs" / job.name / job.recipe_hash


def forwarded_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The forgeline settings of this process, for the nodes, plus ``extra``."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    env.setdefault("FORGELINE_HOME", str(forgeline_home()))
    env.update(extra or {})
    return env


def shell_exports(env: dict[str, str]) -> str:
    """``export K=V`` lines, each value quoted for the shell."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def read_outcome(output_dir: Path) -> JobOutcome | None:
    """What rank 0 wrote into ``result.json`` when the job registered its version, if readable here."""
    path = output_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return JobOutcome.model_validate_json(path.read_text())
    except ValueError:
        return None


def with_outcome(status: JobStatus, handle: JobHandle) -> JobStatus:
    """Add the registered version (from ``result.json``) to a status, when the job wrote one.

    The result file decides the outcome: a job whose version is registered has succeeded,
    even when a process exited non-zero afterwards (a rank aborting at exit, a node lost
    during teardown). Reporting it failed would invite a rerun that trains it again.
    """
    outcome = read_outcome(Path(handle.output_dir))
    if outcome is None or outcome_predates(handle, Path(handle.output_dir)):
        return status
    update: dict[str, object] = {
        "version": outcome.version, "run_id": outcome.run_id, "resumed_from_step": outcome.resumed_from_step,
    }
    if status.phase is JobPhase.FAILED:
        update["phase"] = JobPhase.SUCCEEDED
        update["detail"] = f"version {outcome.version} registered; a process then {status.detail} (ignored)"
    return status.model_copy(update=update)


def outcome_predates(handle: JobHandle, output_dir: Path) -> bool:
    """A result.json older than the job is an earlier job's result (same recipe, same folder)."""
    path = output_dir / RESULT_FILE
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC) < handle.submitted_at
    except OSError:
        return True


def tail_lines(text: str, tail: int | None) -> str:
    if tail is None:
        return text
    lines = text.splitlines(keepends=True)
    return "".join(lines[-tail:]) if tail > 0 else ""


def read_log(path: Path, tail: int | None = None) -> str:
    """A log file's text (or its last lines); empty when the job has not written it yet."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return tail_lines(text, tail)
