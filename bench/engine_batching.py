"""Benchmark 2: the batched PyTorch engine against one-by-one ``generate``, 16 requests at once.

Both decode the same model greedily on the same CPU threads. The baseline is what a
naive server does: transformers' ``model.generate`` on each request in turn (its queue
time counts toward its time to first token, as a client would see it). The engine is
`serving.engine.torch_engine.TorchEngine` with the 16 requests submitted together.
Tokens are timed as they stream out (a transformers streamer for the baseline, the
engine's chunks for ours): tokens/s over the whole burst, time to first token from
submission, and inter-token latency (a chunk of k tokens counts as k equal gaps).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from bench import harness
from bench.models import TINY_BASE, build_llama, model_parameters, prompts
from bench.stats import percentiles, spread

logger = logging.getLogger(__name__)

NAME = "engine_batching"
GOAL_RATIO = 5.0

SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": {"model": "tiny-base", "requests": 4, "max_tokens": 6, "rounds": 1, "budget_s": 60.0},
    # Rounds stop early when the next would overrun budget_s.
    "full": {"model": "small", "requests": 16, "max_tokens": 32, "rounds": 3, "budget_s": 75.0},
}


def _threads() -> int:
    # The engine's own default on CPU: every core but one (the event loop needs one).
    return max(1, (os.cpu_count() or 1) - 1)


class _TimingStreamer:
    """A transformers streamer that records when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first pushes the prompt
            self._prompt_seen = True
            return
        now = time.perf_counter()
        self.times.extend([now] * int(value.numel()))

    def end(self) -> None:
        pass


def run_one_by_one(model: Any, tokenizer: Any, texts: list[str], max_tokens: int, threads: int) -> dict[str, Any]:
    """Every request through ``model.generate``, one after another; all arrive at t0."""
    import torch

    torch.set_num_threads(threads)  # per calling thread, like the engine's worker
    eos = tokenizer.eos_token_id
    ttft: list[float] = []
    itl: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=not text.startswith(tokenizer.bos_token or "\0"))
            streamer = _TimingStreamer()
            model.generate(
                **ids, max_new_tokens=max_tokens, do_sample=False, streamer=streamer, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos
            )
            if streamer.times:
                ttft.append(streamer.times[0] - t0)
                itl.extend(b - a for a, b in zip(streamer.times, streamer.times[1:], strict=False))
                tokens += len(streamer.times)
    wall = time.perf_counter() - t0
    return _figures(tokens, wall, ttft, itl)


async def run_batched(engine: Any, texts: list[str], max_tokens: int) -> dict[str, Any]:
    """Every request submitted to the engine at once."""
    from serving.engine.base import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    ttft: list[float] = []
    itl: list[float] = []
    tokens = 0
    t0 = time.perf_counter()

    async def one(text: str) -> None:
        nonlocal tokens
        last: float | None = None
        async for chunk in engine.generate(text, params):
            n = len(chunk.token_ids)
            if not n:
                continue
            now = time.perf_counter()
            if last is None:
                ttft.append(now - t0)
                gaps = n - 1  # the rest of a first multi-token chunk arrived with it
                gap = 0.0
            else:
                gaps, gap = n, (now - last) / n
            itl.extend([gap] * gaps)
            last = now
            tokens += n

    await asyncio.gather(*(one(t) for t in texts))
    wall = time.perf_counter() - t0
    return _figures(tokens, wall, ttft, itl)


def _figures(tokens: int, wall: float, ttft: list[float], itl: list[float]) -> dict[str, Any]:
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_ms": percentiles([x * 1000 for x in ttft], (50, 90, 99)),
        "itl_ms": percentiles([x * 1000 for x in itl], (50, 90, 99)),
    }


def run(setting: str, work: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.engine.torch_engine import TorchEngine

    cfg = SETTINGS[setting]
    budget = cfg["budget_s"] * harness.time_scale()
    model_dir = TINY_BASE if cfg["model"] == "tiny-base" else build_llama(work / f"llama-{cfg['model']}", cfg["model"])
    threads = _threads()
    texts = prompts(model_dir, cfg["requests"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = TorchEngine(model_dir, device="cpu", max_batch_size=cfg["requests"], num_threads=threads, model_id="bench")

    async def batched_rounds() -> list[dict[str, Any]]:
        await engine.start()
        try:
            await run_batched(engine, texts[:2], 2)  # warm-up
            out = []
            measuring = time.perf_counter()
            for i in range(cfg["rounds"]):
                round_began = time.perf_counter()
                out.append(await run_batched(engine, texts, cfg["max_tokens"]))
                # The baseline of the same round runs right after it, on the same threads.
                out[-1]["baseline"] = await asyncio.to_thread(run_one_by_one, model, tokenizer, texts, cfg["max_tokens"], threads)
                now = time.perf_counter()
                if i + 1 < cfg["rounds"] and (now - measuring) + (now - round_began) > budget:
                    logger.warning("stopping after %d of %d rounds: the next would overrun the %.0f s budget", i + 1, cfg["rounds"], budget)
                    break
            return out
        finally:
            await engine.stop()

    run_one_by_one(model, tokenizer, texts[:1], 2, threads)  # warm-up
    rounds = asyncio.run(batched_rounds())
    baseline = [r.pop("baseline") for r in rounds]
    for i, (b, e) in enumerate(zip(baseline, rounds, strict=True)):
        logger.info(
            "round %d: one-by-one %.0f tok/s, batched %.0f tok/s (%.1fx)", i, b["tokens_per_s"], e["tokens_per_s"], e["tokens_per_s"] / b["tokens_per_s"]
        )
    ratio = spread([e["tokens_per_s"] / b["tokens_per_s"] if b["tokens_per_s"] else None for b, e in zip(baseline, rounds, strict=True)])
    return {
        "goal_ratio": GOAL_RATIO,
        "model": {"name": cfg["model"], "parameters": model_parameters(model_dir) or sum(p.numel() for p in model.parameters())},
        "settings": cfg,
        "cpu_threads": threads,
        "rounds": {"one_by_one": baseline, "batched": rounds},
        "summary": {
            "tokens_per_s_ratio": ratio,
            "one_by_one": _summary(baseline),
            "batched": _summary(rounds),
        },
    }


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "tokens_per_s": spread([r["tokens_per_s"] for r in rounds]),
        **{f"ttft_{q}_ms": spread([r["ttft_ms"][q] for r in rounds]) for q in ("p50", "p90", "p99")},
        **{f"itl_{q}_ms": spread([r["itl_ms"][q] for r in rounds]) for q in ("p50", "p90", "p99")},
    }


if __name__ == "__main__":
    raise SystemExit(harness.main(NAME, run))
