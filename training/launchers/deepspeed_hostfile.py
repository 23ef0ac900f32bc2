"""DeepSpeed's own multi-node launcher: a hostfile and passwordless ssh (pdsh), for bare metal.

``deepspeed --hostfile H --master_addr FIRST --module --no_local_rank training.entry JOB.json``
runs on this machine; DeepSpeed's runner reaches every host with ``pdsh`` (over ssh) and
starts ``deepspeed.launcher.launch`` there, which sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
/``MASTER_ADDR`` for each process: the same variables ``torchrun`` sets, so the same entry
point runs. The runner itself is a detached local process (see ``training.launchers.local``),
so status, logs and cancel work as for local jobs; on cancel, DeepSpeed's runner stops the
remote processes itself (``pdsh ... pkill``).

``deepspeed --launcher slurm`` is not used: it needs mpi4py; on Slurm use ``kind: slurm``.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

from registry.settings import private_dir

from ..job import RESULT_FILE
from .base import (
    JobHandle,
    LaunchSpec,
    forwarded_env,
    job_root,
    output_dir_for,
)
from .config import ClusterSpec
from .local import DetachedProcessLauncher, spawn_detached, write_job_file

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


def deepspeed_command(cluster: ClusterSpec, job_dir: Path, job_file: Path) -> list[str]:
    """The runner command for ``job_file`` on ``cluster.hosts``."""
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
    # --module: run training.entry as `python -m`; --no_local_rank: the entry reads LOCAL_RANK from the environment.
    command += ["--module", "--no_local_rank", "training.entry", str(job_file)]
    return command


class DeepSpeedHostfileLauncher(DetachedProcessLauncher):
    """Multi-node through ``deepspeed --hostfile`` (pdsh + ssh to every host)."""

    kind = "hostfile"

    def prepare(self, spec: LaunchSpec) -> tuple[Path, list[str], dict[str, str]]:
        """Write the job, hostfile and env file; return the job folder, command and environment."""
        cluster = spec.cluster
        root = job_root(cluster)
        job_dir = root / "launches" / spec.job_id
        private_dir(job_dir)
        out = Path(spec.job.output_dir) if spec.job.output_dir else output_dir_for(spec.job, root)
        spec = spec.model_copy(update={"job": spec.job.model_copy(update={"output_dir": str(out)})})
        job_file = write_job_file(spec, job_dir)
        (job_dir / HOSTFILE).write_text(hostfile_text(cluster))
        env = forwarded_env(cluster.env)
        if cluster.shared_dir:
            env["FORGELINE_HOME"] = str(root)
        (job_dir / ENV_FILE).write_text(env_file_text(env))
        if cluster.setup:
            (job_dir / SETUP_FILE).write_text("".join(f"{line}\n" for line in cluster.setup))
        # DeepSpeed reads the variables to export on the hosts from the file DS_ENV_FILE names.
        return job_dir, deepspeed_command(cluster, job_dir, job_file), {"DS_ENV_FILE": str(job_dir / ENV_FILE)}

    def submit(self, spec: LaunchSpec) -> JobHandle:
        job_dir, command, env = self.prepare(spec)
        out = Path(spec.job.output_dir) if spec.job.output_dir else output_dir_for(spec.job, job_root(spec.cluster))
        private_dir(out)
        (out / RESULT_FILE).unlink(missing_ok=True)
        log.info("launching %s: %s", spec.job_id, shlex.join(command))
        # Run from the shared root: pdsh `cd`s every host into the runner's working folder.
        record = spawn_detached(command, job_dir, env, cwd=job_root(spec.cluster))
        return JobHandle(
            id=spec.job_id, kind=self.kind, backend_id=str(record.pid), name=spec.job.name,
            job_dir=str(job_dir), output_dir=str(out), cluster=spec.cluster,
        )
