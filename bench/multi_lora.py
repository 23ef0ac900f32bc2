"""Benchmark 3: many LoRA adapters on one base against one merged model, mixed traffic.

The baseline is what a team does with one fine-tune: merge the adapter into the base
(`serving.artifacts.torch_build.build_torch_artifact`, forgeline's torch build) and serve it
with `TorchEngine`. The candidate serves N adapters on the unmerged base in one
`TorchEngine` (``adapters=``, ``max_loaded_adapters=N``), each request naming a random
adapter, so a batch mixes adapters (stacked LoRA layers, `serving.engine.multi_lora`). Both
get the same closed-loop traffic: ``concurrency`` clients, each sending its next request
when the last one finishes. Adapters are loaded by a warm-up pass first (its time is
reported as the cold start), so the ratio is the steady state: tokens/s with adapters over
merged.

Loading alone is timed too, old against new in the same run, on the run's base and on the
tiny base: the N adapters through PEFT as the engine loaded them before (``PeftModel`` /
``load_adapter`` and the `LoraRouter` rescan after each) and into the stacked slots
(`StackedLora.plan` + ``load``: read the files, copy into a slot).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

from bench import harness
from bench.models import TINY_BASE, build_adapters, build_llama, model_parameters, prompts, weight_reads
from bench.stats import spread

logger = logging.getLogger(__name__)

NAME = "multi_lora"
GOAL_RATIO = 0.8
GOAL_LOAD_S = 3.0  # all adapters of the `full` setting, on the tiny base

SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": {"model": "tiny-base", "adapters": 3, "rank": 8, "concurrency": 4, "requests": 8, "max_tokens": 4, "rounds": 1, "budget_s": 60.0},
    # Rounds stop early when the next would overrun budget_s (counted after the cold start).
    # 128 requests a round: with 32, a round lasted about half a second on the Xeon VM and the
    # ratio moved 0.45-1.04x between rounds of one run.
    "full": {"model": "small", "adapters": 50, "rank": 16, "concurrency": 16, "requests": 128, "max_tokens": 16, "rounds": 5, "budget_s": 90.0},
}


async def closed_loop(engine: Any, texts: list[str], adapters: list[str | None], *, concurrency: int, max_tokens: int) -> dict[str, Any]:
    """Send ``len(texts)`` requests from ``concurrency`` clients; request i uses ``adapters[i]``."""
    from serving.engine.base import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    tokens = 0
    next_index = 0

    async def client() -> None:
        nonlocal tokens, next_index
        while next_index < len(texts):
            i = next_index
            next_index += 1
            async for chunk in engine.generate(texts[i], params, adapter=adapters[i]):
                tokens += len(chunk.token_ids)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else 0.0, "requests": len(texts)}


def load_times(base: Path, adapters: dict[str, Path], *, peft: bool = True) -> dict[str, float]:
    """Seconds to load every adapter of ``adapters`` into a fresh copy of ``base``: stacked (new), and PEFT (old) if ``peft``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from serving.engine.lora_routing import LoraRouter
    from serving.engine.multi_lora import StackedLora

    names = sorted(adapters)
    times: dict[str, float] = {}
    with torch.inference_mode():  # as on the engine's worker thread
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        began = time.perf_counter()
        stack = StackedLora(model, max_adapters=len(names))
        for i, name in enumerate(names):
            layers = stack.plan(adapters[name])
            assert not isinstance(layers, str), layers
            stack.load(f"adapter{i}", layers)
        times["stacked_s"] = time.perf_counter() - began
        if not peft:
            logger.info("loading %d adapters on %s: stacked %.2f s", len(names), base.name, times["stacked_s"])
            return times

        model = AutoModelForCausalLM.from_pretrained(base).eval()
        began = time.perf_counter()
        peft_model: Any = None
        router: Any = None
        for i, name in enumerate(names):
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, str(adapters[name]), adapter_name=f"adapter{i}").eval()
                router = LoraRouter(peft_model)
            else:
                peft_model.load_adapter(str(adapters[name]), adapter_name=f"adapter{i}")
            router.refresh()
            router.exclusive_reason(f"adapter{i}")
        times["peft_s"] = time.perf_counter() - began
    times["speedup"] = times["peft_s"] / times["stacked_s"] if times["stacked_s"] > 0 else 0.0
    logger.info("loading %d adapters on %s: PEFT %.2f s, stacked %.2f s", len(names), base.name, times["peft_s"], times["stacked_s"])
    return times


def step_times(
    merged: Path, base: Path, adapters: dict[str, Path], *, rows: int, threads: int, reps: int, prompt_tokens: int = 32
) -> dict[str, Any]:
    """The model's decode step alone (no engine): merged vs ``rows`` rows each with its own stacked adapter.

    The closed loop above also pays the engine's per-token work (sampling, detokenising,
    streaming), the same for both; this isolates what the stacked layers add to a step.
    Interleaved repetitions, each the mean over 8 steps after a ``prompt_tokens``-token prefill.
    """
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from serving.engine.loading import cache_kwarg
    from serving.engine.multi_lora import StackedLora

    torch.set_num_threads(threads)
    names = sorted(adapters)[:rows]
    with torch.inference_mode():
        plain = AutoModelForCausalLM.from_pretrained(merged).eval()
        lora = AutoModelForCausalLM.from_pretrained(base).eval()
        stack = StackedLora(lora, max_adapters=len(names))
        for name in names:
            stack.load(name, stack.plan(adapters[name]))  # type: ignore[arg-type]

        def step_ms(model: Any, select: bool) -> float:
            cache = DynamicCache(config=model.config)
            ids = torch.randint(8, 300, (len(names), prompt_tokens), generator=torch.Generator().manual_seed(0))
            selection = stack.select(names) if select else None
            if selection is not None:
                stack.use(selection, ids.shape[1])
            model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
            if selection is not None:
                stack.use(selection, 1)
            began = time.perf_counter()
            for _ in range(8):
                model(input_ids=ids[:, :1], use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
            return (time.perf_counter() - began) / 8 * 1000

        merged_ms, lora_ms = [], []
        for _ in range(reps):
            merged_ms.append(step_ms(plain, False))
            lora_ms.append(step_ms(lora, True))
    ratios = [m / s for m, s in zip(merged_ms, lora_ms, strict=True)]
    logger.info("decode step, %d rows: merged %.1f ms, %d adapters %.1f ms", len(names), min(merged_ms), len(names), min(lora_ms))
    return {"rows": len(names), "merged_ms": spread(merged_ms), "lora_ms": spread(lora_ms), "speed_ratio": spread(ratios)}


def mixed_traffic(base: Path, names: list[str], count: int) -> tuple[list[str], list[str | None]]:
    """``count`` prompts and, for each, an adapter of ``names`` drawn at random (seeded: every run the same)."""
    rng = random.Random(0)
    texts = prompts(base, count)
    return texts, [rng.choice(names) for _ in texts]


def engine_rounds(
    merged: Path,
    base: Path,
    adapters: dict[str, Path],
    *,
    texts: list[str],
    mixed: list[str | None],
    concurrency: int,
    max_tokens: int,
    rounds: int,
    budget_s: float,
    threads: int,
    device: str = "cpu",
) -> dict[str, Any]:
    """The closed loop on two engines: ``merged`` alone, and ``base`` serving every adapter, request i naming ``mixed[i]``.

    Adapters are loaded by a warm-up pass first (its time is the cold start); then rounds of
    ``texts`` alternate which engine goes first, and stop early when the next round would
    overrun ``budget_s``.
    """
    from serving.engine.torch_engine import TorchEngine

    names = sorted(adapters)
    batch = concurrency
    merged_engine = TorchEngine(merged, device=device, max_batch_size=batch, num_threads=threads, model_id="merged")
    lora_engine = TorchEngine(
        base, device=device, max_batch_size=batch, num_threads=threads, model_id="multi-lora",
        adapters=adapters, max_loaded_adapters=len(names),
    )  # fmt: skip

    async def measure() -> dict[str, Any]:
        await merged_engine.start()  # one at a time: concurrent from_pretrained calls are not thread-safe
        await lora_engine.start()
        try:
            await closed_loop(merged_engine, texts[:batch], [None] * batch, concurrency=batch, max_tokens=2)
            began = time.perf_counter()
            # Cold start: every adapter loaded once (one short request each, concurrency as in the run).
            warm_texts = [texts[i % len(texts)] for i in range(len(names))]
            await closed_loop(lora_engine, warm_texts, list(names), concurrency=batch, max_tokens=1)
            cold_s = time.perf_counter() - began
            done: list[dict[str, Any]] = []
            measuring = time.perf_counter()
            for i in range(rounds):
                round_began = time.perf_counter()
                pair: dict[str, Any] = {}
                order = ("merged", "lora") if i % 2 == 0 else ("lora", "merged")
                for which in order:
                    if which == "merged":
                        pair[which] = await closed_loop(merged_engine, texts, [None] * len(texts), concurrency=batch, max_tokens=max_tokens)
                    else:
                        pair[which] = await closed_loop(lora_engine, texts, mixed, concurrency=batch, max_tokens=max_tokens)
                pair["ratio"] = pair["lora"]["tokens_per_s"] / pair["merged"]["tokens_per_s"] if pair["merged"]["tokens_per_s"] else None
                logger.info(
                    "round %d: merged %.0f tok/s, %d adapters %.0f tok/s (%.2fx)",
                    i, pair["merged"]["tokens_per_s"], len(names), pair["lora"]["tokens_per_s"], pair["ratio"] or 0,
                )  # fmt: skip
                done.append(pair)
                now = time.perf_counter()
                if i + 1 < rounds and (now - measuring) + (now - round_began) > budget_s:
                    logger.warning("stopping after %d of %d rounds: the next would overrun the %.0f s budget", i + 1, rounds, budget_s)
                    break
            loaded = len(lora_engine.stats().loaded_adapters)
            return {"cold_start_s": cold_s, "rounds": done, "loaded_adapters": loaded}
        finally:
            await asyncio.gather(merged_engine.stop(), lora_engine.stop())

    return asyncio.run(measure())


def summary(measured: dict[str, Any]) -> dict[str, Any]:
    """The medians and ranges of `engine_rounds`' rounds."""
    rounds = measured["rounds"]
    return {
        "tokens_per_s_ratio": spread([r["ratio"] for r in rounds]),
        "merged_tokens_per_s": spread([r["merged"]["tokens_per_s"] for r in rounds]),
        "lora_tokens_per_s": spread([r["lora"]["tokens_per_s"] for r in rounds]),
        "cold_start_s": measured["cold_start_s"],
    }


def run(setting: str, work: Path) -> dict[str, Any]:
    from serving.artifacts.torch_build import build_torch_artifact

    cfg = SETTINGS[setting]
    budget = cfg["budget_s"] * harness.time_scale()
    base = TINY_BASE if cfg["model"] == "tiny-base" else build_llama(work / f"llama-{cfg['model']}", cfg["model"])
    adapters = build_adapters(base, work / "adapters", cfg["adapters"], r=cfg["rank"])
    names = sorted(adapters)
    merged = work / "merged"
    build_torch_artifact(str(base), adapters[names[0]], merged)
    threads = max(1, (os.cpu_count() or 1) - 1)
    batch = cfg["concurrency"]

    texts, mixed = mixed_traffic(base, names, cfg["requests"])
    distinct = len(set(mixed))

    measured = engine_rounds(
        merged, base, adapters, texts=texts, mixed=mixed, concurrency=batch, max_tokens=cfg["max_tokens"],
        rounds=cfg["rounds"], budget_s=budget, threads=threads,
    )  # fmt: skip
    # Old against new on the tiny base (the goal's model; PEFT's loads take tens of seconds on a
    # busy box), the new path alone on the run's base.
    loading = {"base": load_times(base, adapters, peft=base == TINY_BASE)}
    if base != TINY_BASE:
        loading["tiny"] = load_times(TINY_BASE, build_adapters(TINY_BASE, work / "tiny-adapters", cfg["adapters"], r=cfg["rank"]))
    step = step_times(merged, base, adapters, rows=batch, threads=threads, reps=cfg["rounds"] * 2)
    step["weight_reads"] = weight_reads(json.loads((base / "config.json").read_text()), cfg["rank"], batch)
    return {
        "goal_ratio": GOAL_RATIO,
        "goal_load_s": GOAL_LOAD_S,
        "loading": loading,
        "decode_step": step,
        "model": {"name": cfg["model"], "parameters": model_parameters(base)},
        "settings": cfg,
        "cpu_threads": threads,
        "distinct_adapters_in_traffic": distinct,
        "loaded_adapters": measured["loaded_adapters"],
        "rounds": measured["rounds"],
        "summary": summary(measured),
    }


if __name__ == "__main__":
    raise SystemExit(harness.main(NAME, run))
