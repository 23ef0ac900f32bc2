"""DPO on TRL's ``DPOTrainer``: preference pairs, chat or plain, with or without tools.

With a LoRA adapter the reference model is the base with the adapter switched off (no
second copy in memory); for a full fine-tune TRL loads the reference from the base.
Evaluations log TRL's ``rewards/margins`` and ``rewards/accuracies`` — the task metric.
"""

from __future__ import annotations

from typing import Any

from ..adapters import peft_config
from ..config import DPOMethod
from ..preferences import preference_dataset_rows
from .base import TrainerInputs, common_args, eval_rows


def dpo_config(method: DPOMethod, inputs: TrainerInputs) -> Any:
    """TRL ``DPOConfig`` from the recipe's ``method`` and ``train`` sections."""
    from trl import DPOConfig

    return DPOConfig(
        **common_args(inputs),
        max_length=inputs.train.max_length,
        beta=method.beta,
        loss_type=[method.loss_type],
        label_smoothing=method.label_smoothing,
    )


def build_dpo_trainer(method: DPOMethod, inputs: TrainerInputs, args: Any) -> Any:
    """A ready ``DPOTrainer``."""
    from datasets import Dataset
    from trl import DPOTrainer

    held_out = eval_rows(inputs)
    # Pairs with tools are rendered through the chat template here (see `training.preferences`).
    train = preference_dataset_rows(inputs.train_rows, inputs.tokenizer)
    held_out = preference_dataset_rows(held_out, inputs.tokenizer) if held_out else held_out
    return DPOTrainer(
        model=inputs.model,
        args=args,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(held_out) if held_out else None,
        processing_class=inputs.tokenizer,
        peft_config=peft_config(inputs.adapter),
        callbacks=inputs.callbacks,
    )
