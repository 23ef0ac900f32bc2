"""The pinned ``trtllm-serve`` configuration: options tuned for H200, the YAML, the argv.

Two outputs describe how a TensorRT-LLM worker serves an artifact, and both are generated
here from one `TrtllmServeOptions`:

* ``serve/extra_llm_api_options.yaml``: LLM API fields that have no CLI flag (KV-cache
  dtype, CUDA graphs, chunked prefill, LoRA), passed with ``--extra_llm_api_options``;
* the ``trtllm-serve`` argv, as a template with ``{artifact}``, ``{host}`` and ``{port}``
  placeholders, stored in the manifest so that any launcher (docker, Slurm, Kubernetes,
  the in-container entry point) starts the worker the same way.

Every field name used here is listed, with the page that documents it, in
``tests/unit/serving/test_trtllm_contract.py``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from registry.errors import ErrorCode, ForgelineError

logger = logging.getLogger(__name__)

SERVE_DIR = "serve"
EXTRA_OPTIONS_FILE = f"{SERVE_DIR}/extra_llm_api_options.yaml"
CHECKPOINT_DIR = "checkpoint"
QUANTIZED_DIR = "quantized"
ENGINE_DIR = "engine"
ADAPTERS_DIR = "adapters"

ARTIFACT = "{artifact}"
HOST = "{host}"
PORT = "{port}"

# HF module names (PEFT ``target_modules``) -> TensorRT-LLM LoRA module names; the inverse
# of TensorRT-LLM's documented default ``trtllm_modules_to_hf_modules`` for Llama-style models.
HF_TO_TRTLLM_LORA_MODULES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_dense",
    "gate_proj": "mlp_h_to_4h",
    "down_proj": "mlp_4h_to_h",
    "up_proj": "mlp_gate",
}

# Decode batch sizes worth a CUDA graph on H200; padding rounds other sizes up to these.
_H200_CUDA_GRAPH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_MAX_GPUS_PER_NODE = 8  # HGX H200: a worker with tp * pp > 8 spans nodes (not supported yet)


class TrtllmConfigError(ForgelineError):
    """A TensorRT-LLM build or serve option is invalid."""

    code = ErrorCode.INVALID_CONFIG


class LoraServeOptions(BaseModel):
    """Multi-LoRA settings: adapters stay separate and are chosen per request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapters: dict[str, str] = Field(description="Adapter name -> folder relative to the artifact root.")
    max_lora_rank: int = Field(gt=0, description="Largest rank of any adapter (`lora_config.max_lora_rank`).")
    max_loras: int = Field(gt=0, description="Adapters resident on the GPU at once (`lora_config.max_loras`).")
    max_cpu_loras: int = Field(gt=0, description="Adapters cached in host memory (`lora_config.max_cpu_loras`).")
    target_modules: list[str] = Field(description="TensorRT-LLM module names (`lora_config.lora_target_modules`).")

    @model_validator(mode="after")
    def _cpu_cache_holds_gpu_set(self) -> LoraServeOptions:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        unknown = sorted(set(self.target_modules) - set(HF_TO_TRTLLM_LORA_MODULES.values()))
        if unknown:
            raise ValueError(f"unknown TensorRT-LLM LoRA modules {unknown}; use {sorted(HF_TO_TRTLLM_LORA_MODULES.values())}")
        return self


class TrtllmServeOptions(BaseModel):
    """How ``trtllm-serve`` runs an artifact; the defaults come from `h200_serve_options`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["pytorch", "tensorrt"] = Field(default="pytorch", description="`--backend`; tensorrt serves a serialized engine.")
    weights: Literal["bf16", "fp8"] = Field(default="bf16", description="Weight precision of the served checkpoint.")
    tp_size: int = Field(default=1, description="`--tp_size`: tensor-parallel GPUs.")
    pp_size: int = Field(default=1, ge=1, description="`--pp_size`: pipeline stages.")
    max_batch_size: int = Field(default=256, gt=0, description="`--max_batch_size`: requests scheduled together.")
    max_num_tokens: int = Field(default=8192, gt=0, description="`--max_num_tokens`: tokens per scheduler step.")
    max_seq_len: int | None = Field(default=None, gt=0, description="`--max_seq_len`; None lets TensorRT-LLM read the model config.")
    kv_cache_free_gpu_memory_fraction: float = Field(default=0.9, gt=0, le=1, description="Share of free GPU memory for the KV cache.")
    kv_cache_dtype: Literal["auto", "fp8"] = Field(default="fp8", description="`kv_cache_config.dtype`.")
    enable_block_reuse: bool = Field(default=True, description="`kv_cache_config.enable_block_reuse` (prefix reuse).")
    cuda_graph_batch_sizes: list[int] = Field(default_factory=list, description="`cuda_graph_config.batch_sizes` (pytorch backend).")
    cuda_graph_padding: bool = Field(default=True, description="`cuda_graph_config.enable_padding`.")
    enable_chunked_prefill: bool = Field(default=True, description="`enable_chunked_prefill`: split long prompts across steps.")
    lora: LoraServeOptions | None = Field(default=None, description="Multi-LoRA settings, or None for a merged model.")

    @model_validator(mode="after")
    def _check(self) -> TrtllmServeOptions:
        if self.tp_size not in (1, 2, 4, 8):
            raise ValueError(f"tp_size must be 1, 2, 4 or 8 (GPUs of one H200 node), got {self.tp_size}")
        if self.tp_size * self.pp_size > _MAX_GPUS_PER_NODE:
            raise ValueError(f"tp_size * pp_size = {self.tp_size * self.pp_size} GPUs; one worker uses at most 8 (one node)")
        too_big = [b for b in self.cuda_graph_batch_sizes if b > self.max_batch_size or b <= 0]
        if too_big:
            raise ValueError(f"cuda_graph_batch_sizes {too_big} must be in 1..max_batch_size ({self.max_batch_size})")
        if self.backend == "tensorrt" and self.cuda_graph_batch_sizes:
            raise ValueError("cuda_graph_batch_sizes apply to the pytorch backend only; leave them empty for tensorrt")
        return self

    @property
    def gpus(self) -> int:
        """GPUs one worker occupies."""
        return self.tp_size * self.pp_size

    @property
    def model_dir(self) -> str:
        """Folder, relative to the artifact root, that ``trtllm-serve`` is given as MODEL."""
        if self.backend == "tensorrt":
            return ENGINE_DIR
        return QUANTIZED_DIR if self.weights == "fp8" else CHECKPOINT_DIR


def _invalid(exc: ValueError | Exception, param: str) -> TrtllmConfigError:
    return TrtllmConfigError(f"invalid TensorRT-LLM option: {exc}", param=param)


def h200_serve_options(
    *,
    backend: Literal["pytorch", "tensorrt"] = "pytorch",
    tp: int = 1,
    pp: int = 1,
    quantize: Literal["none", "fp8"] = "none",
    lora: LoraServeOptions | None = None,
    max_seq_len: int | None = None,
    **overrides: Any,
) -> TrtllmServeOptions:
    """Serving options tuned for H200 (141 GB HBM3e, FP8 tensor cores).

    * FP8 KV cache always: sm90 supports it and it doubles the tokens the cache holds.
    * 90% of the memory left after weights goes to the KV cache; 85% with multi-LoRA,
      because the LoRA cache lives in the same pool.
    * CUDA graphs for decode batches 1..max_batch_size with padding (pytorch backend).
    * Chunked prefill, so a long prompt cannot stall every decoding request.

    Args:
        backend: ``pytorch`` (TensorRT-LLM's default) or ``tensorrt`` (serialized engine).
        tp: tensor-parallel GPUs (1, 2, 4 or 8).
        pp: pipeline stages.
        quantize: ``fp8`` serves an FP8 (ModelOpt) checkpoint or engine.
        lora: multi-LoRA settings, or None for a merged model.
        max_seq_len: longest prompt + completion; None reads it from the model config.
        **overrides: any other `TrtllmServeOptions` field.

    Raises:
        TrtllmConfigError: an option is out of range.
    """
    max_batch_size = int(overrides.pop("max_batch_size", 256))
    graphs = [] if backend == "tensorrt" else [b for b in _H200_CUDA_GRAPH_SIZES if b <= max_batch_size]
    if graphs and graphs[-1] != max_batch_size:
        graphs.append(max_batch_size)
    values: dict[str, Any] = {
        "backend": backend,
        "weights": "fp8" if quantize == "fp8" else "bf16",
        "tp_size": tp,
        "pp_size": pp,
        "max_batch_size": max_batch_size,
        "max_num_tokens": 8192,
        "max_seq_len": max_seq_len,
        "kv_cache_free_gpu_memory_fraction": 0.85 if lora is not None else 0.9,
        "kv_cache_dtype": "fp8",
        "cuda_graph_batch_sizes": graphs,
        "lora": lora,
    }
    values.update(overrides)
    try:
        return TrtllmServeOptions(**values)
    except ValueError as exc:
        raise _invalid(exc, "serve") from exc


def lora_options(adapters: dict[str, Path], relative: dict[str, str], *, max_loras: int = 8) -> LoraServeOptions:
    """Multi-LoRA settings read from PEFT adapter folders (``adapter_config.json``).

    Args:
        adapters: adapter name -> local PEFT adapter folder.
        relative: adapter name -> where it sits in the artifact (``adapters/<name>``).
        max_loras: most adapters resident on the GPU at once.

    Raises:
        TrtllmConfigError: an adapter has no config, or targets modules TensorRT-LLM cannot serve.
    """
    if not adapters:
        raise TrtllmConfigError("multi-LoRA needs at least one adapter", param="adapters")
    ranks: list[int] = []
    modules: set[str] = set()
    for name, folder in adapters.items():
        config_file = folder / "adapter_config.json"
        if not config_file.is_file():
            raise TrtllmConfigError(f"adapter {name!r} at {folder} has no adapter_config.json; is it a PEFT adapter?", param="adapters")
        config = json.loads(config_file.read_text())
        ranks.append(int(config.get("r", 0)))
        targets = config.get("target_modules") or []
        if isinstance(targets, str):
            # PEFT allows a regex here; TensorRT-LLM needs explicit module names.
            raise TrtllmConfigError(
                f"adapter {name!r} targets modules by regex ({targets!r}); retrain with a list of module names", param="adapters"
            )
        for module in targets:
            mapped = HF_TO_TRTLLM_LORA_MODULES.get(module)
            if mapped is None:
                raise TrtllmConfigError(
                    f"adapter {name!r} targets {module!r}, which TensorRT-LLM cannot serve as LoRA; "
                    f"use any of {sorted(HF_TO_TRTLLM_LORA_MODULES)}",
                    param="adapters",
                )
            modules.add(mapped)
    order = list(HF_TO_TRTLLM_LORA_MODULES.values())
    try:
        return LoraServeOptions(
            adapters=dict(relative),
            max_lora_rank=max(ranks),
            max_loras=min(len(adapters), max_loras),
            max_cpu_loras=max(len(adapters), min(len(adapters), max_loras)),
            target_modules=sorted(modules, key=order.index),
        )
    except ValueError as exc:
        raise _invalid(exc, "adapters") from exc


def extra_llm_api_options(options: TrtllmServeOptions) -> dict[str, Any]:
    """The ``--extra_llm_api_options`` YAML content, as a dict.

    ``kv_cache_config`` repeats the memory fraction given on the command line because
    ``trtllm-serve`` replaces its whole ``KvCacheConfig`` with the YAML's: without it the
    fraction would silently fall back to the default.
    """
    kv_cache: dict[str, Any] = {
        "free_gpu_memory_fraction": options.kv_cache_free_gpu_memory_fraction,
        "enable_block_reuse": options.enable_block_reuse,
    }
    if options.backend == "pytorch":
        # A serialized engine has its KV-cache precision built in (kv_cache_quant_algo).
        kv_cache["dtype"] = options.kv_cache_dtype
    extra: dict[str, Any] = {"kv_cache_config": kv_cache, "enable_chunked_prefill": options.enable_chunked_prefill}
    if options.backend == "pytorch" and options.cuda_graph_batch_sizes:
        extra["cuda_graph_config"] = {
            "batch_sizes": list(options.cuda_graph_batch_sizes),
            "enable_padding": options.cuda_graph_padding,
        }
    if options.lora is not None:
        # No lora_dir: adapters arrive per request as `lora_request.lora_path`, so the
        # file stays valid wherever the worker mounts the artifact.
        extra["lora_config"] = {
            "lora_target_modules": list(options.lora.target_modules),
            "max_lora_rank": options.lora.max_lora_rank,
            "max_loras": options.lora.max_loras,
            "max_cpu_loras": options.lora.max_cpu_loras,
        }
    return extra


def render_yaml(extra: dict[str, Any]) -> str:
    """YAML text of `extra_llm_api_options`, keys in the order written."""
    import yaml

    header = "# Generated by forgeline for trtllm-serve --extra_llm_api_options; do not edit.\n"
    return header + yaml.safe_dump(extra, sort_keys=False, default_flow_style=None)


def serve_argv_template(options: TrtllmServeOptions) -> list[str]:
    """``trtllm-serve`` argv with ``{artifact}``, ``{host}`` and ``{port}`` placeholders."""
    argv = [
        "trtllm-serve",
        f"{ARTIFACT}/{options.model_dir}",
        "--host",
        HOST,
        "--port",
        PORT,
        "--backend",
        options.backend,
        "--max_batch_size",
        str(options.max_batch_size),
        "--max_num_tokens",
        str(options.max_num_tokens),
    ]
    if options.max_seq_len is not None:
        argv += ["--max_seq_len", str(options.max_seq_len)]
    argv += [
        "--tp_size",
        str(options.tp_size),
        "--pp_size",
        str(options.pp_size),
        "--kv_cache_free_gpu_memory_fraction",
        str(options.kv_cache_free_gpu_memory_fraction),
    ]
    if options.backend == "tensorrt":
        # An engine folder has no tokenizer; point at the checkpoint it was built from.
        argv += ["--tokenizer", f"{ARTIFACT}/{CHECKPOINT_DIR}"]
    argv += ["--extra_llm_api_options", f"{ARTIFACT}/{EXTRA_OPTIONS_FILE}"]
    return argv


def fill_argv(template: list[str], *, artifact: str | Path, host: str = "0.0.0.0", port: int = 8000) -> list[str]:
    """Substitute the placeholders of an argv template (plain replacement: paths may hold braces)."""
    root = str(artifact).rstrip("/") or "/"
    return [arg.replace(ARTIFACT, root).replace(HOST, host).replace(PORT, str(port)) for arg in template]
