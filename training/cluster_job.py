"""A training job as a cluster job: the command, its job file and where its checkpoints go.

``jobs`` runs commands; this module says which one trains: ``python -m training.entry
JOB.json`` under ``torchrun`` on every node, with the job file written beside it, and the
output folder (checkpoints, ``result.json``) where the nodes see it. It also checks the
recipe's ``cluster`` section against its ``distributed`` section.
"""

from __future__ import annotations

from pathlib import Path

from jobs.base import JOB_FILE, JOB_FILES, JobSpec, node_root
from jobs.config import ClusterSpec
from registry.errors import FieldProblem

from .config import DistributedSpec
from .job import TrainJob
from .runner import entry_command


def job_json(job: TrainJob) -> str:
    """``job`` as the file the entry point reads back (``TrainJob.model_validate_json``)."""
    return job.model_dump_json(indent=2) + "\n"


def output_dir_for(job: TrainJob, root: Path | str) -> str:
    """Where a job's checkpoints go under ``root``: one folder per model and recipe, so
    submitting the same recipe again resumes an interrupted attempt (``train.resume: auto``)."""
    return f"{str(root).rstrip('/')}/jobs/{job.name}/{job.recipe_hash}"


def node_job(job: TrainJob, cluster: ClusterSpec) -> TrainJob:
    """The job as its processes see it: the output folder on the nodes' storage (Kubernetes: the
    PVC, with no path from this machine)."""
    if cluster.kind == "kubernetes":
        return job.model_copy(update={"output_dir": output_dir_for(job, cluster.mount_path), "recipe_file": None})
    if cluster.kind == "local":
        return job.model_copy(update={"output_dir": str(job.resolved_output_dir())})
    return job.model_copy(update={"output_dir": job.output_dir or output_dir_for(job, node_root(cluster))})


def train_spec(job: TrainJob, cluster: ClusterSpec, *, job_id: str | None = None) -> JobSpec:
    """The cluster job that trains ``job`` on ``cluster``."""
    seen = node_job(job, cluster)
    return JobSpec(
        **({"id": job_id} if job_id else {}),
        stage="train", name=job.name, command=entry_command(f"{JOB_FILES}/{JOB_FILE}"), torchrun=True,
        nproc=job.distributed.nproc, files={JOB_FILE: job_json(seen)}, output_dir=seen.output_dir, cluster=cluster,
    )


def check_cluster(cluster: ClusterSpec, distributed: DistributedSpec) -> list[FieldProblem]:
    """Problems between the ``cluster`` and ``distributed`` sections of one recipe."""
    problems = []
    if cluster.kind != "local" and distributed.nproc > 1:
        problems.append(
            FieldProblem("distributed.nproc", f"counts processes on this machine; cluster.kind is {cluster.kind}",
                         distributed.nproc, "remove it and set cluster.gpus_per_node (or processes_per_node)")
        )
    if cluster.world_size > 1 and distributed.strategy == "none":
        problems.append(
            FieldProblem("distributed.strategy", f"`none` runs one process, but the cluster runs {cluster.world_size}",
                         distributed.strategy, "use ddp or deepspeed")
        )
    return problems
