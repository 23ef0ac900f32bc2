"""The training sections of a recipe: ``model``, ``data``, ``method``, ``adapter``, ``train``.

They are defined here, beside the code that consumes them, and composed into the full
recipe by ``forgeline.recipe``. Every model forbids unknown keys so a typo is an error.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Section):
    base: str = Field(description="Base model: a local folder (relative to the recipe) or a Hugging Face hub id.")
    chat_template: str | None = Field(
        default=None, description="Jinja chat template to use instead of the tokenizer's own."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weights dtype when loading the base (auto: float32 on CPU, bfloat16 on GPU)."
    )
    trust_remote_code: bool = Field(default=False, description="Allow custom modelling code from the checkpoint.")


class DataSpec(_Section):
    train: str = Field(description="Training data: a JSONL/JSON/Parquet file (relative to the recipe) or a hub dataset name.")
    eval: str | None = Field(default=None, description="Held-out data; when absent, `eval_fraction` of `train` is split off.")
    eval_fraction: float = Field(default=0.1, gt=0.0, lt=1.0, description="Share of `train` held out when `eval` is absent.")


class SFTMethod(_Section):
    kind: Literal["sft"] = "sft"
    completion_only_loss: bool = Field(default=True, description="Compute the loss on completions only.")
    packing: bool = Field(default=False, description="Pack several short examples into one sequence.")


MethodSpec = SFTMethod


class AdapterSpec(_Section):
    kind: Literal["lora", "none"] = Field(default="lora", description="`lora` trains a LoRA adapter; `none` is a full fine-tune.")
    r: int = Field(default=16, gt=0, description="LoRA rank.")
    alpha: int = Field(default=32, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: str | list[str] = Field(default="all-linear", description="Modules to adapt: `all-linear` or a list of names.")


class TrainSpec(_Section):
    epochs: float = Field(default=1.0, gt=0, description="Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = Field(default=-1, description="Stop after this many optimiser steps; -1 trains for `epochs`.")
    learning_rate: float = Field(default=2e-4, gt=0, lt=1, description="Peak learning rate.")
    batch_size: int = Field(default=8, gt=0, description="Per-device batch size.")
    grad_accum: int = Field(default=1, gt=0, description="Gradient-accumulation steps.")
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1, description="Share of steps spent warming up the learning rate.")
    max_length: int = Field(default=512, gt=8, description="Truncate tokenised examples to this many tokens.")
    logging_steps: int = Field(default=10, gt=0, description="Log metrics every this many steps.")
    save_steps: int = Field(default=100, gt=0, description="Write a checkpoint every this many steps.")
    seed: int = Field(default=42, description="Random seed for data order and initialisation.")
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass: less memory, ~30% more compute."
    )

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainSpec:
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError("max_steps must be -1 (train for `epochs`) or a positive number of steps")
        return self


class EvaluateSpec(_Section):
    max_samples: int = Field(default=200, gt=0, description="Evaluate on at most this many held-out rows.")
    max_new_tokens: int = Field(default=16, gt=0, description="Tokens generated per answer for exact-match accuracy.")
    batch_size: int = Field(default=32, gt=0, description="Rows generated at once.")
