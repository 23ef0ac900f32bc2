"""This machine, detached: the job runs in its own process group and outlives the command
that submitted it, so ``forgeline jobs status | logs | cancel`` work on it like on a cluster.

(``training.runner.ForegroundRunner`` runs a training job in the foreground and waits for
its version; this launcher starts any job's command, e.g. ``torchrun ... -m training.entry
JOB.json`` or ``forgeline evaluate ...``, in the background.) The process id and its start
time identify the job; a small shell wrapper writes the exit status to a file, since only
a parent could otherwise read it.
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

from registry.settings import forgeline_home, private_dir

from .base import (
    JobHandle,
    JobPhase,
    JobSpec,
    JobStatus,
    LaunchError,
    forwarded_env,
    job_command,
    read_log,
    torchrun_command,
    write_files,
)
from .outcome import RESULT_FILE, with_outcome

log = logging.getLogger(__name__)

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


def spawn_detached(command: list[str], job_dir: Path, env: dict[str, str], *, log_name: str,
                   cwd: Path | None = None) -> ProcessRecord:
    """Start ``command`` in a new session with its output in ``job_dir/log_name``."""
    log_path = job_dir / log_name
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
    (job_dir / PROCESS_FILE).write_text(record.model_dump_json() + "\n")
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


class DetachedProcessLauncher:
    """Status, logs and cancel of a job started with `spawn_detached` (its process and files)."""

    def status(self, handle: JobHandle) -> JobStatus:
        return process_status(handle)

    def logs(self, handle: JobHandle, *, tail: int | None = None) -> str:
        return read_log(Path(handle.job_dir) / handle.log_name, tail)

    def cancel(self, handle: JobHandle) -> None:
        cancel_process(handle)


class LocalProcessLauncher(DetachedProcessLauncher):
    """Runs the job on this machine in the background (``forgeline train --detach``, ``--cluster`` of kind local)."""

    kind = "local"

    def command(self, spec: JobSpec, job_dir: Path) -> list[str]:
        if spec.torchrun and spec.nproc > 1:
            return torchrun_command(job_command(spec.model_copy(update={"python": False}), python="", job_files=job_dir),
                                    spec.nproc)
        return job_command(spec, python=sys.executable, job_files=job_dir)

    def submit(self, spec: JobSpec) -> JobHandle:
        job_dir = forgeline_home() / "launches" / spec.id
        private_dir(job_dir)
        out = Path(spec.output_dir) if spec.output_dir else job_dir
        private_dir(out)
        (out / RESULT_FILE).unlink(missing_ok=True)  # an earlier job's result; this job writes its own
        write_files(spec, job_dir)
        handle = JobHandle(
            id=spec.id, kind=self.kind, backend_id="", name=spec.name, job_dir=str(job_dir),
            output_dir=str(out), cluster=spec.cluster, stage=spec.stage,
        )
        record = spawn_detached(self.command(spec, job_dir), job_dir, forwarded_env(spec.env), log_name=handle.log_name)
        log.info("started %s (%s) as process %d (%s)", spec.id, spec.stage, record.pid, job_dir)
        return handle.model_copy(update={"backend_id": str(record.pid)})
