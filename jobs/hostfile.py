"""DeepSpeed's own multi-node launcher: a hostfile and passwordless ssh (pdsh), for bare metal.

``deepspeed --hostfile H --master_addr FIRST --module --no_local_rank training.entry JOB.json``
runs on this machine; DeepSpeed's runner reaches every host with ``pdsh`` (over ssh) and
starts ``deepspeed.launcher.launch`` there, which sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
/``MASTER_ADDR`` for each process: the same variables ``torchrun`` sets, so the same entry
point runs. The runner itself is a detached local process (see ``jobs.local``), so status,
logs and cancel work as for local jobs; on cancel, DeepSpeed's runner stops the remote
processes itself (``pdsh ... pkill``). A job that is not torchrun (evaluation, a build) runs
as a detached process on this machine (``jobs.submission.launcher_for``).

``deepspeed --launcher slurm`` is not used: it needs mpi4py; on Slurm use ``kind: slurm``.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

from registry.errors import ErrorCode, ForgelineError
from registry.settings import private_dir

from .base import JobHandle, JobSpec, forwarded_env, job_command, job_root, write_files
from .config import ClusterSpec
from .local import DetachedProcessLauncher, spawn_detached
from .outcome import RESULT_FILE

log = logging.getLogger(__name__)

HOSTFILE = "hostfile"
ENV_FILE = "deepspeed.env"
SETUP_FILE = "node-setup.sh"


def hostfile_text(cluster: ClusterSpec) -> str:
    """DeepSpeed's hostfile: one ``HOST slots=N`` line per node."""
    return "".join(f"{host} slots={cluster.nproc_per_node}\n" for host in cluster.hosts)


def env_file_text(env: dict[str, str]) -> str:
    """``KEY=VALUE`` lines DeepSpeed exports on every host (its ``.deepspeed_env`` format)."""
    return "".join(f"{key}={value}\n" for key, value in env.items())


def deepspeed_command(spec: JobSpec, job_dir: Path) -> list[str]:
    """The runner command for ``spec`` (``-m module ARGS``) on ``cluster.hosts``."""
    cluster = spec.cluster
    args = job_command(spec.model_copy(update={"python": False}), python="", job_files=job_dir)
    if not spec.python or args[:1] != ["-m"] or len(args) < 2:
        raise ForgelineError(f"DeepSpeed's runner starts a Python module; job {spec.id} runs {args[:2]}",
                             code=ErrorCode.INVALID_CONFIG, param="cluster.kind")
    python = cluster.python or sys.executable
    command = [
        python, "-m", "deepspeed.launcher.runner",
        "--hostfile", str(job_dir / HOSTFILE),
        "--launcher", "pdsh",
        "--master_addr", cluster.hosts[0],
        "--master_port", str(cluster.rdzv_port),
    ]
    if cluster.setup:
        command += ["--venv_script", str(job_dir / SETUP_FILE)]  # sourced on every host before the launch
    # --module: run the module as `python -m`; --no_local_rank: the entry reads LOCAL_RANK from the environment.
    command += ["--module", "--no_local_rank", *args[1:]]
    return command


class DeepSpeedHostfileLauncher(DetachedProcessLauncher):
    """Multi-node through ``deepspeed --hostfile`` (pdsh + ssh to every host)."""

    kind = "hostfile"

    def prepare(self, spec: JobSpec) -> tuple[JobHandle, list[str], dict[str, str]]:
        """Write the job's files, hostfile and env file; return its handle (no process yet), command and environment."""
        cluster = spec.cluster
        root = job_root(cluster)
        job_dir = root / "launches" / spec.id
        private_dir(job_dir)
        write_files(spec, job_dir)
        (job_dir / HOSTFILE).write_text(hostfile_text(cluster))
        env = forwarded_env({**cluster.env, **spec.env})
        if cluster.shared_dir:
            env["FORGELINE_HOME"] = str(root)
        (job_dir / ENV_FILE).write_text(env_file_text(env))
        if cluster.setup:
            (job_dir / SETUP_FILE).write_text("".join(f"{line}\n" for line in cluster.setup))
        handle = JobHandle(id=spec.id, kind=self.kind, backend_id="", name=spec.name, job_dir=str(job_dir),
                           output_dir=spec.output_dir or str(job_dir), cluster=cluster, stage=spec.stage)
        # DeepSpeed reads the variables to export on the hosts from the file DS_ENV_FILE names.
        return handle, deepspeed_command(spec, job_dir), {"DS_ENV_FILE": str(job_dir / ENV_FILE)}

    def submit(self, spec: JobSpec) -> JobHandle:
        handle, command, env = self.prepare(spec)
        out = Path(handle.output_dir)
        private_dir(out)
        (out / RESULT_FILE).unlink(missing_ok=True)
        log.info("launching %s: %s", spec.id, shlex.join(command))
        # Run from the shared root: pdsh `cd`s every host into the runner's working folder.
        record = spawn_detached(command, Path(handle.job_dir), env, log_name=handle.log_name, cwd=job_root(spec.cluster))
        return handle.model_copy(update={"backend_id": str(record.pid)})
