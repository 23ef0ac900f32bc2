"""Checks that need more than one recipe section, or the machine, before anything trains.

``forgeline validate`` reports these with the schema's own problems; ``run_job`` runs them
again, since a job can also arrive as JSON from a launcher.
"""

from __future__ import annotations

from pathlib import Path

from registry.errors import FieldProblem

from .adapters import check_adapter
from .config import AdapterSpec, DistributedSpec, GRPOMethod, MethodSpec, TrainSpec
from .distributed import check_distributed
from .methods import TASK_METRICS
from .rewards import check_rewards


def check_training(
    method: MethodSpec,
    adapter: AdapterSpec,
    train: TrainSpec,
    distributed: DistributedSpec,
    *,
    search_path: Path | None = None,
    local: bool = True,
) -> list[FieldProblem]:
    """Every cross-section or machine problem of a training job.

    Args:
        search_path: the recipe's folder, where ``module:function`` rewards are imported from.
        local: the job runs on this machine, so its hardware counts (QLoRA needs a CUDA GPU).
    """
    problems: list[FieldProblem] = []
    if local:
        problems += check_adapter(adapter)
    problems += check_distributed(distributed, local=local)
    known = TASK_METRICS[method.kind]
    if train.best_metric is not None and train.best_metric.removeprefix("eval_") not in known:
        problems.append(
            FieldProblem("train.best_metric", f"{method.kind} does not log this eval metric", train.best_metric,
                         f"use one of {', '.join(known)}")
        )
    if isinstance(method, GRPOMethod):
        problems += check_rewards(method.rewards, search_path)
        group = train.batch_size * train.grad_accum * distributed.nproc
        if group % method.num_generations:
            problems.append(
                FieldProblem(
                    "train.batch_size",
                    f"batch_size x grad_accum x nproc ({group}) is not a multiple of method.num_generations "
                    f"({method.num_generations}): each batch must hold whole groups of completions",
                    train.batch_size,
                    f"e.g. batch_size: {method.num_generations}",
                )
            )
    return problems
