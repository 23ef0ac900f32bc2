"""GRPO on TRL's ``GRPOTrainer`` with verifiable rewards (``training.rewards``).

Each prompt gets ``num_generations`` sampled completions; their rewards (the weighted sum
of the recipe's reward functions) are normalised within the group into advantages. TRL
logs ``reward`` and ``rewards/<function>/mean`` per step, and ``eval_reward`` at each
evaluation — the task metric.
"""

from __future__ import annotations

from typing import Any

from ..adapters import peft_config
from ..config import GRPOMethod
from ..rewards import resolve_rewards
from .base import TrainerInputs, common_args, eval_rows


def grpo_config(method: GRPOMethod, inputs: TrainerInputs) -> Any:
    """TRL ``GRPOConfig`` from the recipe's ``method`` and ``train`` sections."""
    from trl import GRPOConfig

    args = common_args(inputs)
    # TRL needs whole groups in an eval batch: (eval batch x processes) % num_generations == 0.
    args["per_device_eval_batch_size"] = method.num_generations
    return GRPOConfig(
        **args,
        num_generations=method.num_generations,
        max_completion_length=method.max_completion_length,
        temperature=method.temperature,
        beta=method.beta,
        epsilon=method.epsilon,
        loss_type=method.loss_type,
        reward_weights=[reward.weight for reward in method.rewards],
    )


def build_grpo_trainer(method: GRPOMethod, inputs: TrainerInputs, args: Any) -> Any:
    """A ready ``GRPOTrainer`` whose rewards are the recipe's functions."""
    from datasets import Dataset
    from trl import GRPOTrainer

    functions, _ = resolve_rewards(method.rewards, inputs.search_path)
    held_out = eval_rows(inputs)
    return GRPOTrainer(
        model=inputs.model,
        reward_funcs=functions,
        args=args,
        train_dataset=Dataset.from_list(inputs.train_rows),
        eval_dataset=Dataset.from_list(held_out) if held_out else None,
        processing_class=inputs.tokenizer,
        peft_config=peft_config(inputs.adapter),
        callbacks=inputs.callbacks,
    )
