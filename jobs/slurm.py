"""Slurm: render an sbatch script, submit it with ``sbatch``, follow it, cancel it.

A torchrun job (training) renders ``platform/slurm/train.sbatch.j2``: N nodes with one task
each, starting ``platform/slurm/train-node.sh.j2`` on every node with ``srun``; each node
runs ``torchrun`` with the c10d rendezvous on the first node's address. A failed attempt
requeues the job (``scontrol requeue``), and ``train.resume: auto`` makes the next attempt
continue from the newest complete checkpoint in the same MLflow run. Any other job
(evaluation, a build) renders ``platform/slurm/job.sbatch.j2``: one task on one node, in a
container (pyxis ``--container-image``) when the job or the cluster names an image.

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

from .base import (
    JobHandle,
    JobPhase,
    JobSpec,
    JobStatus,
    LaunchError,
    forwarded_env,
    job_command,
    job_root,
    read_log,
    shell_exports,
    write_files,
)
from .config import ClusterSpec, time_limit_seconds
from .outcome import RESULT_FILE, with_outcome
from .templates import render

log = logging.getLogger(__name__)

NODE_FILE = "train-node.sh"

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
    """Submits jobs with ``sbatch``; follows them with ``squeue``/``scontrol``/``sacct``."""

    kind = "slurm"

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s

    # -- rendering -------------------------------------------------------------------------

    def prepare(self, spec: JobSpec) -> JobHandle:
        """Write the job's files and its sbatch script (and node script, for torchrun); submit nothing."""
        root = job_root(spec.cluster)
        job_dir = root / "launches" / spec.id
        private_dir(job_dir)
        write_files(spec, job_dir)
        handle = JobHandle(
            id=spec.id, kind=self.kind, backend_id="", name=spec.name, job_dir=str(job_dir),
            output_dir=spec.output_dir or str(job_dir), cluster=spec.cluster, stage=spec.stage,
        )
        for name, text in render_scripts(spec, handle, root=root).items():
            (job_dir / name).write_text(text)
        (job_dir / sbatch_file(handle)).chmod(0o755)
        return handle

    # -- the seam ----------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> JobHandle:
        handle = self.prepare(spec)
        # An earlier job of the same recipe left its result here; this job writes its own.
        (Path(handle.output_dir) / RESULT_FILE).unlink(missing_ok=True)
        out = self._run(["sbatch", "--parsable", str(Path(handle.job_dir) / sbatch_file(handle))], what="submit the job")
        slurm_id = out.strip().split(";")[0]
        if not slurm_id.isdigit():
            raise LaunchError(f"sbatch answered {out.strip()!r} instead of a job id")
        log.info("submitted %s (%s) as Slurm job %s (%s)", spec.id, spec.stage, slurm_id, handle.job_dir)
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
        return read_log(Path(handle.job_dir) / handle.log_name, tail)

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


def sbatch_file(handle: JobHandle) -> str:
    """The sbatch script's name in the job folder (``train.sbatch``, ``evaluate.sbatch``, ``build.sbatch``)."""
    return f"{handle.stage}.sbatch"


def render_scripts(spec: JobSpec, handle: JobHandle, *, root: Path) -> dict[str, str]:
    """The job's scripts by file name: the sbatch script, and for torchrun the per-node script."""
    cluster = spec.cluster
    image = spec.image
    python = cluster.python or ("python" if image else sys.executable)
    job_dir = Path(handle.job_dir)
    mounts = [f"{root}:{root}", *cluster.container_mounts, *(f"{m}:{m}" for m in spec.mounts)]
    env = forwarded_env({**cluster.env, **spec.env})
    if cluster.shared_dir:
        # The nodes keep their state in the shared folder; versions reach this machine's registry
        # only through a tracking server (MLFLOW_TRACKING_URI), not through a SQLite file here.
        env["FORGELINE_HOME"] = str(root)
        if not env.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://", "databricks")):
            log.warning("cluster.shared_dir is set but MLFLOW_TRACKING_URI is not a tracking server: "
                        "the job's versions and records go to %s/mlflow.db", root)
    common = dict(
        job_id=spec.id, name=spec.name, stage=spec.stage, job_name=spec.id, cpus_per_node=cluster.cpus_per_node,
        partition=cluster.partition, account=cluster.account, time_limit=cluster.time_limit,
        log_path=job_dir / handle.log_name, job_dir=job_dir, sbatch_options=cluster.sbatch_options,
        exports=shell_exports(env), container_image=image, container_mounts=",".join(mounts),
    )
    if not spec.torchrun:
        command = job_command(spec, python=python, job_files=job_dir)
        return {sbatch_file(handle): render(
            "slurm/job.sbatch.j2", **common, gpus=spec.gpus_per_node, setup=cluster.setup, command=shlex.join(command),
        )}
    args = job_command(spec.model_copy(update={"python": False}), python="", job_files=job_dir)
    node = render(
        "slurm/train-node.sh.j2",
        job_id=spec.id, nodes=cluster.nodes, nproc_per_node=cluster.nproc_per_node, setup=cluster.setup,
        python=shlex.quote(python), args=shlex.join(args),
    )
    sbatch = render(
        "slurm/train.sbatch.j2", **common,
        nodes=cluster.nodes, nproc_per_node=cluster.nproc_per_node, gpus_per_node=spec.gpus_per_node,
        requeue_grace_s=_requeue_grace(cluster), max_restarts=cluster.max_restarts, rdzv_port=cluster.rdzv_port,
        node_script=job_dir / NODE_FILE, output_dir=handle.output_dir,
    )
    return {NODE_FILE: node, sbatch_file(handle): sbatch}


def render_job(spec: JobSpec, *, job_dir: Path) -> dict[str, str]:
    """``spec``'s scripts by file name for a job folder of the caller's choosing, submitting nothing
    (for operators who submit by hand)."""
    handle = JobHandle(id=spec.id, kind="slurm", backend_id="", name=spec.name, job_dir=str(job_dir),
                       output_dir=spec.output_dir or str(job_dir), cluster=spec.cluster, stage=spec.stage)
    return render_scripts(spec, handle, root=job_root(spec.cluster))


def _requeue_grace(cluster: ClusterSpec) -> int:
    """Seconds before the time limit at which the job requeues itself (a quarter of short limits)."""
    if not cluster.time_limit:
        return _REQUEUE_GRACE_S
    return max(10, min(_REQUEUE_GRACE_S, time_limit_seconds(cluster.time_limit) // 4))
