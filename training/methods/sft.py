"""SFT on TRL's ``SFTTrainer``: we only translate recipe sections into its config.

During training, each evaluation also scores exact-match accuracy of generated answers on
the held-out rows — the same task metric ``forgeline evaluate`` records on the version.
"""

from __future__ import annotations

import logging
from typing import Any

from ..adapters import peft_config
from ..config import SFTMethod
from ..evaluation import generate_answers, normalise, to_examples
from .base import TrainerInputs, common_args, eval_rows

log = logging.getLogger(__name__)


def sft_config(method: SFTMethod, inputs: TrainerInputs) -> Any:
    """TRL ``SFTConfig`` from the recipe's ``method`` and ``train`` sections."""
    from trl import SFTConfig

    return SFTConfig(
        **common_args(inputs),
        max_length=inputs.train.max_length,
        completion_only_loss=method.completion_only_loss,
        packing=method.packing,
    )


def _with_task_accuracy(trainer_class: type) -> type:
    """``trainer_class`` whose evaluations add ``eval_accuracy`` (generated exact match)."""

    class SFTTrainerWithAccuracy(trainer_class):  # type: ignore[misc, valid-type]
        accuracy_rows: list[dict[str, Any]] = []
        max_new_tokens: int = 16

        def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
            output = super().evaluation_loop(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", "eval")
            examples = to_examples(self.accuracy_rows, self.processing_class)
            if examples:
                # Added before Trainer.evaluate logs the metrics, so MLflow and best-checkpoint selection see it.
                answers = generate_answers(
                    self.model, self.processing_class, [e.prompt for e in examples],
                    max_new_tokens=self.max_new_tokens, batch_size=self.args.per_device_eval_batch_size,
                )
                hits = sum(normalise(a) == normalise(e.expected) for a, e in zip(answers, examples, strict=True))
                output.metrics[f"{prefix}_accuracy"] = hits / len(examples)
            return output

    return SFTTrainerWithAccuracy


def build_sft_trainer(method: SFTMethod, inputs: TrainerInputs, args: Any) -> Any:
    """A ready ``SFTTrainer``; PEFT wraps the model when the adapter is LoRA."""
    from datasets import Dataset
    from trl import SFTTrainer

    held_out = eval_rows(inputs)
    trainer = _with_task_accuracy(SFTTrainer)(
        model=inputs.model,
        args=args,
        train_dataset=Dataset.from_list(inputs.train_rows),
        eval_dataset=Dataset.from_list(held_out) if held_out else None,
        processing_class=inputs.tokenizer,
        peft_config=peft_config(inputs.adapter),
        callbacks=inputs.callbacks,
    )
    trainer.accuracy_rows = held_out or []
    trainer.max_new_tokens = inputs.evaluate.max_new_tokens
    return trainer
