"""Slurm: render an sbatch script, submit it with ``sbatch``, follow it, cancel it.

The script (``platform/slurm/train.sbatch.j2``) asks for N nodes with one task each and
starts ``platform/slurm/train-node.sh.j2`` on every node with ``srun``; each node runs
``torchrun`` with the c10d rendezvous on the first node's address. A failed attempt
requeues the job (``scontrol requeue``), and ``train.resume: auto`` makes the next attempt
continue from the newest complete checkpoint in the same MLflow run.

Tracking: ``squeue`` while Slurm's controller remembers the job (``MinJobAge``), with
``scontrol show job`` for requeues and the exit code; ``sacct`` after that when the cluster
keeps accounting (slurmdbd). Job files, logs and checkpoints go to a folder every node
mounts (``cluster.shared_dir``, default ``$FORGELINE_HOME``).
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import sys
from pathlib import Path

from registry.errors import MissingDependencyError
from registry.settings import private_dir

from ..checkpoints import write_atomic
from ..job import RESULT_FILE, TrainJob
from .base import (
    JOB_FILE,
    JobHandle,
    JobPhase,
    JobStatus,
    LaunchError,
    LaunchSpec,
    forwarded_env,
    job_json,
    job_root,
    output_dir_for,
    read_log,
    shell_exports,
    with_outcome,
)
from .config import ClusterSpec, time_limit_seconds
from .templates import render

log = logging.getLogger(__name__)

SBATCH_FILE = "train.sbatch"
NODE_FILE = "train-node.sh"
LOG_FILE = "train.log"

_STATES: dict[str, JobPhase] = {
    "PENDING": JobPhase.PENDING,
    "CONFIGURING": JobPhase.PENDING,
    "RUNNING": JobPhase.RUNNING,
    "COMPLETING": JobPhase.RUNNING,
    "SIGNALING": JobPhase.RUNNING,
    "STAGE_OUT": JobPhase.RUNNING,
    "RESIZING": JobPhase.RUNNING,
    "SUSPENDED": JobPhase.PENDING,
    "STOPPED": JobPhase.PENDING,
    "REQUEUED": JobPhase.REQUEUED,
    "REQUEUE_FED": JobPhase.REQUEUED,
    "REQUEUE_HOLD": JobPhase.REQUEUED,
    "PREEMPTED": JobPhase.REQUEUED,
    "COMPLETED": JobPhase.SUCCEEDED,
    "CANCELLED": JobPhase.CANCELLED,
    "FAILED": JobPhase.FAILED,
    "TIMEOUT": JobPhase.FAILED,
    "NODE_FAIL": JobPhase.FAILED,
    "OUT_OF_MEMORY": JobPhase.FAILED,
    "BOOT_FAIL": JobPhase.FAILED,
    "DEADLINE": JobPhase.FAILED,
    "SPECIAL_EXIT": JobPhase.FAILED,
}
_FIELD = re.compile(r"(\w+)=(\S*)")
# With a time limit, the job requeues itself this long before it (Slurm would end it, not requeue it).
_REQUEUE_GRACE_S = 120


def _phase(state: str, restarts: int) -> JobPhase:
    phase = _STATES.get(state.split()[0].rstrip("+") if state else "", JobPhase.UNKNOWN)
    return JobPhase.REQUEUED if phase is JobPhase.PENDING and restarts > 0 else phase


def _exit_code(value: str | None) -> int | None:
    """Slurm's ``EXIT:SIGNAL`` as one number (128 + signal when killed by one)."""
    if not value:
        return None
    code, _, signal = value.partition(":")
    try:
        return 128 + int(signal) if signal and int(signal) else int(code)
    except ValueError:
        return None


class SlurmLauncher:
    """Submits training jobs with ``sbatch``; follows them with ``squeue``/``scontrol``/``sacct``."""

    kind = "slurm"

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s

    # -- rendering -------------------------------------------------------------------------

    def prepare(self, spec: LaunchSpec) -> tuple[JobHandle, TrainJob]:
        """Write job.json, the node script and the sbatch script; submit nothing."""
        cluster = spec.cluster
        root = job_root(cluster)
        job_dir = root / "launches" / spec.job_id
        private_dir(job_dir)
        out = Path(spec.job.output_dir) if spec.job.output_dir else output_dir_for(spec.job, root)
        job = spec.job.model_copy(update={"output_dir": str(out)})
        write_atomic(job_dir / JOB_FILE, job_json(job))
        node, sbatch = render_scripts(job, cluster, job_id=spec.job_id, job_dir=job_dir, root=root)
        (job_dir / NODE_FILE).write_text(node)
        (job_dir / SBATCH_FILE).write_text(sbatch)
        (job_dir / SBATCH_FILE).chmod(0o755)
        handle = JobHandle(
            id=spec.job_id, kind=self.kind, backend_id="", name=job.name, job_dir=str(job_dir),
            output_dir=str(out), cluster=cluster,
        )
        return handle, job

    # -- the seam ----------------------------------------------------------------------------

    def submit(self, spec: LaunchSpec) -> JobHandle:
        handle, _ = self.prepare(spec)
        # An earlier job of the same recipe left its result here; this job writes its own.
        (Path(handle.output_dir) / RESULT_FILE).unlink(missing_ok=True)
        out = self._run(["sbatch", "--parsable", str(Path(handle.job_dir) / SBATCH_FILE)], what="submit the job")
        slurm_id = out.strip().split(";")[0]
        if not slurm_id.isdigit():
            raise LaunchError(f"sbatch answered {out.strip()!r} instead of a job id")
        log.info("submitted %s as Slurm job %s (%s)", spec.job_id, slurm_id, handle.job_dir)
        return handle.model_copy(update={"backend_id": slurm_id})

    def status(self, handle: JobHandle) -> JobStatus:
        info = self._scontrol(handle.backend_id)
        if info is not None:
            restarts = int(info.get("Restarts", "0") or 0)
            state = self._squeue_state(handle.backend_id) or info.get("JobState", "")
            phase = _phase(state, restarts)
            reason = info.get("Reason", "None")
            detail = state + (f" ({reason})" if reason not in ("None", "") else "")
            nodes = info.get("NodeList", "")
            exit_code = _exit_code(info.get("ExitCode")) if phase.finished else None
            status = JobStatus(
                phase=phase, detail=detail, restarts=restarts, exit_code=exit_code,
                nodes=self._hostnames(nodes) if nodes and nodes != "(null)" else [],
            )
        else:
            status = self._sacct(handle.backend_id) or JobStatus(
                phase=JobPhase.UNKNOWN,
                detail="Slurm no longer knows the job (past MinJobAge) and keeps no accounting (sacct)",
            )
        return with_outcome(status, handle)

    def logs(self, handle: JobHandle, *, tail: int | None = None) -> str:
        return read_log(Path(handle.job_dir) / LOG_FILE, tail)

    def cancel(self, handle: JobHandle) -> None:
        self._run(["scancel", handle.backend_id], what="cancel the job")
        log.info("cancelled Slurm job %s (%s)", handle.backend_id, handle.id)

    # -- Slurm's commands --------------------------------------------------------------------

    def _run(self, argv: list[str], *, what: str, check: bool = True) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s, check=False)
        except FileNotFoundError:
            raise MissingDependencyError(
                f"{argv[0]} not found: cannot {what}; fix: run forgeline on a Slurm login node "
                "(or put Slurm's client commands on PATH)",
                param="cluster.kind",
            ) from None
        except subprocess.TimeoutExpired:
            raise LaunchError(f"{argv[0]} did not answer in {self.timeout_s:.0f} s: cannot {what}; is slurmctld up?") from None
        if check and proc.returncode != 0:
            raise LaunchError(f"{shlex.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout if proc.returncode == 0 else ""

    def _squeue_state(self, slurm_id: str) -> str | None:
        out = self._run(["squeue", "-h", "-t", "all", "-j", slurm_id, "-o", "%T"], what="read the job's state", check=False)
        return out.strip().splitlines()[0] if out.strip() else None

    def _scontrol(self, slurm_id: str) -> dict[str, str] | None:
        """``scontrol show job -o``: state, reason, requeues, exit code, nodes (None once forgotten)."""
        out = self._run(["scontrol", "show", "job", "-o", slurm_id], what="read the job", check=False)
        if not out.strip():
            return None
        return dict(_FIELD.findall(out.splitlines()[0]))

    def _hostnames(self, nodelist: str) -> list[str]:
        out = self._run(["scontrol", "show", "hostnames", nodelist], what="expand the node list", check=False)
        return out.split() or [nodelist]

    def _sacct(self, slurm_id: str) -> JobStatus | None:
        """The job from Slurm's accounting (every attempt with -D), when the cluster keeps it."""
        argv = ["sacct", "-j", slurm_id, "-X", "-D", "-n", "-P", "-o", "State,ExitCode,NodeList"]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s, check=False)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            return None
        rows = [line.split("|") for line in proc.stdout.strip().splitlines() if line.count("|") == 2]
        if proc.returncode != 0 or not rows:
            log.debug("sacct has nothing on job %s: %s", slurm_id, proc.stderr.strip())
            return None
        state, exit_code, nodes = rows[-1]
        phase = _phase(state, len(rows) - 1)
        return JobStatus(
            phase=phase, detail=f"{state} (sacct)", restarts=len(rows) - 1,
            exit_code=_exit_code(exit_code) if phase.finished else None, nodes=[nodes] if nodes else [],
        )


def render_scripts(job: TrainJob, cluster: ClusterSpec, *, job_id: str, job_dir: Path, root: Path) -> tuple[str, str]:
    """The per-node script and the sbatch script for ``job`` (``job.output_dir`` already set)."""
    python = cluster.python or ("python" if cluster.container_image else sys.executable)
    mounts = [f"{root}:{root}", *cluster.container_mounts]
    node = render(
        "slurm/train-node.sh.j2",
        job_id=job_id, nodes=cluster.nodes, nproc_per_node=cluster.nproc_per_node, setup=cluster.setup,
        python=shlex.quote(python), job_file=job_dir / JOB_FILE,
    )
    env = forwarded_env(cluster.env)
    if cluster.shared_dir:
        # The nodes keep their state in the shared folder; versions reach this machine's registry
        # only through a tracking server (MLFLOW_TRACKING_URI), not through a SQLite file here.
        env["FORGELINE_HOME"] = str(root)
        if not env.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://", "databricks")):
            log.warning("cluster.shared_dir is set but MLFLOW_TRACKING_URI is not a tracking server: "
                        "the version will be registered in %s/mlflow.db", root)
    sbatch = render(
        "slurm/train.sbatch.j2",
        job_id=job_id, name=job.name, job_name=job_id, nodes=cluster.nodes, nproc_per_node=cluster.nproc_per_node,
        gpus_per_node=cluster.gpus_per_node, cpus_per_node=cluster.cpus_per_node, partition=cluster.partition,
        account=cluster.account, time_limit=cluster.time_limit, requeue_grace_s=_requeue_grace(cluster),
        max_restarts=cluster.max_restarts, log_path=job_dir / LOG_FILE, job_dir=job_dir,
        sbatch_options=cluster.sbatch_options, exports=shell_exports(env), rdzv_port=cluster.rdzv_port,
        container_image=cluster.container_image, container_mounts=",".join(mounts), node_script=job_dir / NODE_FILE,
        output_dir=job.output_dir,
    )
    return node, sbatch


def _requeue_grace(cluster: ClusterSpec) -> int:
    """Seconds before the time limit at which the job requeues itself (a quarter of short limits)."""
    if not cluster.time_limit:
        return _REQUEUE_GRACE_S
    return max(10, min(_REQUEUE_GRACE_S, time_limit_seconds(cluster.time_limit) // 4))
