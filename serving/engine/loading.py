"""Load a transformers causal LM and its tokenizer for serving, refusing incomplete weights."""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.errors import ErrorCode, ForgelineError
from serving.engine.base import ENGINE_DTYPES, EngineDtype
from serving.stop_tokens import stop_token_ids

logger = logging.getLogger(__name__)

LOAD_LOCK = threading.Lock()
"""Serialises model (and adapter) loading in this process.

transformers' lazy module import is not thread-safe (a second thread got "cannot import
name AutoModelForCausalLM"), and loading patches process-wide state (weight-init
functions, default device), so `serve --base a --base b` failed at start-up or kept
randomly initialised weights."""


def max_prompt_chars(tokenizer: Any, max_context: int | None) -> int | None:
    """Characters beyond which a prompt cannot fit ``max_context`` tokens, or None when unknown.

    No token covers more characters than its vocabulary string has (byte-level tokens have
    one symbol per byte, every character is at least one byte), so a prompt longer than
    ``max_context`` times the longest one needs more tokens than fit. Only sound when the
    tokenizer has no normalizer (which could shrink the text first, e.g. by stripping accents).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if max_context is None or backend is None or backend.normalizer is not None:
        return None
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    longest = max((len(t) for t in tokens if t), default=0)
    return max_context * longest if longest else None


def check_loading_info(source: str, info: Mapping[str, Any]) -> None:
    """Refuse weights that loaded incompletely (transformers only warns, then serves random weights).

    Args:
        source: the folder loaded, for the message.
        info: ``from_pretrained(..., output_loading_info=True)``'s second value.

    Raises:
        ForgelineError: ``unavailable`` naming the missing, unexpected or mismatched weights.
    """
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        found = [str(k) for k in (info.get(kind) or ())]
        if found:
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            problems.append(f"{kind.replace('_', ' ')}: {shown}")
    if problems:
        raise ForgelineError(
            f"the weights in {source} loaded incompletely ({'; '.join(problems)}); refusing to serve a partly "
            "random model; fix: rebuild the engine artifact (`forgeline build`) and check it matches its config",
            code=ErrorCode.UNAVAILABLE,
        )


@dataclass
class LoadedModel:
    """What serving needs to know about a loaded model."""

    model: Any
    tokenizer: Any
    device: Any
    eos_ids: set[int]
    pad_id: int
    max_context: int | None
    cache_kwarg: str  # the forward's name for the KV cache argument
    forward_kwargs: dict[str, Any]
    num_threads: int | None  # CPU intra-op threads for the worker, None on GPUs


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX or AVX-512 BF16; Linux's flags)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def check_dtype(dtype: str) -> EngineDtype:
    """``dtype`` when the engine serves in it (`serving.engine.base.ENGINE_DTYPES`).

    Raises:
        ForgelineError: ``invalid_config`` naming the value and the choices.
    """
    if dtype not in ENGINE_DTYPES:
        raise ForgelineError(
            f"dtype {dtype!r} is not one the engine serves in; use one of {', '.join(ENGINE_DTYPES)}",
            code=ErrorCode.INVALID_CONFIG,
            param="dtype",
        )
    return dtype  # type: ignore[return-value]


def _torch_dtype(dtype: str, device: Any) -> Any:
    """The dtype `from_pretrained` gets for ``dtype`` (`serving.engine.base.EngineDtype`) on ``device``."""
    import torch

    if check_dtype(dtype) != "auto":
        return getattr(torch, dtype)
    if device.type != "cpu":
        return "auto"  # on GPUs keep the dtype the artifact was saved in
    if cpu_has_bf16_matmul():
        logger.info(
            "this CPU has bf16 matrix instructions: dtype bfloat16 decodes about twice as fast as the "
            "float32 served by default (BENCHMARKS.md §2c)"
        )
    # bf16 matmuls are slow on CPUs without those instructions, and change greedy outputs.
    return torch.float32


def cache_kwarg(model: Any) -> str:
    """The name ``model.forward`` takes its KV cache under.

    transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name is deprecated until 5.40).
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def load_model(model_dir: Path, device_spec: str, num_threads: int | None, dtype: str = "auto") -> LoadedModel:
    """Load ``model_dir`` on ``device_spec`` (``auto``, ``cpu``, ``cuda[:N]``) in ``dtype``, one load at a time.

    Raises:
        ForgelineError: ``unavailable`` when the weights load incompletely; ``invalid_config``
            for a dtype not in `serving.engine.base.ENGINE_DTYPES`.
    """
    with LOAD_LOCK:
        return _load(model_dir, device_spec, num_threads, dtype)


def _load(model_dir: Path, device_spec: str, num_threads: int | None, dtype_name: str) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device_spec == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_spec)
    dtype = _torch_dtype(dtype_name, device)
    logger.info("loading %s on %s (%s)", model_dir, device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    loaded: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, output_loading_info=True)
    model, info = loaded
    check_loading_info(str(model_dir), info)
    model = model.to(device).eval()

    # The artifact's generation_config lists every turn-ending token (one source of truth).
    eos = set(stop_token_ids(model.generation_config, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = inspect.signature(model.forward).parameters
    threads = None
    if device.type == "cpu":
        cores = os.cpu_count() or 1
        threads = num_threads or min(torch.get_num_threads(), max(1, cores - 1))
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        eos_ids=eos,
        pad_id=int(pad) if pad is not None else 0,
        max_context=getattr(model.config, "max_position_embeddings", None),
        cache_kwarg=cache_kwarg(model),
        forward_kwargs={"logits_to_keep": 1} if "logits_to_keep" in params else {},
        num_threads=threads,
    )
