"""Continuous batching: rows join a running batch, long prompts prefill in chunks, prefixes are reused.

Every family is checked token for token against greedy ``model.generate`` while requests
join and leave a running batch, with a prefill chunk small enough that prompts are split.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from serving.engine import scheduler as scheduler_module
from serving.engine.base import Chunk, SamplingParams
from serving.engine.kv_rows import UnsplicableCacheError
from serving.engine.torch_engine import TorchEngine
from tests.support.families import FAMILIES, build_family

SYSTEM = "You are a support agent. Answer questions about orders, refunds and deliveries briefly and politely. "
PROMPTS = [
    "What is 2 + 3?",
    SYSTEM + "Where is my order?",
    "The quick brown fox jumps over the lazy dog. " * 3,
]
# Large initial weights make the random models' greedy outputs depend on their input (at the
# default scale most repeat one token whatever they see, and a wrong position or mask would
# go unnoticed); gemma2 also needs untied embeddings for that. Sliding-window families get a
# window shorter than their prompts, so the window matters.
SENSITIVE = {"initializer_range": 1.0}
OVERRIDES: dict[str, dict[str, Any]] = {
    "gemma2": {**SENSITIVE, "sliding_window": 8, "tie_word_embeddings": False},
    "mixtral": {**SENSITIVE, "sliding_window": 8},
}


def _reference(folder: Path, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = []
    for ids, n in zip(prompts, max_tokens, strict=True):
        with torch.no_grad():
            got = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n)
        out.append(got[0, len(ids) :].tolist())
    return out


async def _stream(engine: TorchEngine, prompt: str, max_tokens: int, log: list[tuple[str, int, Chunk]], tag: str) -> list[int]:
    ids: list[int] = []
    async for chunk in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0)):
        log.append((tag, len(ids), chunk))
        ids.extend(chunk.token_ids)
    return ids


def _joining_run(engine: TorchEngine, max_tokens: list[int]) -> tuple[list[Any], list[tuple[str, int, Chunk]]]:
    """Request 0 starts alone; 1 and 2 arrive once it streams, and join its batch.

    Returns each request's token ids (or the exception it ended with) and the chunk log.
    """
    log: list[tuple[str, int, Chunk]] = []

    async def main() -> list[Any]:
        first = asyncio.create_task(_stream(engine, PROMPTS[0], max_tokens[0], log, "0"))
        while not log and not first.done():
            await asyncio.sleep(0.001)
        later = [asyncio.create_task(_stream(engine, PROMPTS[i], max_tokens[i], log, str(i))) for i in (1, 2)]
        return await asyncio.gather(first, *later, return_exceptions=True)

    inner = engine._forward
    joined = threading.Event()

    def hold(*args: Any) -> Any:
        # Request 0's decode waits (up to 10 s) until 1 and 2 are queued: on a loaded machine its
        # rows could otherwise all be decoded before they arrive, and nothing would join.
        if args[0].shape[1] == 1 and not joined.is_set():
            deadline = time.monotonic() + 10
            while engine._inbox.qsize() < 2 and time.monotonic() < deadline:
                time.sleep(0.001)
            joined.set()
        return inner(*args)

    engine._forward = hold  # type: ignore[method-assign]
    try:
        return asyncio.run(main()), log
    finally:
        engine._forward = inner  # type: ignore[method-assign]


def _record_forwards(engine: TorchEngine) -> list[tuple[str, int, int]]:
    """The (kind, rows, tokens per row) of every forward ``engine`` runs from now on: ``decode``
    and ``prefill`` forwards, and ``fused`` ones (decode rows plus group rows, the chunk's width)."""
    forwards: list[tuple[str, int, int]] = []
    forward, fused = engine._forward, engine._fused_forward

    def record(*args: Any) -> Any:
        rows, width = args[0].shape
        forwards.append(("decode" if width == 1 else "prefill", rows, width))
        return forward(*args)

    def record_fused(*args: Any) -> Any:
        forwards.append(("fused", args[0].shape[0] + args[4].shape[0], args[4].shape[1]))
        return fused(*args)

    engine._forward = record  # type: ignore[method-assign]
    engine._fused_forward = record_fused  # type: ignore[method-assign]
    return forwards


def _after_first_prefill(forwards: list[tuple[str, int, int]], width: int) -> int:
    """Index of the first forward after request 0's prefill (one row, its whole prompt at once,
    as the engine was idle): from there request 0 decodes, and the joining requests may ride in
    its very first decode step, since the engine takes its inbox between a prefill and a decode."""
    return 1 + next(i for i, f in enumerate(forwards) if f == ("prefill", 1, width))


# Families whose attention the fused step does not apply (they keep two forwards), and why.
TWO_FORWARDS = {"gemma2": "softcap"}


@pytest.mark.parametrize("name", FAMILIES)
def test_rows_joining_a_running_batch_decode_exactly_as_generate(
    name: str, tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    folder = build_family(name, tmp_path_factory.mktemp(f"cb-{name}"), **OVERRIDES.get(name, SENSITIVE))
    engine = TorchEngine(folder, device="cpu", batch_window_ms=0, prefill_chunk=8, model_id=name)
    forwards = _record_forwards(engine)
    with caplog.at_level("INFO", logger="serving.engine.torch_engine"):
        asyncio.run(engine.start())
    try:
        max_tokens = [40, 12, 16]
        got, _ = _joining_run(engine, max_tokens)
        prompts = [engine._encode(p) for p in PROMPTS]
        fused = engine._scheduler is not None and engine._scheduler.fused is not None
    finally:
        asyncio.run(engine.stop())
    assert got == _reference(folder, prompts, max_tokens)
    joined = _after_first_prefill(forwards, len(prompts[0]))  # request 0 decodes from here
    assert all(width <= 8 for _, _, width in forwards[joined:]), "joining prompts must be prefilled in chunks of 8 tokens"
    # While request 0 decodes, the joining prompts' chunks ride in its decode steps (or, for a
    # family that keeps two forwards, run between them).
    chunk = "prefill" if name in TWO_FORWARDS else "fused"
    assert fused == (name not in TWO_FORWARDS), caplog.text
    assert sum(kind == chunk for kind, _, _ in forwards[joined:]) >= 3, "the joining prompts should have taken several chunks"
    assert not any(kind == ("fused" if chunk == "prefill" else "prefill") for kind, _, _ in forwards[joined:])
    assert any(rows > 1 and kind == "decode" for kind, rows, _ in forwards), "the later requests never joined the batch"
    if name in TWO_FORWARDS:
        assert TWO_FORWARDS[name] in caplog.text, "the log should say why the fused step is off"


def test_a_joining_request_gets_its_first_token_before_the_longest_request_ends(engine: TorchEngine) -> None:
    got, log = _joining_run(engine, [200, 4, 4])
    assert len(got[0]) == 200, "the long request ended early; pick a prompt that runs to max_tokens"
    long_end = next(i for i, (tag, _, chunk) in enumerate(log) if tag == "0" and chunk.finish_reason)
    for tag in ("1", "2"):
        first = next(i for i, (t, _, _) in enumerate(log) if t == tag)
        done = next(i for i, (t, _, chunk) in enumerate(log) if t == tag and chunk.finish_reason)
        assert first < long_end and done < long_end, f"request {tag} waited for the running batch to finish"


@pytest.mark.parametrize("fused_step", [True, False])
def test_a_long_prompt_is_prefilled_between_decode_steps(tiny_artifact: Path, fused_step: bool) -> None:
    engine = TorchEngine(tiny_artifact, device="cpu", batch_window_ms=0, prefill_chunk=4, fused_step=fused_step)
    forwards = _record_forwards(engine)
    asyncio.run(engine.start())
    try:
        got, _ = _joining_run(engine, [60, 4, 4])
        prompts = [engine._encode(p) for p in PROMPTS]
    finally:
        asyncio.run(engine.stop())
    assert len(prompts[2]) > 12
    assert got == _reference(tiny_artifact, prompts, [60, 4, 4])
    start = _after_first_prefill(forwards, len(prompts[0]))
    if fused_step:
        # Every chunk of a joining prompt runs in a decode step's forward, one chunk per step.
        assert not any(kind == "prefill" for kind, _, _ in forwards[start:]), forwards
        assert sum(kind == "fused" for kind, _, _ in forwards[start:]) >= 4, forwards
        return
    # After the first request's prefill, every prefill chunk is followed by a decode step of the running rows.
    for i in range(start, len(forwards) - 1):
        if forwards[i][0] == "prefill":
            assert forwards[i + 1][0] == "decode", f"two prefill chunks in a row stalled decoding: {forwards[i : i + 2]}"


def test_a_cache_that_cannot_be_spliced_falls_back_to_static_batching(
    tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(cache: Any) -> None:
        raise UnsplicableCacheError("test: no joining")

    monkeypatch.setattr(scheduler_module, "check_splicable", refuse)
    engine = TorchEngine(tiny_artifact, device="cpu", batch_window_ms=0)
    asyncio.run(engine.start())
    try:
        got, log = _joining_run(engine, [30, 4, 4])
        prompts = [engine._encode(p) for p in PROMPTS]
        assert engine._scheduler is not None and not engine._scheduler.splicable
    finally:
        asyncio.run(engine.stop())
    assert got == _reference(tiny_artifact, prompts, [30, 4, 4])
    long_end = next(i for i, (tag, _, chunk) in enumerate(log) if tag == "0" and chunk.finish_reason)
    assert all(i > long_end for i, (tag, _, _) in enumerate(log) if tag != "0"), "rows joined an unsplicable batch"


def test_a_shared_prefix_is_reused_and_changes_nothing(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = build_family("llama3", tmp_path_factory.mktemp("cb-prefix"), **SENSITIVE)
    suffixes = ["Where is my order?", "Can I get a refund for the broken one?", "When does it arrive?", "Thanks!"]
    engine = TorchEngine(folder, device="cpu", batch_window_ms=200, prefix_cache_tokens=1024)

    async def one(prompt: str) -> list[int]:
        return [t async for c in engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0)) for t in c.token_ids]

    async def together(prompts: list[str]) -> list[list[int]]:
        return await asyncio.gather(*(one(p) for p in prompts))

    asyncio.run(engine.start())
    try:
        # Two prompts of different lengths prefilled as one left-padded group fill the cache...
        got = asyncio.run(together([SYSTEM + s for s in suffixes[:2]]))
        cache = engine.prefix_cache
        assert cache is not None and cache.hits == 0
        # ...then the others reuse the system prompt's blocks, alone and as a group.
        got.append(asyncio.run(one(SYSTEM + suffixes[2])))
        alone = cache.hits
        got += asyncio.run(together([SYSTEM + suffixes[3], SYSTEM + suffixes[0]]))
        prompts = [engine._encode(SYSTEM + s) for s in [*suffixes, suffixes[0]]]
        shared = len(engine._encode(SYSTEM)) // cache.block * cache.block
    finally:
        asyncio.run(engine.stop())
    assert shared >= cache.block
    assert alone >= shared, "the third request should reuse the system prompt's blocks"
    assert cache.hits >= alone + 2 * shared, "both rows of the last group should reuse cached blocks"
    assert got == _reference(folder, prompts, [8] * 5)


def test_a_scheduler_bug_fails_the_rows_in_flight_and_the_engine_keeps_serving(
    tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from registry.errors import ErrorCode, ForgelineError

    real_join = scheduler_module.join
    calls = 0

    def broken_once(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected splice bug")
        return real_join(*args)

    monkeypatch.setattr(scheduler_module, "join", broken_once)
    engine = TorchEngine(tiny_artifact, device="cpu", batch_window_ms=0)
    asyncio.run(engine.start())
    try:
        failed, _ = _joining_run(engine, [60, 4, 4])  # the first join fails: the running row and the joining one end
        error = failed[0]
        assert isinstance(error, ForgelineError) and error.code == ErrorCode.INTERNAL
        assert "injected splice bug" in error.message
        got, _ = _joining_run(engine, [12, 4, 4])  # the same engine answers, rows joining again
        prompts = [engine._encode(p) for p in PROMPTS]
    finally:
        asyncio.run(engine.stop())
    assert got == _reference(tiny_artifact, prompts, [12, 4, 4])


def test_a_nearly_full_batch_lets_waiting_requests_gather_for_one_prefill(monkeypatch: pytest.MonkeyPatch) -> None:
    import queue

    now = [100.0]
    monkeypatch.setattr(scheduler_module.time, "monotonic", lambda: now[0])
    s = scheduler_module.Scheduler(
        model_id="t", inbox=queue.Queue(), forward=lambda *a: None, sampler=None, detokenizer=None,  # type: ignore[arg-type]
        adapters=None, device="cpu", pad_id=0, max_batch_size=32, batch_window_s=0.0, prefill_chunk=256,
        join_rows=4, join_wait_s=0.1,
    )  # fmt: skip
    row: Any = object()
    s.waiting.extend([row] * 5)
    s.running = [row] * 26
    assert s._join_now(), "a batch with room for join_rows admits at once"
    s.running = [row] * 31
    assert not s._join_now(), "one free row of a nearly full batch: wait for more to leave"
    now[0] += 0.05
    assert not s._join_now()
    s.running = [row] * 28
    assert s._join_now(), "four rows left: prefill them together"
    s.running = [row] * 31
    assert not s._join_now()
    now[0] += 0.11
    assert s._join_now(), "held for join_wait_s: admit what fits"
    s.waiting.clear()
    s.waiting.append(row)
    assert s._join_now(), "a lone waiting request fills the one free row at once"
    small = scheduler_module.Scheduler(
        model_id="t", inbox=queue.Queue(), forward=lambda *a: None, sampler=None, detokenizer=None,  # type: ignore[arg-type]
        adapters=None, device="cpu", pad_id=0, max_batch_size=4, batch_window_s=0.0, prefill_chunk=256,
    )  # fmt: skip
    small.waiting.extend([row] * 3)
    small.running = [row] * 3
    assert small._join_now(), "a small batch never holds rows back (at most an eighth of it)"


def test_a_joining_group_reusing_a_cached_prefix_rides_the_decode_step(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = build_family("llama3", tmp_path_factory.mktemp("cb-fused-prefix"), **SENSITIVE)
    engine = TorchEngine(folder, device="cpu", batch_window_ms=0, prefill_chunk=8, prefix_cache_tokens=1024)
    forwards = _record_forwards(engine)
    prompts = [PROMPTS[0], SYSTEM + "Where is my order?", SYSTEM + "Can I get a refund?"]

    async def run() -> list[list[int]]:
        async def one(prompt: str, n: int) -> list[int]:
            return [t async for c in engine.generate(prompt, SamplingParams(max_tokens=n, temperature=0)) for t in c.token_ids]

        await one(SYSTEM + "Hello", 2)  # fills the prefix cache with the system prompt
        long = asyncio.create_task(one(prompts[0], 60))
        while not any(kind == "decode" for kind, _, _ in forwards):
            await asyncio.sleep(0.001)
        return [*await asyncio.gather(long, one(prompts[1], 8), one(prompts[2], 8))]

    asyncio.run(engine.start())
    try:
        forwards.clear()
        got = asyncio.run(run())
        ids = [engine._encode(p) for p in prompts]
        hits = engine.prefix_cache.hits if engine.prefix_cache is not None else 0
    finally:
        asyncio.run(engine.stop())
    assert hits > 0, "the joining prompts should reuse the cached system prompt"
    assert any(kind == "fused" for kind, _, _ in forwards), forwards
    assert got == _reference(folder, ids, [60, 8, 8])


def test_a_failing_fused_step_fails_the_rows_in_flight_and_two_forwards_serve_on(tiny_artifact: Path) -> None:
    from registry.errors import ErrorCode, ForgelineError

    engine = TorchEngine(tiny_artifact, device="cpu", batch_window_ms=0)

    def broken(*args: Any) -> Any:
        raise RuntimeError("injected fused bug")

    engine._fused_forward = broken  # type: ignore[method-assign]
    asyncio.run(engine.start())
    try:
        failed, _ = _joining_run(engine, [60, 4, 4])
        assert isinstance(failed[0], ForgelineError) and failed[0].code == ErrorCode.INTERNAL
        assert "injected fused bug" in failed[0].message
        assert engine._scheduler is not None and engine._scheduler.fused is None
        # The joining rows were retried on two forwards (one by one) and answered.
        prompts = [engine._encode(p) for p in PROMPTS]
        assert failed[1:] == _reference(tiny_artifact, prompts[1:], [4, 4])
        got, _ = _joining_run(engine, [12, 4, 4])
    finally:
        asyncio.run(engine.stop())
    assert got == _reference(tiny_artifact, prompts, [12, 4, 4])


def test_the_probe_refuses_a_fused_attention_that_differs(tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from serving.engine import fused_step

    model = AutoModelForCausalLM.from_pretrained(tiny_artifact).eval()
    assert fused_step.fused_support(model, "cache", torch.device("cpu")) is None
    cls = type(fused_step.fused_cache(torch.zeros(1, 1), torch.zeros(1, 1), None, torch.zeros(1, 1), 1, 1, 1))
    real = cls.masks

    def no_padding(self: Any, window: int | None) -> tuple[Any, Any]:
        batch, group = real(self, window)
        return torch.ones_like(batch), group  # the decode rows see their padding columns

    monkeypatch.setattr(cls, "masks", no_padding)
    reason = fused_step.fused_support(model, "cache", torch.device("cpu"))
    assert reason is not None and "differs" in reason


def test_an_idle_engines_prefill_takes_its_inbox_before_the_first_decode() -> None:
    """A round that prefills for an idle engine ends there: requests that arrived during that
    prefill are admitted before the new rows' first decode step, not one step later."""
    import queue
    import threading
    from types import SimpleNamespace

    s = scheduler_module.Scheduler(
        model_id="t", inbox=queue.Queue(), forward=lambda *a: None, sampler=None, detokenizer=None,  # type: ignore[arg-type]
        adapters=None, device="cpu", pad_id=0, max_batch_size=8, batch_window_s=0.0, prefill_chunk=256,
    )  # fmt: skip
    rounds: list[str] = []
    row: Any = SimpleNamespace(cancelled=threading.Event())

    def admit() -> None:
        if s.waiting:
            s.waiting.clear()
            s._group = SimpleNamespace(rows=[row])  # type: ignore[assignment]

    def prefill() -> None:
        rounds.append("prefill")
        s._group = None
        s.running.append(row)

    s._admit = admit  # type: ignore[method-assign]
    s._prefill_step = prefill  # type: ignore[method-assign]
    s._decode_step = lambda: rounds.append("decode")  # type: ignore[method-assign]
    s._close_batch = lambda: None  # type: ignore[method-assign]
    s.waiting.append(row)
    s._step()
    assert rounds == ["prefill"], "the idle engine's prefill round must not also decode"
    s._step()
    assert rounds == ["prefill", "decode"]
