"""LoRA adapters on mixture-of-experts bases in the PyTorch engine, in mixed batches.

Qwen2-MoE and Mixtral (transformers 5: routed experts are fused 3-D parameters) with three
kinds of adapter: attention only; ``all-linear`` (on Qwen2-MoE that includes the shared
expert, which sees flattened ``batch * seq`` tokens; on Mixtral peft 0.21 maps it onto the
fused experts and router as ``target_parameters``); and LoRA on the routed experts through
``target_parameters``, which PEFT cannot batch per row. Every row of a mixed batch must get
exactly what PEFT gives that adapter alone.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from registry.errors import ConflictError
from serving.engine.base import SamplingParams
from serving.engine.torch_engine import BASE_ADAPTER, TorchEngine
from tests.support.families import build_family
from tests.support.lora import MOE_TARGETS, build_lora

PROMPT = "My order has not arrived yet"
GREEDY = SamplingParams(max_tokens=6, temperature=0)
@pytest.fixture(scope="module", params=["qwen2_moe", "mixtral"])
def moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp(f"moe-{request.param}")
    base = build_family(request.param, root)
    adapters = {name: build_lora(base, root / name, t, seed=seed) for seed, (name, t) in enumerate(MOE_TARGETS.items(), 1)}
    if request.param == "mixtral":
        # PEFT holds one set of target_parameters per model, and `linear` already adapts the
        # fused experts here; `experts` (another set) is the refusal test's business.
        adapters.pop("experts")
    return base, adapters


def _adapts_parameters(adapter: Path) -> bool:
    return bool(json.loads((adapter / "adapter_config.json").read_text()).get("target_parameters"))


def _reference(base: Path, adapter: Path | None) -> list[int]:
    """Greedy token ids from PEFT's own single-adapter ``generate``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    enc = tokenizer(PROMPT, return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    ids = model.eval().generate(**enc, do_sample=False, max_new_tokens=GREEDY.max_tokens)
    return ids[0, enc["input_ids"].shape[1] :].tolist()


async def _ids(engine: TorchEngine, adapter: str | None) -> list[int]:
    return [t async for c in engine.generate(PROMPT, GREEDY, adapter=adapter) for t in c.token_ids]


def test_mixed_requests_on_an_moe_base_match_each_adapter_alone(moe: tuple[Path, dict[str, Path]]) -> None:
    base, adapters = moe
    names = [None, *adapters]
    refs = {name: _reference(base, adapters[name] if name else None) for name in names}
    assert len({tuple(r) for r in refs.values()}) == len(names), "the test adapters must change the output"
    engine = TorchEngine(base, device="cpu", batch_window_ms=200, adapters=adapters, max_loaded_adapters=4)
    prefills: list[list[str]] = []
    forward = engine._forward

    def record(*args: object) -> object:
        if args[0].shape[1] > 1:  # type: ignore[attr-defined]
            prefills.append(list(args[4]))  # type: ignore[arg-type]
        return forward(*args)  # type: ignore[arg-type]

    engine._forward = record  # type: ignore[method-assign]

    async def scenario() -> tuple[list[list[list[int]]], set[str], str]:
        await engine.start()
        try:
            rounds = []
            for _ in range(3):  # adapters load in round one; later rounds reuse them
                rounds.append(await asyncio.gather(*(_ids(engine, n) for n in names * 2)))
            exclusive = next(n for n in engine._exclusive)
            return rounds, set(engine._exclusive), engine._loaded[exclusive]
        finally:
            await engine.stop()

    rounds, exclusive, experts = asyncio.run(scenario())
    for got in rounds:
        assert got == [refs[n] for n in names * 2]
    assert exclusive == {n for n, path in adapters.items() if _adapts_parameters(path)}
    for rows in prefills:
        # The fused-experts adapter rides alone; everything else shares batches.
        assert experts not in rows or set(rows) == {experts}
    shared = len(names) - len(exclusive)  # the base and every adapter that is not exclusive
    assert any(BASE_ADAPTER in rows and len(set(rows)) == shared for rows in prefills), prefills


def test_an_adapter_peft_cannot_stack_is_refused_with_409_and_the_rest_keep_answering(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("moe-refusal")
    base = build_family("mixtral", root)
    adapters = {
        "linear": build_lora(base, root / "linear", MOE_TARGETS["linear"], seed=2),
        "experts": build_lora(base, root / "experts", MOE_TARGETS["experts"], seed=3),
        "attn": build_lora(base, root / "attn", MOE_TARGETS["attn"], seed=1),
    }
    refs = {name: _reference(base, adapters[name] if name else None) for name in (None, "linear", "attn")}
    engine = TorchEngine(base, device="cpu", batch_window_ms=1, adapters=adapters)

    async def scenario() -> None:
        await engine.start()
        try:
            assert await _ids(engine, "linear") == refs["linear"]
            with pytest.raises(ConflictError) as err:
                await _ids(engine, "experts")
            assert err.value.http_status == 409
            assert "adapter `experts` cannot be served on `mixtral`" in err.value.message
            assert "target_parameters" in err.value.message
            got = await asyncio.gather(*(_ids(engine, n) for n in (None, "linear", "attn", None)))
            assert got == [refs[None], refs["linear"], refs["attn"], refs[None]]
        finally:
            await engine.stop()

    asyncio.run(scenario())
