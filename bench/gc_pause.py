"""How long a full garbage collection stops a started worker, with and without its start-up heap frozen.

A full collection holds the GIL while it walks every tracked object: for that long no request
moves. `run_server` freezes what start-up made (`serving.startup_heap`); this measures, in one
process, a worker as it starts (a PyTorch engine on a random Llama, the gateway app, its
lifespan run, a few requests served) and its full-collection pause before and after the
freeze.

    python -m bench.gc_pause [--size small] [--rounds 7] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.harness import show_result
from bench.models import build_llama
from serving.gateway.app import create_app
from serving.gateway.catalog import ServedModel, StaticCatalog
from serving.startup_heap import freeze_startup_heap

MODEL = "bench"


def _full_collection_ms(rounds: int) -> list[float]:
    pauses = []
    for _ in range(rounds):
        began = time.perf_counter()
        gc.collect()
        pauses.append(1000 * (time.perf_counter() - began))
    return pauses


async def _measure(model_dir: Path, rounds: int) -> dict[str, float]:
    from serving.engine.torch_engine import TorchEngine

    engine = TorchEngine(model_dir, device="cpu", num_threads=1, model_id=MODEL)
    app = create_app(StaticCatalog([ServedModel(name=MODEL, version="1", engine=engine)]), max_new_tokens=8)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Where is my order?"}], "max_tokens": 4}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:

            async def serve_some() -> None:  # what a serving worker allocates between collections
                for _ in range(8):
                    (await client.post("/v1/chat/completions", json=body)).raise_for_status()

            await serve_some()
            tracked = len(gc.get_objects())
            unfrozen = _full_collection_ms(rounds)
            frozen_count = freeze_startup_heap()
            try:
                await serve_some()
                frozen = _full_collection_ms(rounds)
                left = len(gc.get_objects())
            finally:
                gc.unfreeze()
    unfrozen_ms, frozen_ms = statistics.median(unfrozen), statistics.median(frozen)
    return {
        "tracked_objects": tracked,
        "frozen_objects": frozen_count,
        "tracked_after_freeze": left,
        "full_collection_ms": unfrozen_ms,
        "full_collection_frozen_ms": frozen_ms,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", help="bench.models size of the random Llama (default small)")
    parser.add_argument("--rounds", type=int, default=7, help="full collections timed each way (median reported)")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="forgeline-gc-") as work:
        model_dir = build_llama(Path(work) / "llama", args.size)
        result = asyncio.run(_measure(model_dir, args.rounds))
    show_result(result, args.out)
    print(
        f"\n| started worker ({args.size} Llama) | tracked objects | full collection (median of {args.rounds}) |\n"
        "|---|---|---|\n"
        f"| start-up heap not frozen | {result['tracked_objects']:,} | {result['full_collection_ms']:.1f} ms |\n"
        f"| frozen (`run_server`) | {result['tracked_after_freeze']:,} | {result['full_collection_frozen_ms']:.3f} ms |\n"
        f"\nA full collection stops every request for {result['full_collection_ms']:.0f} ms in a started worker, "
        f"{result['full_collection_frozen_ms']:.3f} ms once its start-up heap is frozen."
    )


if __name__ == "__main__":
    main()
