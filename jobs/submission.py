"""Submit and follow jobs by id, whatever runs them: the launchers plus the job store.

This is what ``forgeline train|evaluate|build --cluster ...``, ``forgeline jobs ...`` and
the fine-tuning supervisor call: pick the launcher for the cluster kind, submit, record
the handle, and later refresh the status from the scheduler (keeping it in the store),
read logs or cancel.
"""

from __future__ import annotations

import getpass
import logging
import time
from collections.abc import Callable

from registry.errors import ConflictError, ErrorCode, ForgelineError

from .base import JobHandle, JobPhase, JobSpec, JobStatus, Launcher
from .store import JobRecord, JobStore

log = logging.getLogger(__name__)


def get_launcher(kind: str) -> Launcher:
    """The launcher for a cluster kind (imports only what that kind needs)."""
    if kind == "slurm":
        from .slurm import SlurmLauncher

        return SlurmLauncher()
    if kind == "kubernetes":
        from .kubernetes import KubernetesLauncher

        return KubernetesLauncher()
    if kind == "hostfile":
        from .hostfile import DeepSpeedHostfileLauncher

        return DeepSpeedHostfileLauncher()
    if kind == "local":
        from .local import LocalProcessLauncher

        return LocalProcessLauncher()
    raise ForgelineError(f"unknown cluster kind {kind!r}; fix: use local, slurm, kubernetes or hostfile",
                         code=ErrorCode.INVALID_CONFIG, param="cluster.kind")


def launcher_for(spec: JobSpec) -> Launcher:
    """The launcher that runs ``spec``: its cluster's, except that DeepSpeed's hostfile runner only
    starts torchrun-style jobs; any other job on a hostfile cluster runs on this machine."""
    if spec.cluster.kind == "hostfile" and not spec.torchrun:
        return get_launcher("local")
    return get_launcher(spec.cluster.kind)


def submit(spec: JobSpec, *, store: JobStore | None = None, launcher: Launcher | None = None,
           actor: str | None = None) -> JobHandle:
    """Submit ``spec`` to its cluster and record it.

    Raises:
        ConflictError: another unfinished job writes into the same output folder (a recipe's
            checkpoints, a build's artifact).
    """
    store = store or JobStore()
    launcher = launcher or launcher_for(spec)
    if spec.output_dir:
        # The store may be behind (nobody asked since the job ended): ask the scheduler before refusing.
        active = store.active_for_output(spec.output_dir)
        busy = [r for r in active if not _ended(r.id, store, launcher if r.handle.kind == launcher.kind else None)]
        if busy:
            raise ConflictError(
                f"job {busy[0].id} ({busy[0].status.phase}) already writes into {busy[0].handle.output_dir}; "
                f"fix: wait for it, or `forgeline jobs cancel {busy[0].id}` (a new training job resumes from its checkpoints)"
            )
    handle = launcher.submit(spec)
    store.add(handle, actor=actor or getpass.getuser())
    return handle


def _ended(job_id: str, store: JobStore, launcher: Launcher | None) -> bool:
    try:
        return refresh(job_id, store=store, launcher=launcher).status.phase.finished
    except ForgelineError as err:  # the scheduler cannot say: count the job as still running
        log.warning("cannot refresh job %s: %s", job_id, err)
        return False


def refresh(job_id: str, *, store: JobStore | None = None, launcher: Launcher | None = None) -> JobRecord:
    """Ask the scheduler where the job is, keep the answer, return the updated record."""
    store = store or JobStore()
    record = store.get(job_id)
    if record.status.phase.finished and (record.status.version is not None or record.handle.stage != "train"):
        return record  # nothing changes after a job ended (a training job: after it registered its version)
    launcher = launcher or get_launcher(record.handle.kind)
    status = launcher.status(record.handle)
    if status.phase is JobPhase.UNKNOWN and record.status.phase.finished:
        # Schedulers forget finished jobs (Slurm after MinJobAge, a deleted PyTorchJob); keep what we saw.
        status = record.status.model_copy(update={"version": status.version or record.status.version})
    elif record.status.phase is JobPhase.CANCELLED and not status.phase.finished:
        # Cancelled here; the scheduler may still be stopping its processes (Slurm: COMPLETING).
        status = status.model_copy(update={"phase": JobPhase.CANCELLED, "detail": f"cancelled, {status.detail}"})
    store.update(record.id, status)
    return store.get(record.id)


def get_record(job_id: str, *, store: JobStore | None = None) -> JobRecord:
    """The stored record of a job, as last seen (no scheduler asked)."""
    return (store or JobStore()).get(job_id)


def job_logs(job_id: str, *, tail: int | None = None, store: JobStore | None = None) -> str:
    record = (store or JobStore()).get(job_id)
    return get_launcher(record.handle.kind).logs(record.handle, tail=tail)


def cancel(job_id: str, *, store: JobStore | None = None) -> JobRecord:
    """Stop a job; a training job's checkpoints stay, so submitting the recipe again resumes."""
    store = store or JobStore()
    record = store.get(job_id)
    if record.status.phase.finished:
        return record
    get_launcher(record.handle.kind).cancel(record.handle)
    store.update(record.id, JobStatus(phase=JobPhase.CANCELLED, detail=f"cancelled by {getpass.getuser()}",
                                      restarts=record.status.restarts))
    return store.get(record.id)


def wait(
    job_id: str,
    *,
    store: JobStore | None = None,
    poll_s: float = 5.0,
    timeout_s: float | None = None,
    on_change: Callable[[JobStatus], None] | None = None,
) -> JobRecord:
    """Poll until the job finishes (and, when it succeeded, reported its version).

    Raises:
        ForgelineError: ``timeout_s`` passed first (the job keeps running).
    """
    store = store or JobStore()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    seen: tuple[str, int] | None = None
    polls_after_success = 0
    while True:
        record = refresh(job_id, store=store)
        status = record.status
        if (status.phase.value, status.restarts) != seen:
            seen = (status.phase.value, status.restarts)
            if on_change:
                on_change(status)
        if status.phase is JobPhase.SUCCEEDED:
            polls_after_success += 1
        # A succeeded job's result.json may reach a shared file system a moment after Slurm says COMPLETED.
        if status.phase.finished and (status.version is not None or status.phase is not JobPhase.SUCCEEDED
                                      or record.handle.stage != "train" or polls_after_success > 3):
            return record
        if deadline is not None and time.monotonic() > deadline:
            raise ForgelineError(f"job {job_id} still {status.phase} after {timeout_s:.0f} s; it keeps running "
                                 f"(`forgeline jobs status {job_id}`)", code=ErrorCode.UNAVAILABLE)
        time.sleep(poll_s)
