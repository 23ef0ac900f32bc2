"""The recipe's `cluster` section: one switch between this machine, Slurm and Kubernetes."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from forgeline.recipe import parse_recipe
from jobs.config import ClusterSpec, applies_to, time_limit_seconds
from registry.errors import ConfigError
from training.cluster_job import job_json
from training.job import TrainJob

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "recipes" / "data" / "support-tickets"


def _recipe(**sections: object) -> dict[str, object]:
    return {
        "name": "router", "model": {"base": str(REPO / "assets" / "tiny-base")},
        "data": {"train": str(DATA / "train.jsonl"), "eval": str(DATA / "eval.jsonl")}, **sections,
    }


def test_default_is_this_machine() -> None:
    spec = ClusterSpec()
    assert (spec.kind, spec.nodes, spec.world_size) == ("local", 1, 1)


@pytest.mark.parametrize(
    ("fields", "nproc", "world"),
    [({"gpus_per_node": 8, "nodes": 4}, 8, 32), ({"gpus_per_node": 0, "nodes": 2}, 1, 2),
     ({"gpus_per_node": 0, "processes_per_node": 3, "nodes": 2}, 3, 6)],
)
def test_processes_per_node_follow_gpus_or_the_cpu_setting(fields: dict[str, int], nproc: int, world: int) -> None:
    spec = ClusterSpec(kind="slurm", **fields)
    assert (spec.nproc_per_node, spec.world_size) == (nproc, world)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "slurm", "pvc": "ckpt"}, "pvc: not read by kind slurm"),
        ({"kind": "kubernetes", "partition": "gpu", "container_image": "img", "pvc": "c"}, "partition: not read by kind kubernetes"),
        ({"kind": "kubernetes", "pvc": "ckpt"}, "needs container_image"),
        ({"kind": "kubernetes", "container_image": "img"}, "needs pvc"),
        ({"kind": "local", "nodes": 2}, "kind: local runs on this machine"),
        ({"kind": "hostfile", "nodes": 2, "hosts": ["a"]}, "one entry in hosts per node"),
        ({"kind": "slurm", "time_limit": "four hours"}, "is not a Slurm time"),
        ({"kind": "slurm", "partition": "gpu; rm -rf /"}, "is not a Slurm name"),
        ({"kind": "slurm", "env": {"1BAD": "x"}}, "not environment variable names"),
        ({"kind": "slurm", "container_mounts": ["/a:/a"]}, "container_mounts need container_image"),
        ({"kind": "slurm", "typo_field": 1}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_combinations_are_rejected_with_the_fix(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ClusterSpec.model_validate(fields)


@pytest.mark.parametrize(("text", "seconds"), [("90", 5400), ("1:30", 90), ("4:00:00", 14400), ("2-12", 216000),
                                              ("1-00:30", 88200), ("1-00:00:01", 86401)])
def test_slurm_time_limits_are_read_like_slurm(text: str, seconds: int) -> None:
    assert time_limit_seconds(text) == seconds
    assert ClusterSpec(kind="slurm", time_limit=text).time_limit == text


def test_a_full_dump_validates_again() -> None:
    """The job store and job files hold full dumps; defaults of other kinds must not count as set."""
    spec = ClusterSpec(kind="slurm", nodes=2, gpus_per_node=0, partition="debug", env={"GLOO_SOCKET_IFNAME": "fl0"})
    assert ClusterSpec.model_validate_json(spec.model_dump_json()) == spec


def test_the_job_file_validates_in_the_training_process(train_job: TrainJob) -> None:
    job = train_job.model_copy(update={"distributed": train_job.distributed.model_validate({})})
    assert TrainJob.model_validate_json(job_json(job)) == job
    assert TrainJob.model_validate_json(job_json(train_job)).distributed.zero_stage == 3


def test_fields_carried_to_another_kind() -> None:
    assert applies_to("nodes", "kubernetes") and applies_to("env", "slurm")
    assert not applies_to("partition", "kubernetes") and not applies_to("nodes", "local")


def test_recipe_composes_the_cluster_section(tmp_path: Path) -> None:
    recipe = parse_recipe(
        _recipe(distributed={"strategy": "deepspeed", "zero_stage": 3},
                cluster={"kind": "slurm", "nodes": 2, "gpus_per_node": 0, "partition": "debug"}),
        base_dir=tmp_path,
    )
    assert recipe.cluster.kind == "slurm" and recipe.cluster.world_size == 2


def test_recipe_reports_cluster_problems_with_their_yaml_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_recipe(_recipe(cluster={"kind": "slurm", "nodez": 2}), base_dir=tmp_path)
    assert "cluster.nodez: unknown field" in str(err.value)


def test_recipe_rejects_local_process_counts_on_a_cluster(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_recipe(_recipe(distributed={"strategy": "ddp", "nproc": 2}, cluster={"kind": "slurm", "nodes": 2}),
                     base_dir=tmp_path)
    assert "distributed.nproc: counts processes on this machine" in str(err.value)
    assert "cluster.gpus_per_node" in str(err.value)


def test_recipe_needs_a_strategy_for_several_processes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="distributed.strategy: `none` runs one process"):
        parse_recipe(_recipe(cluster={"kind": "slurm", "nodes": 2, "gpus_per_node": 0}), base_dir=tmp_path)


def test_qlora_on_a_gpu_cluster_validates_on_a_cpu_login_node(tmp_path: Path) -> None:
    """This machine's hardware is not what trains a cluster job."""
    recipe = parse_recipe(
        _recipe(adapter={"kind": "qlora"}, distributed={"strategy": "deepspeed"},
                cluster={"kind": "slurm", "nodes": 2, "gpus_per_node": 8}),
        base_dir=tmp_path,
    )
    assert recipe.adapter.kind == "qlora"
