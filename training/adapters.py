"""Adapters: LoRA and QLoRA through PEFT (TRL wraps the model), or none for a full fine-tune."""

from __future__ import annotations

import importlib.util
from typing import Any

from registry.errors import FieldProblem

from .config import AdapterSpec


def peft_config(adapter: AdapterSpec) -> Any | None:
    """PEFT ``LoraConfig`` for the recipe's adapter, or None for a full fine-tune."""
    if adapter.kind == "none":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        target_parameters=adapter.target_parameters,
        task_type="CAUSAL_LM",
    )


def quantization_config(adapter: AdapterSpec) -> Any | None:
    """The 4-bit bitsandbytes config the base is loaded with for QLoRA, else None."""
    if adapter.kind != "qlora":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=adapter.quant_type,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def check_adapter(adapter: AdapterSpec) -> list[FieldProblem]:
    """What this machine lacks for the adapter (QLoRA needs a CUDA GPU and bitsandbytes)."""
    if adapter.kind != "qlora":
        return []
    import torch

    problems = []
    if not torch.cuda.is_available():
        problems.append(
            FieldProblem(
                "adapter.kind", "qlora loads the base in 4 bits with bitsandbytes, which needs a CUDA GPU; none is visible",
                "qlora", "use `kind: lora` (same adapter, full-precision base) here, or run on a machine with an NVIDIA GPU",
            )
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append(
            FieldProblem("adapter.kind", "qlora needs the bitsandbytes package", "qlora", "pip install 'forgeline[qlora]' (bitsandbytes)")
        )
    return problems
