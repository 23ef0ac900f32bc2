"""This machine, detached: the job runs in its own process group and outlives the command
that submitted it, so ``forgeline jobs status | logs | cancel`` work on it like on a cluster.

(``training.launch.LocalLauncher`` runs a job in the foreground and waits for its version;
this one starts the same command, ``torchrun ... -m training.entry JOB.json``, in the
background.) The process id and its start time identify the job; a small shell wrapper
writes the exit status to a file, since only a parent could otherwise read it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel

from ..checkpoints import write_atomic
from ..job import RESULT_FILE
from ..launch import entry_command, torchrun_command
from .base import (
    JOB_FILE,
    JobHandle,
    JobPhase,
    JobStatus,
    LaunchError,
    LaunchSpec,
    forwarded_env,
    job_json,
    read_log,
    with_outcome,
)

log = logging.getLogger(__name__)

LOG_FILE = "train.log"
EXIT_FILE = "exit-status"
PROCESS_FILE = "process.json"
CANCEL_FILE = "cancelled"
# `sh -c` keeps the status of the command it ran; `exec` is avoided on purpose so the shell survives to write it.
_WRAPPER = 'trap "" HUP; "$@"; echo $? > "$FORGELINE_EXIT_FILE"'


class ProcessRecord(BaseModel):
    """Which process is the job: its id, and its start time (process ids are reused)."""

    pid: int
    start_ticks: int | None


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), if readable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; count fields after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def process_alive(record: ProcessRecord) -> bool:
    """Whether the recorded process still runs (and is the same process, not a reused id)."""
    try:
        os.waitpid(record.pid, os.WNOHANG)  # reap it if it is our finished child, so it does not linger as a zombie
    except ChildProcessError:
        pass
    if Path("/proc").is_dir():
        state = _state(record.pid)
        if state is None or state in ("Z", "X"):
            return False
        return record.start_ticks is None or _start_ticks(record.pid) == record.start_ticks
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def spawn_detached(command: list[str], job_dir: Path, env: dict[str, str], *, cwd: Path | None = None) -> ProcessRecord:
    """Start ``command`` in a new session with its output in ``job_dir/train.log``."""
    log_path = job_dir / LOG_FILE
    full_env = {**os.environ, **env, "FORGELINE_EXIT_FILE": str(job_dir / EXIT_FILE), "PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as out:
        try:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", _WRAPPER, "forgeline-job", *command],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=full_env, cwd=str(cwd or job_dir), start_new_session=True,
            )
        except OSError as err:
            raise LaunchError(f"cannot start {command[0]}: {err}") from err
    record = ProcessRecord(pid=proc.pid, start_ticks=_start_ticks(proc.pid))
    write_atomic(job_dir / PROCESS_FILE, record.model_dump_json() + "\n")
    return record


def process_status(handle: JobHandle) -> JobStatus:
    """Phase of a detached job from its process and the files its wrapper leaves."""
    job_dir = Path(handle.job_dir)
    record = ProcessRecord.model_validate_json((job_dir / PROCESS_FILE).read_text())
    if process_alive(record):
        status = JobStatus(phase=JobPhase.RUNNING, detail=f"process {record.pid} running", nodes=[os.uname().nodename])
    elif (job_dir / CANCEL_FILE).exists():
        status = JobStatus(phase=JobPhase.CANCELLED, detail="cancelled")
    else:
        try:
            code = int((job_dir / EXIT_FILE).read_text().strip())
        except (OSError, ValueError):
            code = None
        if code == 0:
            status = JobStatus(phase=JobPhase.SUCCEEDED, detail="exited 0", exit_code=0)
        else:
            detail = f"exited {code}" if code is not None else "ended without an exit status (killed?)"
            status = JobStatus(phase=JobPhase.FAILED, detail=detail, exit_code=code)
    return with_outcome(status, handle)


def cancel_process(handle: JobHandle, *, grace_s: float = 10.0) -> None:
    """TERM the job's process group, KILL it after ``grace_s``; checkpoints stay for a resume."""
    job_dir = Path(handle.job_dir)
    record = ProcessRecord.model_validate_json((job_dir / PROCESS_FILE).read_text())
    (job_dir / CANCEL_FILE).touch()
    if not process_alive(record):
        return
    # The job leads its own session (start_new_session), so its group id is its pid.
    os.killpg(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and process_alive(record):
        time.sleep(0.2)
    if process_alive(record):
        os.killpg(record.pid, signal.SIGKILL)


def write_job_file(spec: LaunchSpec, job_dir: Path) -> Path:
    path = job_dir / JOB_FILE
    write_atomic(path, job_json(spec.job))
    return path


class DetachedProcessLauncher:
    """Status, logs and cancel of a job started with `spawn_detached` (its process and files)."""

    def status(self, handle: JobHandle) -> JobStatus:
        return process_status(handle)

    def logs(self, handle: JobHandle, *, tail: int | None = None) -> str:
        return read_log(Path(handle.job_dir) / LOG_FILE, tail)

    def cancel(self, handle: JobHandle) -> None:
        cancel_process(handle)


class LocalProcessLauncher(DetachedProcessLauncher):
    """Runs the job on this machine in the background (``forgeline train --detach``)."""

    kind = "local"

    def command(self, spec: LaunchSpec, job_file: Path) -> list[str]:
        nproc = spec.job.distributed.nproc
        if nproc == 1:
            return [sys.executable, *entry_command(job_file)]
        return torchrun_command(job_file, nproc)

    def submit(self, spec: LaunchSpec) -> JobHandle:
        from registry.settings import forgeline_home, private_dir

        job_dir = forgeline_home() / "launches" / spec.job_id
        private_dir(job_dir)
        out = spec.job.resolved_output_dir()
        private_dir(out)
        (out / RESULT_FILE).unlink(missing_ok=True)
        job_file = write_job_file(spec, job_dir)
        record = spawn_detached(self.command(spec, job_file), job_dir, forwarded_env())
        log.info("started %s as process %d (%s)", spec.job_id, record.pid, job_dir)
        return JobHandle(
            id=spec.job_id, kind=self.kind, backend_id=str(record.pid), name=spec.job.name,
            job_dir=str(job_dir), output_dir=str(out), cluster=spec.cluster,
        )
