"""The training sections of a recipe: ``model``, ``data``, ``method``, ``adapter``, ``train``, ``distributed``.

They are defined here, beside the code that consumes them, and composed into the full
recipe by ``forgeline.recipe``. Every model forbids unknown keys so a typo is an error.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
    """Supervised fine-tuning (TRL ``SFTTrainer``): prompt/completion, messages or text rows."""

    kind: Literal["sft"] = "sft"
    completion_only_loss: bool = Field(default=True, description="Compute the loss on completions only.")
    packing: bool = Field(default=False, description="Pack several short examples into one sequence.")


class DPOMethod(_Section):
    """Direct preference optimisation (TRL ``DPOTrainer``): prompt/chosen/rejected rows, chat or plain."""

    kind: Literal["dpo"] = "dpo"
    beta: float = Field(default=0.1, gt=0, description="How far the policy may move from the reference (higher: less).")
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "sigmoid_norm"] = Field(
        default="sigmoid", description="DPO loss variant (TRL `loss_type`)."
    )
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5, description="Assumed share of flipped preference labels (robust DPO).")


BUILTIN_REWARDS = ("exact_match", "numeric_match", "r1_format", "json_valid")
"""Reward functions shipped in ``training.rewards``; anything else must be ``module:function``."""


class RewardSpec(_Section):
    """One reward function of a GRPO recipe and its weight in the summed reward."""

    name: str = Field(
        description=f"A built-in ({', '.join(BUILTIN_REWARDS)}) or your own function as `module:function` "
        "(importable from the recipe's folder or PYTHONPATH)."
    )
    weight: float = Field(default=1.0, description="Weight of this reward in the total.")
    field: str | None = Field(
        default=None,
        description="Row field holding the reference answer (exact_match and numeric_match default to `answer`); "
        "every row is checked for it before training.",
    )

    @field_validator("name")
    @classmethod
    def _known_or_importable(cls, value: str) -> str:
        if value in BUILTIN_REWARDS:
            return value
        module, sep, function = value.partition(":")
        if not sep or not module or not function.isidentifier():
            raise ValueError(
                f"unknown reward {value!r}: use one of {', '.join(BUILTIN_REWARDS)} or `module:function`"
            )
        return value

    def reference_field(self) -> str | None:
        """The row field this reward reads its reference from, if any."""
        if self.field is not None:
            return self.field
        return "answer" if self.name in ("exact_match", "numeric_match") else None


class GRPOMethod(_Section):
    """Group relative policy optimisation (TRL ``GRPOTrainer``) with verifiable rewards."""

    kind: Literal["grpo"] = "grpo"
    rewards: list[RewardSpec] = Field(min_length=1, description="Reward functions; the reward is their weighted sum.")
    num_generations: int = Field(default=8, ge=2, description="Group size: completions sampled per prompt.")
    beta: float = Field(default=0.0, ge=0, description="KL coefficient against the reference model (0: no reference kept).")
    max_completion_length: int = Field(default=256, gt=0, description="Tokens generated per completion at most.")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature of the completions.")
    epsilon: float = Field(default=0.2, gt=0, lt=1, description="Clipping range of the policy ratio.")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo", "cispo"] = Field(default="dapo", description="GRPO loss normalisation (TRL `loss_type`).")


MethodSpec = Annotated[SFTMethod | DPOMethod | GRPOMethod, Field(discriminator="kind")]
"""The ``method`` section: one of the methods above, chosen by ``kind``."""


class AdapterSpec(_Section):
    kind: Literal["lora", "qlora", "none"] = Field(
        default="lora",
        description="`lora` trains a LoRA adapter; `qlora` the same on a 4-bit base (bitsandbytes, CUDA GPU); "
        "`none` is a full fine-tune.",
    )
    r: int = Field(default=16, gt=0, description="LoRA rank.")
    alpha: int = Field(default=32, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: str | list[str] = Field(default="all-linear", description="Modules to adapt: `all-linear` or a list of names.")
    target_parameters: list[str] | None = Field(
        default=None,
        description="Parameters to adapt directly, e.g. the fused routed experts of a mixture-of-experts base "
        "(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), which `all-linear` does not cover (PEFT `target_parameters`).",
    )
    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="qlora: 4-bit data type of the frozen base.")


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
    # Two at least: HF deletes the older checkpoint right after writing a new one, before we mark
    # the new one complete, so a kill in between must still leave one complete checkpoint.
    save_total_limit: int = Field(default=2, ge=2, description="Checkpoints kept on disk (the best one is always kept).")
    seed: int = Field(default=42, description="Random seed for data order and initialisation.")
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass: less memory, ~30% more compute."
    )
    resume: Literal["auto", "never"] = Field(
        default="auto",
        description="`auto` continues an interrupted job from its newest complete checkpoint, in the same MLflow run; "
        "`never` always starts over.",
    )
    eval_steps: int | None = Field(
        default=None, gt=0, description="Evaluate on held-out data every this many steps (eval loss + the method's task metric)."
    )
    eval_samples: int = Field(default=64, gt=0, description="Held-out rows used by each evaluation during training.")
    best_metric: str | None = Field(
        default=None,
        description="Keep the checkpoint with the best value of this eval metric as the result "
        "(sft: loss, accuracy; dpo: loss, rewards/margins, rewards/accuracies; grpo: reward, loss).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainSpec:
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError("max_steps must be -1 (train for `epochs`) or a positive number of steps")
        if self.best_metric is not None:
            if self.eval_steps is None:
                raise ValueError("best_metric needs evaluations: set eval_steps (e.g. eval_steps: 50)")
            if self.save_steps % self.eval_steps:
                raise ValueError(
                    f"best_metric needs a checkpoint at every evaluation: save_steps ({self.save_steps}) must be "
                    f"a multiple of eval_steps ({self.eval_steps})"
                )
        return self


class DistributedSpec(_Section):
    """How many processes train on this machine, and how they share the work."""

    strategy: Literal["none", "ddp", "deepspeed"] = Field(
        default="none", description="`none`: one process; `ddp`: data parallel; `deepspeed`: ZeRO sharding."
    )
    nproc: int = Field(default=1, ge=1, description="Processes (one per GPU; on CPU, one per core you give it).")
    zero_stage: Literal[2, 3] = Field(default=2, description="deepspeed: ZeRO stage (3 also shards the weights).")
    offload: Literal["none", "cpu"] = Field(default="none", description="deepspeed: move optimizer state (and, stage 3, weights) to CPU memory.")
    config_file: str | None = Field(
        default=None, description="deepspeed: your own DeepSpeed JSON instead of the generated one (relative to the recipe)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> DistributedSpec:
        if self.strategy == "none" and self.nproc > 1:
            raise ValueError(f"nproc is {self.nproc} but strategy is `none`: set strategy to ddp or deepspeed")
        if self.strategy == "ddp" and self.nproc < 2:
            raise ValueError("ddp needs nproc >= 2: set nproc, or strategy: none for one process")
        # Compared with the defaults rather than `model_fields_set`, so a dumped job reloads.
        deepspeed_only = [name for name in ("zero_stage", "offload", "config_file")
                          if getattr(self, name) != DistributedSpec.model_fields[name].default]
        if self.strategy != "deepspeed" and deepspeed_only:
            raise ValueError(f"{', '.join(sorted(deepspeed_only))} only apply to strategy: deepspeed")
        return self


class EvaluateSpec(_Section):
    max_samples: int = Field(default=200, gt=0, description="Evaluate on at most this many held-out rows.")
    max_new_tokens: int = Field(default=16, gt=0, description="Tokens generated per answer for exact-match accuracy.")
    batch_size: int = Field(default=32, gt=0, description="Rows generated at once.")
    samples: int = Field(
        default=8, gt=0, description="GRPO versions: completions sampled per held-out prompt (pass@k is estimated from them)."
    )
    pass_k: int = Field(default=4, gt=0, description="GRPO versions: the k of the reported pass@k (at most `samples`).")
    seed: int = Field(default=0, description="GRPO versions: sampling seed (the base and the version draw alike).")
    suites: list[str] = Field(
        default_factory=list,
        description="Suite files (relative to the recipe) scored besides the task: general capability, judge, safety "
        "(`recipes/suites/`, docs/EVALUATION.md).",
    )

    @model_validator(mode="after")
    def _k_within_samples(self) -> EvaluateSpec:
        if self.pass_k > self.samples:
            raise ValueError(f"pass_k {self.pass_k} exceeds samples {self.samples}; fix: set samples >= pass_k")
        return self
