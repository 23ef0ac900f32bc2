"""The PyTorch engine in bfloat16 against float32 on this CPU: the same requests, the same threads, one run.

Two engines on the same random Llama, one per dtype, take turns serving the same burst of
concurrent chat requests (greedy), round after round; the figures are tokens/s and time to
first token, and their ratio bf16 / float32 per round. On CPUs with bf16 matrix
instructions (AMX, AVX-512 BF16) bf16 halves the weight bytes read per token and runs the
GEMMs natively; elsewhere it is usually slower, which is why float32 stays the default.

    python -m bench.cpu_dtype [--size small] [--requests 16] [--max-tokens 32] [--rounds 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.engine_batching import _threads, run_batched
from bench.harness import show_result
from bench.models import build_llama, prompts
from serving.engine.loading import cpu_has_bf16_matmul

DTYPES = ("float32", "bfloat16")


async def _rounds(model_dir: Path, texts: list[str], max_tokens: int, rounds: int) -> list[dict[str, Any]]:
    from serving.engine.torch_engine import TorchEngine

    engines = {
        d: TorchEngine(model_dir, device="cpu", dtype=d, max_batch_size=len(texts), num_threads=_threads(), model_id=d)  # type: ignore[arg-type]
        for d in DTYPES
    }
    for engine in engines.values():
        await engine.start()
    try:
        for engine in engines.values():  # warm-up: first-call allocations and kernel selection
            await run_batched(engine, texts[:2], 4)
        results = []
        for i in range(rounds):
            order = DTYPES if i % 2 == 0 else DTYPES[::-1]  # alternate who goes first
            results.append({d: await run_batched(engines[d], texts, max_tokens) for d in order})
        return results
    finally:
        for engine in engines.values():
            await engine.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", help="bench.models size of the random Llama")
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests per burst")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the rounds to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="forgeline-dtype-") as work:
        model_dir = build_llama(Path(work) / "llama", args.size)
        texts = prompts(model_dir, args.requests)
        rounds = asyncio.run(_rounds(model_dir, texts, args.max_tokens, args.rounds))
    speed = [r["bfloat16"]["tokens_per_s"] / r["float32"]["tokens_per_s"] for r in rounds]
    ttft = [r["bfloat16"]["ttft_ms"]["p50"] / r["float32"]["ttft_ms"]["p50"] for r in rounds]
    result = {"cpu_has_bf16_matmul": cpu_has_bf16_matmul(), "rounds": rounds}
    show_result(result, args.out)
    print(
        f"\n| {args.size} Llama, {args.requests} concurrent requests x {args.max_tokens} tokens, {_threads()} thread(s) "
        "| float32 | bfloat16 | bf16 / fp32 (median, range) |\n|---|---|---|---|\n"
        f"| tokens/s | {statistics.median(r['float32']['tokens_per_s'] for r in rounds):.0f} "
        f"| {statistics.median(r['bfloat16']['tokens_per_s'] for r in rounds):.0f} "
        f"| {statistics.median(speed):.2f}x ({min(speed):.2f}-{max(speed):.2f}) |\n"
        f"| TTFT p50 | {statistics.median(r['float32']['ttft_ms']['p50'] for r in rounds):.0f} ms "
        f"| {statistics.median(r['bfloat16']['ttft_ms']['p50'] for r in rounds):.0f} ms "
        f"| {statistics.median(ttft):.2f}x ({min(ttft):.2f}-{max(ttft):.2f}) |\n"
        f"\nbf16 matrix instructions on this CPU: {'yes' if cpu_has_bf16_matmul() else 'no'}."
    )


if __name__ == "__main__":
    main()
