"""Loading a base model and tokenizer: a local folder or a hub id, the same code path."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from registry.errors import ErrorCode, ForgelineError

from .config import ModelSpec

log = logging.getLogger(__name__)


def torch_dtype(spec: ModelSpec) -> Any:
    """The dtype to load weights in: float32 on CPU (bf16 matmuls are slow there), bf16 on GPU."""
    import torch

    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_tokenizer(spec: ModelSpec, source: str | None = None) -> Any:
    """The tokenizer of ``source`` (default: the base), with the recipe's chat template applied.

    A pad token is required for batching; models that ship without one reuse eos.
    """
    from transformers import AutoTokenizer

    name = source or spec.base
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=spec.trust_remote_code)
    except OSError as err:
        raise ForgelineError(
            f"cannot load tokenizer from {name!r}: {err}; fix: give a local model folder or a hub id you can reach",
            code=ErrorCode.INVALID_CONFIG,
            param="model.base",
        ) from err
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ForgelineError(
            f"tokenizer of {name!r} has no chat template; fix: set model.chat_template in the recipe",
            code=ErrorCode.INVALID_CONFIG,
            param="model.chat_template",
        )
    return tokenizer


def load_base_model(spec: ModelSpec, *, quantization: Any | None = None) -> Any:
    """The base causal LM, from a local folder or a hub id.

    Args:
        spec: the recipe's ``model`` section.
        quantization: a ``BitsAndBytesConfig`` (QLoRA); the weights then go to this
            process's GPU (``LOCAL_RANK``), as each data-parallel rank holds a full copy.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if quantization is not None:
        kwargs = {"quantization_config": quantization, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec.base, dtype=torch_dtype(spec), trust_remote_code=spec.trust_remote_code, **kwargs
        )
    except OSError as err:
        raise ForgelineError(
            f"cannot load model {spec.base!r}: {err}; fix: give a local model folder or a hub id you can reach",
            code=ErrorCode.INVALID_CONFIG,
            param="model.base",
        ) from err
    log.info("loaded base %s (%.1fM parameters)", spec.base, model.num_parameters() / 1e6)
    return model


def load_adapted_model(spec: ModelSpec, adapter_dir: str | Path | None) -> Any:
    """Base model with a PEFT adapter on top (not merged), or the plain base when none."""
    model = load_base_model(spec)
    if adapter_dir is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir))
