"""Evaluation and the torch build as cluster jobs: the same ``forgeline`` command a user types,
run where a cluster section says.

A job's command is a plain ``forgeline evaluate NAME VERSION ...`` or ``forgeline build
NAME@VERSION``, so whatever those commands do runs inside the job (the model loads there,
never in the process that submits it: the CLI with ``--cluster FILE``, or the fine-tuning
supervisor in the control plane). Results go where the commands always put them: on the
version in the registry, which the submitter reads once the job ends.
"""

from __future__ import annotations

from jobs.base import JobSpec
from jobs.config import ClusterSpec

STAGES = ("evaluate", "build")


def stage_job_id(training_job_id: str, stage: str) -> str:
    """The id of a version's evaluation or build job, derived from its training job's id (so a
    control plane started again finds the job it submitted before)."""
    return f"{training_job_id}-{stage}"


def _cluster_for_one_process(cluster: ClusterSpec) -> ClusterSpec:
    """The cluster section for a one-process job: one node (evaluation and builds do not span nodes)."""
    if cluster.nodes > 1:
        return cluster.model_copy(update={"nodes": 1, "hosts": cluster.hosts[:1]})
    return cluster


def evaluate_spec(name: str, version: int, cluster: ClusterSpec, *, options: list[str] | None = None,
                  job_id: str | None = None) -> JobSpec:
    """The job that runs ``forgeline evaluate NAME VERSION [options]`` on ``cluster``."""
    return JobSpec(
        **({"id": job_id} if job_id else {}),
        stage="evaluate", name=name, command=["-m", "forgeline", "evaluate", name, str(version), *(options or [])],
        cluster=_cluster_for_one_process(cluster),
    )


def build_spec(name: str, version: int, cluster: ClusterSpec, *, job_id: str | None = None) -> JobSpec:
    """The job that runs ``forgeline build NAME@VERSION --target torch`` on ``cluster``."""
    return JobSpec(
        **({"id": job_id} if job_id else {}),
        stage="build", name=name, command=["-m", "forgeline", "build", f"{name}@{version}", "--target", "torch"],
        cluster=_cluster_for_one_process(cluster),
    )
