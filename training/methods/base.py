"""What every method shares: the inputs of a trainer and the ``TrainingArguments`` common to all."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import AdapterSpec, EvaluateSpec, TrainSpec


@dataclass
class TrainerInputs:
    """Everything a method needs to build its trainer, already loaded."""

    model: Any
    tokenizer: Any
    adapter: AdapterSpec
    train: TrainSpec
    evaluate: EvaluateSpec
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    output_dir: str
    report_to: list[str]
    backend: dict[str, Any] = field(default_factory=dict)
    callbacks: list[Any] = field(default_factory=list)
    search_path: Path | None = None  # where `module:function` rewards are imported from


def common_args(inputs: TrainerInputs) -> dict[str, Any]:
    """Keywords every TRL config takes, from the recipe's ``train`` section and the strategy."""
    import torch

    train = inputs.train
    on_gpu = torch.cuda.is_available()
    evaluating = train.eval_steps is not None and bool(inputs.eval_rows)
    args: dict[str, Any] = {
        "output_dir": inputs.output_dir,
        "num_train_epochs": train.epochs,
        "max_steps": train.max_steps,
        "learning_rate": train.learning_rate,
        "per_device_train_batch_size": train.batch_size,
        "per_device_eval_batch_size": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "warmup_steps": train.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        "logging_steps": train.logging_steps,
        "logging_first_step": True,  # curves start at the beginning, so "did it learn" reads off the plot
        "save_strategy": "steps",
        "save_steps": train.save_steps,
        "save_total_limit": train.save_total_limit,
        "seed": train.seed,
        "gradient_checkpointing": train.gradient_checkpointing,  # TRL defaults to True; a waste on small models
        "report_to": inputs.report_to,
        "bf16": on_gpu and torch.cuda.is_bf16_supported(),
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
        "eval_strategy": "steps" if evaluating else "no",
        "eval_steps": train.eval_steps if evaluating else None,
        "eval_on_start": evaluating,  # the step-0 point: what the untrained model scores
    }
    if evaluating and train.best_metric:
        args.update(
            load_best_model_at_end=True,
            metric_for_best_model=train.best_metric,
            greater_is_better=not train.best_metric.endswith("loss"),
        )
    args.update(inputs.backend)
    return args


def eval_rows(inputs: TrainerInputs) -> list[dict[str, Any]] | None:
    """The held-out rows evaluated during training (at most ``train.eval_samples``), or None."""
    if inputs.train.eval_steps is None or not inputs.eval_rows:
        return None
    return inputs.eval_rows[: inputs.train.eval_samples]
