"""``forgeline worker``: our PyTorch engine as a plain OpenAI-compatible worker.

A worker is the gateway app with a fixed catalog and no keys: the same kind of upstream a
gateway reaches through `serving.engine.upstream.UpstreamEngine` as a ``trtllm-serve``
worker on H200s, so the upstream path runs for real on machines without TensorRT-LLM.
PEFT LoRA adapters are served on the base weights and chosen by model name
(``NAME:ADAPTER``), the way vLLM serves ``--lora-modules``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI

from registry.errors import ErrorCode, ForgelineError, NotFoundError

from .artifacts.torch_build import load_manifest
from .engine.base import DEFAULT_BATCH_WINDOW_MS, DEFAULT_MAX_BATCH_SIZE, EngineDtype, SamplingDefaults
from .engine.torch_engine import TorchEngine
from .gateway.app import create_app
from .gateway.catalog import ServedModel, StaticCatalog

logger = logging.getLogger(__name__)


def parse_adapter_options(values: list[str]) -> dict[str, Path]:
    """``NAME=ADAPTER_DIR`` strings -> {name: PEFT adapter folder}.

    Raises:
        ForgelineError: a value is not ``NAME=DIR`` or a name repeats.
    """
    out: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder or ":" in name:
            raise ForgelineError(
                f"--adapter takes NAME=ADAPTER_DIR (a PEFT LoRA folder), got {value!r}", code=ErrorCode.INVALID_CONFIG, param="adapter"
            )
        if name in out:
            raise ForgelineError(f"--adapter {name} is given twice", code=ErrorCode.INVALID_CONFIG, param="adapter")
        out[name] = Path(folder)
    return out


def artifact_catalog(
    artifact: str | Path,
    *,
    name: str | None = None,
    adapters: dict[str, Path] | None = None,
    device: str = "auto",
    dtype: EngineDtype = "auto",
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    batch_window_ms: float = DEFAULT_BATCH_WINDOW_MS,
) -> StaticCatalog:
    """A catalog serving a torch artifact as ``name`` (and its adapters as ``name:ADAPTER``).

    Raises:
        NotFoundError: the folder is not a torch engine artifact, or an adapter folder is missing.
        ArtifactIntegrityError: a file does not match the artifact's checksums.
    """
    root = Path(artifact)
    model_name = name or root.name
    manifest = load_manifest(root)  # verifies checksums before the weights load
    for adapter_name, folder in (adapters or {}).items():
        if not (Path(folder) / "adapter_config.json").is_file():
            raise NotFoundError(f"adapter {adapter_name!r}: {folder} is not a PEFT adapter folder", param="adapter")
    engine = TorchEngine(
        root,
        device=device,
        dtype=dtype,
        max_batch_size=max_batch_size,
        batch_window_ms=batch_window_ms,
        model_id=model_name,
        adapters=dict(adapters) if adapters else None,
    )
    served = ServedModel(
        name=model_name, version=manifest.created_at.strftime("%Y%m%dT%H%M%S"), engine=engine, artifact=str(root),
        sampling_defaults=SamplingDefaults.from_model_dir(root),
    )  # fmt: skip
    logger.info("worker serves %s from %s with adapters %s", model_name, root, sorted(adapters or {}))
    return StaticCatalog([served])


def worker_app(catalog: StaticCatalog, *, max_new_tokens: int = 512) -> FastAPI:
    """The worker's ASGI app: the gateway's routes over ``catalog``, without API keys."""
    return create_app(catalog, max_new_tokens=max_new_tokens)
