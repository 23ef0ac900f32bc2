"""The job seam: a job is a command plus resources; ``submit(spec) -> handle``, ``status``, ``logs``, ``cancel``.

Every heavy stage is a job: training (``python -m training.entry JOB.json`` under
``torchrun``), evaluation (``forgeline evaluate``), the torch build (``forgeline build``)
and the TensorRT-LLM build (its entry point in TensorRT-LLM's container). A launcher runs
the command somewhere else: a detached process group on this machine, an sbatch script on
Slurm, a Kubernetes ``Job`` (or a Kubeflow ``PyTorchJob`` for torchrun across pods), or
DeepSpeed's hostfile launcher. A ``JobHandle`` is what forgeline keeps about a submitted
job (it is stored in the control database), so any later process can ask for its
status, logs or cancel it.

This package imports none of forgeline's other packages but ``registry`` (settings, the
control database, the error family): ``training``, ``serving`` and ``forgeline`` all use it.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import sys
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from registry.errors import ErrorCode, ForgelineError
from registry.settings import forgeline_home

from .config import ClusterSpec

JOB_FILE = "job.json"
"""The job description a job's command reads (training's ``TrainJob``), in its job folder."""

JOB_FILES = "{job_files}"
"""In a command, stands for the folder holding the job's ``files`` as the job sees it."""

Stage = Literal["train", "evaluate", "build"]

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


def new_job_id() -> str:
    """A short unique job id, valid as a Slurm job name and a Kubernetes name."""
    return f"fl-{datetime.now(UTC):%y%m%d}-{secrets.token_hex(3)}"


class JobSpec(BaseModel):
    """What ``submit`` needs: a command, the files it reads, and the resources to run it on."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(default_factory=new_job_id, description="forgeline's job id (`fl-...`).")
    stage: Stage = Field(default="train", description="What the job does (shown by `forgeline jobs list`).")
    name: str = Field(description="The registered model the job works on.")
    command: list[str] = Field(
        description=f"With `python`: the arguments after the interpreter (`-m module ...`); else the whole argv. "
        f"`{JOB_FILES}` stands for the folder holding `files`."
    )
    python: bool = Field(default=True, description="Start `command` with the cluster's Python.")
    torchrun: bool = Field(
        default=False,
        description="Start the command under torchrun on every node (cluster.nodes x processes), or DeepSpeed's "
        "runner on a hostfile; otherwise one process on one node.",
    )
    nproc: int = Field(default=1, ge=1, description="kind local + torchrun: processes on this machine.")
    files: dict[str, str] = Field(default_factory=dict, description="File name -> text, written where the job reads them.")
    output_dir: str | None = Field(
        default=None, description="Where the job leaves result.json, as the job sees it; default: its job folder."
    )
    cluster: ClusterSpec
    container_image: str | None = Field(default=None, description="Overrides cluster.container_image for this job.")
    gpus: int | None = Field(default=None, ge=0, description="Overrides cluster.gpus_per_node for this job.")
    mounts: list[str] = Field(default_factory=list, description="Host paths the job's container sees at the same path.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment of the job's processes.")

    @property
    def image(self) -> str | None:
        return self.container_image or self.cluster.container_image

    @property
    def gpus_per_node(self) -> int:
        return self.cluster.gpus_per_node if self.gpus is None else self.gpus


class JobHandle(BaseModel):
    """A submitted job: forgeline's id, the scheduler's id, and where its files are."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="forgeline's job id (`fl-...`).")
    kind: str = Field(description="Launcher kind: local, slurm, kubernetes or hostfile.")
    backend_id: str = Field(description="The scheduler's id: Slurm job id, Job or PyTorchJob name, or process id.")
    name: str = Field(description="Registered model name the job works on.")
    job_dir: str = Field(description="Job files on this side: job.json, rendered script or manifest, logs.")
    output_dir: str = Field(description="Checkpoints and result.json, as the job's processes see them.")
    cluster: ClusterSpec
    stage: Stage = Field(default="train", description="What the job does: train, evaluate or build.")
    submitted_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def log_name(self) -> str:
        """The job's log file in its job folder (``train.log``, ``evaluate.log``, ``build.log``)."""
        return f"{self.stage}.log"


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


@runtime_checkable
class Launcher(Protocol):
    """Submits a job to a cluster engine and reports on it."""

    kind: str

    def submit(self, spec: JobSpec) -> JobHandle:
        """Start the job; returns as soon as the scheduler has it."""
        ...

    def status(self, handle: JobHandle) -> JobStatus:
        """Where the job is now."""
        ...

    def logs(self, handle: JobHandle, *, tail: int | None = None) -> str:
        """The job's output so far (the last ``tail`` lines when given)."""
        ...

    def cancel(self, handle: JobHandle) -> None:
        """Stop the job (a training job's checkpoints stay; submitting the recipe again resumes)."""
        ...


_SAFE = re.compile(r"[^a-z0-9-]+")


def dns_label(text: str, *, limit: int = 40) -> str:
    """``text`` as a lower-case DNS label (Kubernetes names, Slurm job names)."""
    label = _SAFE.sub("-", text.lower()).strip("-")
    return label[:limit].strip("-") or "job"


def job_root(cluster: ClusterSpec) -> Path:
    """The folder every node sees, as this machine sees it: the cluster's shared folder or ``$FORGELINE_HOME``."""
    return Path(cluster.shared_dir).expanduser().resolve() if cluster.shared_dir else forgeline_home()


def node_root(cluster: ClusterSpec) -> str:
    """The same folder as the job's processes see it (on Kubernetes: the PVC's mount path in the pods)."""
    return cluster.mount_path if cluster.kind == "kubernetes" else str(job_root(cluster))


def job_command(spec: JobSpec, *, python: str, job_files: str | Path) -> list[str]:
    """The command of ``spec`` with the interpreter and its files' folder filled in (no torchrun)."""
    argv = [arg.replace(JOB_FILES, str(job_files)) for arg in spec.command]
    return [python, *argv] if spec.python else argv


def torchrun_command(args: list[str], nproc: int, *, python: str | None = None) -> list[str]:
    """``torchrun`` for ``nproc`` processes on this machine running ``python args``; ``--standalone`` picks
    a free rendezvous port."""
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def forwarded_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The forgeline settings of this process, for the nodes, plus ``extra``."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    env.setdefault("FORGELINE_HOME", str(forgeline_home()))
    env.update(extra or {})
    return env


def shell_exports(env: dict[str, str]) -> str:
    """``export K=V`` lines, each value quoted for the shell."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def write_files(spec: JobSpec, folder: Path) -> None:
    """The job's files, written into its job folder (atomically: a rerun may read them while we write)."""
    for name, text in spec.files.items():
        path = folder / name
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


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
