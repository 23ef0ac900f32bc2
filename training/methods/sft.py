"""SFT on TRL's ``SFTTrainer``: we only translate recipe sections into its config.

During training, each evaluation also scores exact-match accuracy of generated answers on
the held-out rows — the same task metric ``forgeline evaluate`` records on the version.
"""

from __future__ import annotations

import logging
from typing import Any

from ..adapters import peft_config
from ..config import SFTMethod
from ..conversations import ConversationError, is_conversation, template_renders_tools, tokenize_conversation
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


def _as_messages(row: dict[str, Any]) -> dict[str, Any]:
    """A chat prompt/completion row as one conversation (the completion trained, as before)."""
    if "messages" in row:
        return row
    if isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list):
        return {"messages": [*row["prompt"], *row["completion"]]}
    raise ConversationError(
        "a conversation dataset (tools, tool calls, weights or several assistant turns) cannot mix in plain-text rows; "
        "fix: write every row as {\"messages\": [...]}",
        param="data.train",
    )


def conversation_dataset(rows: list[dict[str, Any]], tokenizer: Any, max_length: int | None) -> Any:
    """Rows tokenized with ``assistant_masks`` on every trained assistant turn (``training.conversations``)."""
    from datasets import Dataset

    if any(row.get("tools") or any(m.get("tool_calls") for m in row.get("messages", [])) for row in rows):
        if not template_renders_tools(tokenizer):
            raise ConversationError(
                "the data has tools and tool calls, but the base's chat template does not show them to the model; "
                "fix: set model.chat_template to a template with tool support",
                param="model.chat_template",
            )
    full = [tokenize_conversation(tokenizer, _as_messages(r)) for r in rows]
    cut = [r for r in full if max_length is not None and 1 not in r["assistant_masks"][:max_length]]
    if cut:
        longest = max(len(r["input_ids"]) for r in full)
        raise ConversationError(
            f"{len(cut)} of {len(full)} conversation rows keep no trained token within train.max_length={max_length} "
            f"(tool schemas and earlier turns come first); fix: raise train.max_length to at least {longest}",
            param="train.max_length",
        )
    if max_length is not None:
        full = [{k: v[:max_length] for k, v in r.items()} for r in full]
    return Dataset.from_list(full)


def build_sft_trainer(method: SFTMethod, inputs: TrainerInputs, args: Any) -> Any:
    """A ready ``SFTTrainer``; PEFT wraps the model when the adapter is LoRA.

    Conversations (multi-turn, tools, per-message weights) are tokenized here so that every
    weighted assistant turn is trained; other rows go to TRL as they are.
    """
    from datasets import Dataset
    from trl import SFTTrainer

    held_out = eval_rows(inputs)
    if any(is_conversation(row) for row in inputs.train_rows):
        length = inputs.train.max_length
        train_dataset = conversation_dataset(inputs.train_rows, inputs.tokenizer, length)
        eval_dataset = conversation_dataset(held_out, inputs.tokenizer, length) if held_out else None
    else:
        train_dataset = Dataset.from_list(inputs.train_rows)
        eval_dataset = Dataset.from_list(held_out) if held_out else None
    trainer = _with_task_accuracy(SFTTrainer)(
        model=inputs.model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=inputs.tokenizer,
        peft_config=peft_config(inputs.adapter),
        callbacks=inputs.callbacks,
    )
    trainer.accuracy_rows = held_out or []
    trainer.max_new_tokens = inputs.evaluate.max_new_tokens
    return trainer
