"""One PyTorch engine behind the forgeline gateway, as its own process, for the open-loop benchmark.

``--engine continuous`` serves `serving.engine.torch_engine.TorchEngine` (continuous
batching); ``--engine static`` the engine as it was before (`bench.static_engine`). Auth is
off: the benchmark measures the engines, and `transformers serve` has none either.

    python -m bench.engine_server --engine continuous --model DIR --port 9000 --threads 1
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

MODEL = "bench"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a PyTorch engine behind the forgeline gateway")
    parser.add_argument("--engine", choices=("static", "continuous"), required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--prefix-cache-tokens", type=int, default=0)
    parser.add_argument("--batch-window-ms", type=float, default=None, help="the continuous engine's (default: its own)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from serving.gateway.app import create_app
    from serving.gateway.catalog import ServedModel, StaticCatalog
    from serving.gateway.server import run_server

    engine: object
    if args.engine == "static":
        from bench.static_engine import StaticTorchEngine

        engine = StaticTorchEngine(
            args.model, device="cpu", max_batch_size=args.max_batch_size, num_threads=args.threads, model_id=MODEL
        )
    else:
        from serving.engine.torch_engine import TorchEngine

        engine = TorchEngine(
            args.model,
            device="cpu",
            max_batch_size=args.max_batch_size,
            num_threads=args.threads,
            model_id=MODEL,
            prefix_cache_tokens=args.prefix_cache_tokens,
            **({} if args.batch_window_ms is None else {"batch_window_ms": args.batch_window_ms}),
        )
    app = create_app(StaticCatalog([ServedModel(name=MODEL, version="1", engine=engine)]), max_new_tokens=1024)  # type: ignore[arg-type]
    run_server(app, args.host, args.port, log_level="warning")  # as `forgeline serve`: its limits, its frozen heap


if __name__ == "__main__":
    main()
