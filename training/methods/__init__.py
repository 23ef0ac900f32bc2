"""One module per post-training method, each translating recipe sections into its TRL trainer.

``build_config`` and ``build_trainer`` pick the module by ``method.kind``; the modules share
``base.common_args``. The config comes first, before the weights are loaded: under ZeRO-3
the Hugging Face integration then loads the model already sharded across the processes.
"""

from __future__ import annotations

from typing import Any

from ..config import DPOMethod, GRPOMethod, MethodSpec, SFTMethod
from .base import TrainerInputs

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "sft": ("loss", "accuracy", "mean_token_accuracy"),
    "dpo": ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen"),
    "grpo": ("reward", "loss"),
}
"""Eval metrics each method logs during training (usable as ``train.best_metric``)."""


def build_config(method: MethodSpec, inputs: TrainerInputs) -> Any:
    """The TRL config (``SFTConfig`` | ``DPOConfig`` | ``GRPOConfig``) for ``method``."""
    if isinstance(method, SFTMethod):
        from .sft import sft_config

        return sft_config(method, inputs)
    if isinstance(method, DPOMethod):
        from .dpo import dpo_config

        return dpo_config(method, inputs)
    if isinstance(method, GRPOMethod):
        from .grpo import grpo_config

        return grpo_config(method, inputs)
    raise TypeError(f"unknown method {method!r}")  # unreachable: the recipe schema is a closed union


def build_trainer(method: MethodSpec, inputs: TrainerInputs, args: Any) -> Any:
    """A ready TRL trainer for ``method`` with the config from ``build_config``; ``inputs.model`` must be loaded."""
    if isinstance(method, SFTMethod):
        from .sft import build_sft_trainer

        return build_sft_trainer(method, inputs, args)
    if isinstance(method, DPOMethod):
        from .dpo import build_dpo_trainer

        return build_dpo_trainer(method, inputs, args)
    if isinstance(method, GRPOMethod):
        from .grpo import build_grpo_trainer

        return build_grpo_trainer(method, inputs, args)
    raise TypeError(f"unknown method {method!r}")  # unreachable: the recipe schema is a closed union


__all__ = ["TASK_METRICS", "TrainerInputs", "build_config", "build_trainer"]
