"""``forgeline worker``: run our PyTorch engine as an OpenAI-compatible worker.

Registered on the main app in ``forgeline/cli.py``; kept in its own module so the worker's
options do not crowd the gateway's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from registry.errors import ErrorCode, ForgelineError
from serving.engine.base import DEFAULT_MAX_BATCH_SIZE

logger = logging.getLogger(__name__)
console = Console(stderr=False)


def worker(
    artifact: Annotated[Path | None, typer.Option("--artifact", help="A torch engine artifact folder (`forgeline build`).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Or a registry ref whose torch artifact to serve, e.g. quickstart@production.")] = None,
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    name: Annotated[str | None, typer.Option(help="Model name clients send (default: folder name or the ref's names).")] = None,
    adapter: Annotated[
        list[str] | None, typer.Option("--adapter", help="NAME=ADAPTER_DIR: serve a PEFT LoRA adapter as MODEL:NAME (repeatable).")
    ] = None,
    device: Annotated[str, typer.Option(help="Torch device: auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Weights' dtype: auto (float32 on CPUs), float32, bfloat16 (about 2x faster on CPUs with AMX/AVX-512 BF16), float16.")] = "auto",
    max_batch_size: Annotated[int, typer.Option(help="Most requests decoded together.")] = DEFAULT_MAX_BATCH_SIZE,
    max_new_tokens: Annotated[int, typer.Option(help="Default and upper bound of max_tokens.")] = 512,
) -> None:
    """Serve one model as an OpenAI-compatible worker (no API keys) for a gateway upstream."""
    from serving.engine.loading import check_dtype
    from serving.gateway.server import run_server
    from serving.worker import artifact_catalog, parse_adapter_options, worker_app

    if (artifact is None) == (model is None):
        raise ForgelineError("give exactly one of --artifact DIR or --model REF", code=ErrorCode.INVALID_CONFIG, param="artifact")
    engine_dtype = check_dtype(dtype)
    adapters = parse_adapter_options(adapter or [])
    if artifact is not None:
        catalog = artifact_catalog(artifact, name=name, adapters=adapters, device=device, dtype=engine_dtype, max_batch_size=max_batch_size)
    else:
        if adapters or name:
            raise ForgelineError("--adapter and --name go with --artifact only", code=ErrorCode.INVALID_CONFIG, param="adapter")
        from registry.client import Registry
        from serving.config import ServeSpec
        from serving.registry_models import registry_catalog

        assert model is not None
        catalog = registry_catalog(Registry(), [model], spec=ServeSpec(device=device, dtype=engine_dtype, max_batch_size=max_batch_size))
    names = ", ".join(n for served in catalog.list() for n in served.names)
    console.print(f"worker serving {names} on http://{host}:{port}/v1", highlight=False)
    run_server(worker_app(catalog, max_new_tokens=max_new_tokens), host, port)
