"""Multi-LoRA in the PyTorch engine: mixed batches, load on first use, LRU eviction."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from registry.errors import ConflictError, ErrorCode, ForgelineError, ModelNotFoundError
from serving.engine.base import SamplingParams
from serving.engine.torch_engine import BASE_ADAPTER, TorchEngine
from tests.support.tiny_model import build_tiny_adapter

PROMPT = "Hello world"
GREEDY = SamplingParams(max_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def adapters(tiny_base: Path) -> dict[str, Path]:
    root = tiny_base.parent
    return {name: build_tiny_adapter(tiny_base, root / f"adapter-{name}", seed=seed) for name, seed in (("a", 1), ("b", 2), ("c", 3))}


@pytest.fixture(scope="module")
def references(tiny_base: Path, adapters: dict[str, Path]) -> dict[str | None, str]:
    """Greedy text per adapter from PEFT's own single-adapter generate."""
    return {name: _peft_text(tiny_base, path, PROMPT, GREEDY.max_tokens) for name, path in [(None, None), *adapters.items()]}


async def _text(engine: TorchEngine, adapter: str | None) -> str:
    return "".join([c.text async for c in engine.generate(PROMPT, GREEDY, adapter=adapter)])


def test_mixed_batch_matches_each_adapter_alone(
    tiny_base: Path, adapters: dict[str, Path], references: dict[str | None, str]
) -> None:
    assert len({references["a"], references["b"], references[None]}) == 3, "the test adapters must differ"
    engine = TorchEngine(tiny_base, device="cpu", batch_window_ms=300, adapters=adapters, max_loaded_adapters=2)
    rows: list[list[str]] = []
    forward = engine._forward

    def record(*args: object) -> object:
        rows.append(list(args[4]))  # type: ignore[arg-type]
        return forward(*args)  # type: ignore[arg-type]

    engine._forward = record  # type: ignore[method-assign]

    async def scenario() -> list[str]:
        await engine.start()
        try:
            return await asyncio.gather(*(_text(engine, name) for name in (None, "a", "b")))
        finally:
            await engine.stop()

    base_text, a_text, b_text = asyncio.run(scenario())
    assert (base_text, a_text, b_text) == (references[None], references["a"], references["b"])
    # One prefill carried all three rows: base, a and b in one batch.
    assert rows[0][0] == BASE_ADAPTER and len(set(rows[0])) == 3


def test_adapters_load_on_first_use_and_the_least_recent_is_evicted(
    tiny_base: Path, adapters: dict[str, Path], references: dict[str | None, str]
) -> None:
    engine = TorchEngine(tiny_base, device="cpu", batch_window_ms=1, adapters=adapters, max_loaded_adapters=2)

    async def scenario() -> None:
        await engine.start()
        try:
            assert engine.stats().loaded_adapters == ()
            assert await _text(engine, "a") == references["a"]
            assert await _text(engine, "b") == references["b"]
            assert engine.stats().loaded_adapters == ("a", "b")
            assert await _text(engine, "a") == references["a"]  # a becomes most recent
            assert await _text(engine, "c") == references["c"]
            assert engine.stats().loaded_adapters == ("a", "c")  # b was least recently used
            assert await _text(engine, "b") == references["b"]  # reloads fine
            assert await _text(engine, None) == references[None]  # base rows see no adapter
            with pytest.raises(ModelNotFoundError, match="adapters: a, b, c"):
                await _text(engine, "nope")
        finally:
            await engine.stop()

    asyncio.run(scenario())


def test_more_adapters_than_fit_are_split_across_batches(
    tiny_base: Path, adapters: dict[str, Path], references: dict[str | None, str]
) -> None:
    engine = TorchEngine(tiny_base, device="cpu", batch_window_ms=200, adapters=adapters, max_loaded_adapters=2)

    async def scenario() -> list[str]:
        await engine.start()
        try:
            return await asyncio.gather(*(_text(engine, n) for n in ("a", "b", "c", "a")))
        finally:
            await engine.stop()

    assert asyncio.run(scenario()) == [references["a"], references["b"], references["c"], references["a"]]


def _peft_text(base: Path, adapter: Path | None, prompt: str, max_tokens: int) -> str:
    """Greedy text of PEFT's own single-adapter generate."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    enc = tokenizer(prompt, return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    ids = model.eval().generate(**enc, do_sample=False, max_new_tokens=max_tokens)
    return tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def test_rows_of_other_adapters_join_a_running_batch_in_its_decode_steps_forward(
    tiny_base: Path, adapters: dict[str, Path]
) -> None:
    """Joining prompts are prefilled, chunk by chunk, in the running batch's decode forwards
    (`fused_step`), each token with its own row's adapter."""
    long_prompt = "Please tell me where my parcel is, it was due on Monday and nothing came. " * 2
    jobs = [("a", PROMPT, 40), ("b", long_prompt, 8), (None, long_prompt, 8)]
    engine = TorchEngine(tiny_base, device="cpu", batch_window_ms=0, prefill_chunk=4, adapters=adapters, max_loaded_adapters=3)
    fused_rows: list[tuple[list[str], list[str]]] = []
    fused = engine._fused_forward

    def record(*args: Any) -> Any:
        fused_rows.append((list(args[-2]), list(args[-1])))
        return fused(*args)

    engine._fused_forward = record  # type: ignore[method-assign]

    async def text(adapter: str | None, prompt: str, max_tokens: int, started: asyncio.Event) -> str:
        parts = []
        async for chunk in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), adapter=adapter):
            started.set()
            parts.append(chunk.text)
        return "".join(parts)

    async def scenario() -> list[str]:
        await engine.start()
        try:
            streaming = asyncio.Event()
            first = asyncio.create_task(text(*jobs[0], streaming))
            await streaming.wait()  # request "a" decodes; the others join its batch
            return await asyncio.gather(first, *(text(*job, asyncio.Event()) for job in jobs[1:]))
        finally:
            await engine.stop()

    got = asyncio.run(scenario())
    assert got == [_peft_text(tiny_base, adapters[a] if a else None, prompt, n) for a, prompt, n in jobs]
    internal = {name for decode, group in fused_rows for name in (*decode, *group)}
    assert fused_rows and len(internal - {BASE_ADAPTER}) >= 2, f"no fused step mixed adapters: {fused_rows}"
    assert any(decode and group for decode, group in fused_rows)


POISON = "poison pill"


def test_a_failing_request_fails_alone_and_the_engine_keeps_answering(
    tiny_base: Path, adapters: dict[str, Path], references: dict[str | None, str]
) -> None:
    engine = TorchEngine(tiny_base, device="cpu", batch_window_ms=300, adapters=adapters, max_loaded_adapters=3)
    prefills: list[int] = []
    forward = engine._forward

    def failing(*args: object) -> object:
        input_ids = args[0]
        poison = engine._encode(POISON)
        if input_ids.shape[1] > 1:  # type: ignore[attr-defined]
            prefills.append(input_ids.shape[0])  # type: ignore[attr-defined]
            if any(row[-len(poison) :].tolist() == poison for row in input_ids):  # type: ignore[attr-defined]
                raise RuntimeError("injected failure")
        return forward(*args)  # type: ignore[arg-type]

    engine._forward = failing  # type: ignore[method-assign]

    async def poisoned() -> str:
        return "".join([c.text async for c in engine.generate(POISON, GREEDY, adapter="a")])

    async def scenario() -> None:
        await engine.start()
        try:
            results = await asyncio.gather(
                _text(engine, None), poisoned(), _text(engine, "a"), _text(engine, "b"), return_exceptions=True
            )
            assert results[0] == references[None] and results[2:] == [references["a"], references["b"]]
            assert isinstance(results[1], ForgelineError) and results[1].code == ErrorCode.INTERNAL
            assert "injected failure" in results[1].message
            # The same engine, PEFT state and adapters answer the next requests exactly.
            again = await asyncio.gather(_text(engine, "b"), _text(engine, None), _text(engine, "a"))
            assert again == [references["b"], references[None], references["a"]]
        finally:
            await engine.stop()

    asyncio.run(scenario())
    assert prefills[0] == 4, "the poisoned request must have shared a batch with the others"


def test_an_adapter_that_cannot_load_is_a_409_and_leaves_the_base_untouched(
    tiny_base: Path, adapters: dict[str, Path], references: dict[str | None, str], tmp_path: Path
) -> None:
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(adapters["a"], broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    config["target_modules"] = ["no_such_proj"]
    (broken / "adapter_config.json").write_text(json.dumps(config))
    engine = TorchEngine(tiny_base, device="cpu", batch_window_ms=1, adapters={"broken": broken, "b": adapters["b"]})

    async def scenario() -> None:
        await engine.start()
        try:
            # First adapter of the engine: PEFT wraps the base in place before it fails.
            with pytest.raises(ConflictError) as err:
                await _text(engine, "broken")
            assert err.value.http_status == 409
            assert err.value.message.startswith("adapter `broken` cannot be served on")
            assert await _text(engine, None) == references[None]
            assert await _text(engine, "b") == references["b"]
            with pytest.raises(ConflictError):
                await _text(engine, "broken")  # a later load fails the same clean way
            assert await _text(engine, None) == references[None]
            assert engine.stats().loaded_adapters == ("b",)
        finally:
            await engine.stop()

    asyncio.run(scenario())


def test_an_adapter_with_modules_to_save_applies_to_its_rows_only(tiny_base: Path, tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # a retrained output layer that visibly differs from the base's
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(-1.0)
    peft_model.save_pretrained(tmp_path / "m")

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    enc = tokenizer(PROMPT, return_tensors="pt")
    refs = {}
    for name in (None, "m"):
        ref_model = AutoModelForCausalLM.from_pretrained(tiny_base)
        if name:
            ref_model = PeftModel.from_pretrained(ref_model, str(tmp_path / name))
        ids = ref_model.eval().generate(**enc, do_sample=False, max_new_tokens=GREEDY.max_tokens)
        refs[name] = tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert refs[None] != refs["m"]
    engine = TorchEngine(tiny_base, device="cpu", batch_window_ms=300, adapters={"m": tmp_path / "m"})

    async def scenario() -> list[str]:
        await engine.start()
        try:
            await _text(engine, "m")  # loaded: PEFT's active adapter is now `m`
            return await asyncio.gather(_text(engine, None), _text(engine, "m"), _text(engine, None))
        finally:
            await engine.stop()

    assert asyncio.run(scenario()) == [refs[None], refs["m"], refs[None]]
