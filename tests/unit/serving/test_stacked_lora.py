"""Stacked multi-LoRA (gather + batched matmul) is exact, and refuses what it cannot apply.

Every family's tiny checkpoint with two random adapters of different ranks and scalings
(``all-linear``: fused ``qkv_proj``/``gate_up_proj`` on Phi-3, ``Conv1D`` on GPT-2, the shared
expert that sees flattened tokens on Qwen2-MoE): each row of a mixed batch (no adapter, one,
the other) must give the logits PEFT's unmerged LoRA gives that adapter alone, in the
prefill and in a cached decode step.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from serving.engine.base import SamplingParams
from serving.engine.lora_files import AdapterRefused
from serving.engine.lora_routing import BASE_ADAPTER
from serving.engine.multi_lora import StackedLora, StackedLoraLinear
from serving.engine.torch_engine import TorchEngine
from tests.support.families import FAMILIES

ATOL = 1e-4
PROMPT = "Route this ticket: my parcel never arrived"


def _save_lora(base: Path, folder: Path, *, seed: int, **fields: Any) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    fields.setdefault("target_modules", "all-linear")
    config = LoraConfig(init_lora_weights=False, **fields)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(folder)
    return folder


def _peft_logits(base: Path, adapter: Path | None, ids: Any) -> Any:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", FAMILIES)
def test_mixed_rows_equal_peft_unmerged_lora(
    name: str, family_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    base = family_checkpoint(name)
    # Mixtral's all-linear reaches the fused experts (target_parameters): PEFT's business.
    targets = ["q_proj", "v_proj"] if name == "mixtral" else "all-linear"
    small = _save_lora(base, tmp_path / "r4", seed=1, r=4, lora_alpha=16, target_modules=targets)
    big = _save_lora(base, tmp_path / "r8", seed=2, r=8, lora_alpha=4, use_rslora=True, target_modules=targets)

    ids = AutoTokenizer.from_pretrained(base)(PROMPT, return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    stack = StackedLora(model, max_adapters=2)
    for adapter, folder in (("small", small), ("big", big)):
        layers = stack.plan(folder)
        assert not isinstance(layers, str), layers
        stack.load(adapter, layers)
    wrapped = [m for m in model.modules() if isinstance(m, StackedLoraLinear)]
    assert wrapped and all(m.rank == 8 for m in wrapped), "the slabs grow to the larger rank"

    step = torch.tensor([[7]])
    full = torch.cat([ids, step], dim=1)
    refs = {a: _peft_logits(base, f, full) for a, f in ((None, None), ("small", small), ("big", big))}
    assert (refs["small"] - refs[None]).abs().max() > 100 * ATOL, "the adapter must change the logits"

    # Two sets of rows take turns, as a prefill group and the running batch do under continuous
    # batching: each keeps its own index and gathered A/B, so the turns never mix rows up.
    orders = (["small", None, "big"], ["big", "small", None])
    selections = [stack.select([a or BASE_ADAPTER for a in order]) for order in orders]
    caches = [DynamicCache(config=model.config) for _ in orders]
    prefill, decode = [], []
    with torch.no_grad(), stack.batch():
        for selection, cache in zip(selections, caches, strict=True):
            stack.use(selection, ids.shape[1])
            prefill.append(model(input_ids=ids.expand(3, -1), past_key_values=cache, use_cache=True).logits)
        gathered = [dict(s.gathered) for s in selections]
        for selection, cache in zip(selections, caches, strict=True):
            stack.use(selection, 1)
            decode.append(model(input_ids=step.expand(3, 1), past_key_values=cache, use_cache=True).logits)
    for before, selection in zip(gathered, selections, strict=True):
        assert before and all(selection.gathered[k] is v for k, v in before.items()), "gathered once per selection"
    for order, pre, dec in zip(orders, prefill, decode, strict=True):
        for i, adapter in enumerate(order):
            torch.testing.assert_close(pre[i], refs[adapter][0, :-1], atol=ATOL, rtol=1e-4)
            torch.testing.assert_close(dec[i], refs[adapter][0, -1:], atol=ATOL, rtol=1e-4)


# Gemma-2's attention soft-capping is not applied by the fused attention: it keeps two forwards.
FUSED_FAMILIES = [n for n in FAMILIES if n != "gemma2"]


@pytest.mark.parametrize("name", FUSED_FAMILIES)
def test_a_fused_forward_gives_every_token_its_rows_adapter(
    name: str, family_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    """The flat row of a fused forward (decode tokens, then a group's chunk with and without
    left padding) gets the logits the two separate forwards give the same rows and adapters."""
    import torch
    from transformers import AutoModelForCausalLM

    from serving.engine.fused_step import fused_forward, fused_support
    from serving.engine.kv_rows import new_cache

    base = family_checkpoint(name)
    targets = ["q_proj", "v_proj"] if name == "mixtral" else "all-linear"
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    assert fused_support(model, "past_key_values", torch.device("cpu")) is None
    stack = StackedLora(model, max_adapters=2)
    for adapter, seed, rank in (("small", 5, 4), ("big", 6, 8)):
        stack.load(adapter, stack.plan(_save_lora(base, tmp_path / adapter, seed=seed, r=rank, target_modules=targets)))  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)

    def rows(lengths: list[int]) -> tuple[Any, Any, Any]:
        width = max(lengths)
        mask = torch.zeros((len(lengths), width), dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, width - n :] = 1
        return torch.randint(3, 200, (len(lengths), width), generator=gen), mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def logits(ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True).logits[:, -1]

    running, step = rows([6, 3, 5]), torch.randint(3, 200, (3, 1), generator=gen)
    batch_adapters, group_adapters = ["small", BASE_ADAPTER, "big"], ["big", "small"]
    for group in (rows([5, 2]), rows([4, 4])):  # the chunk with left padding, and without
        got = {}
        for way in ("base", "separate", "fused"):
            adapted = way != "base"
            batch_rows = stack.select(batch_adapters if adapted else [BASE_ADAPTER] * 3)
            group_rows = stack.select(group_adapters if adapted else [BASE_ADAPTER] * 2)
            cache, group_cache = new_cache(), new_cache()
            with torch.inference_mode(), stack.batch():
                stack.use(batch_rows, running[0].shape[1])
                logits(*running, cache)
                mask = torch.cat([running[1], running[1].new_ones((3, 1))], dim=1)
                positions = running[2][:, -1:] + 1
                if way == "fused":
                    got[way] = fused_forward(
                        model, "past_key_values", step, mask, positions, cache, *group, group_cache, True,
                        layout=lambda plan, b=batch_rows, g=group_rows: stack.use_flat(b, g, width=plan.width, real=plan.real),
                    )  # fmt: skip
                else:
                    stack.use(batch_rows, 1)
                    decoded = logits(step, mask, positions, cache)
                    stack.use(group_rows, group[0].shape[1])
                    got[way] = (decoded, logits(*group, group_cache))
        for part, names in ((0, batch_adapters), (1, group_adapters)):
            fused, separate, plain = got["fused"][part], got["separate"][part].float(), got["base"][part].float()
            torch.testing.assert_close(fused, separate, atol=ATOL, rtol=1e-4)
            for i, adapter in enumerate(names):
                if adapter == BASE_ADAPTER:
                    torch.testing.assert_close(fused[i], plain[i], atol=ATOL, rtol=1e-4)
                else:
                    assert (fused[i] - plain[i]).abs().max() > 100 * ATOL, f"{adapter} must change row {i}'s logits"


def test_an_unloaded_slot_is_reused_and_serves_the_new_adapter_exactly(tiny_base: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = _save_lora(tiny_base, tmp_path / "first", seed=3, r=4, target_modules=["q_proj", "v_proj", "o_proj"])
    second = _save_lora(tiny_base, tmp_path / "second", seed=4, r=2, target_modules=["q_proj"])
    ids = AutoTokenizer.from_pretrained(tiny_base)(PROMPT, return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    stack = StackedLora(model, max_adapters=1)
    stack.load("first", stack.plan(first))  # type: ignore[arg-type]
    with pytest.raises(AdapterRefused, match="slots are taken"):
        stack.load("second", stack.plan(second))  # type: ignore[arg-type]
    stack.unload("first")
    stack.load("second", stack.plan(second))  # type: ignore[arg-type]
    with torch.no_grad(), stack.batch():
        stack.use(stack.select(["second"]), ids.shape[1])
        got = model(input_ids=ids).logits
    # o_proj and v_proj held `first`: its slot there must be zero again, not a leftover.
    torch.testing.assert_close(got, _peft_logits(tiny_base, second, ids), atol=ATOL, rtol=1e-4)


def _edit(folder: Path, **config: Any) -> Path:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


def test_adapters_the_stacked_path_cannot_apply_are_refused_or_left_to_peft(tiny_base: Path, tmp_path: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    good = _save_lora(tiny_base, tmp_path / "good", seed=5, r=4, target_modules=["q_proj", "v_proj"])
    stack = StackedLora(AutoModelForCausalLM.from_pretrained(tiny_base), max_adapters=2)

    def variant(name: str) -> Path:
        return Path(shutil.copytree(good, tmp_path / name))

    with pytest.raises(AdapterRefused, match=r"none of its target_modules \(\['no_such_proj'\]\)"):
        stack.plan(_edit(variant("no-target"), target_modules=["no_such_proj"]))
    with pytest.raises(AdapterRefused, match="trains the base model's biases"):
        stack.plan(_edit(variant("bias"), bias="all"))

    renamed = variant("renamed")
    tensors = load_file(renamed / "adapter_model.safetensors")
    save_file({k.replace("q_proj", "qq_proj"): v for k, v in tensors.items()}, renamed / "adapter_model.safetensors")
    with pytest.raises(AdapterRefused, match=r"adapt `model\.layers\.0\.self_attn\.qq_proj`.*which this base lacks"):
        stack.plan(renamed)

    wide = variant("wide")
    save_file(
        {k: torch.zeros(4, 65) if "q_proj.lora_A" in k else v for k, v in tensors.items()},
        wide / "adapter_model.safetensors",
    )
    with pytest.raises(AdapterRefused, match="takes 64 inputs and gives 64 outputs but the adapter's LoRA is 65 -> 64"):
        stack.plan(wide)

    dora = _save_lora(tiny_base, tmp_path / "dora", seed=6, r=4, target_modules=["q_proj"], use_dora=True)
    assert stack.plan(dora) == "it uses DoRA (a per-module magnitude vector)"
    embedding = _save_lora(tiny_base, tmp_path / "embedding", seed=7, r=4, target_modules=["embed_tokens"])
    assert "not a plain LoRA matrix" in str(stack.plan(embedding))
    assert not any(isinstance(m, StackedLoraLinear) for m in stack.model.modules()), "planning changes nothing"


def test_the_engine_stacks_plain_lora_indexes_rows_per_batch_change_and_leaves_dora_to_peft(
    tiny_base: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapters = {
        "plain": _save_lora(tiny_base, tmp_path / "plain", seed=8, r=4, target_modules=["q_proj", "v_proj"]),
        "dora": _save_lora(tiny_base, tmp_path / "dora", seed=9, r=4, target_modules=["q_proj"], use_dora=True),
    }
    params = SamplingParams(max_tokens=5, temperature=0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    enc = tokenizer(PROMPT, return_tensors="pt")
    refs: dict[str | None, list[int]] = {}
    for name in (None, *adapters):
        model = AutoModelForCausalLM.from_pretrained(tiny_base)
        if name is not None:
            model = PeftModel.from_pretrained(model, str(adapters[name]))
        with torch.no_grad():
            out = model.eval().generate(**enc, do_sample=False, max_new_tokens=params.max_tokens)
        refs[name] = out[0, enc["input_ids"].shape[1] :].tolist()
    engine = TorchEngine(tiny_base, device="cpu", batch_window_ms=200, adapters=adapters, max_loaded_adapters=2)
    steps: list[tuple[tuple[str, ...], Any, bool]] = []  # rows, their stacked selection, prefill
    forward = engine._forward

    def record(*args: Any) -> Any:
        logits = forward(*args)
        steps.append((tuple(args[4]), getattr(args[4], "selection", None), args[0].shape[1] > 1))
        return logits

    engine._forward = record  # type: ignore[method-assign]

    async def ids(adapter: str | None) -> list[int]:
        return [t async for c in engine.generate(PROMPT, params, adapter=adapter) for t in c.token_ids]

    async def scenario() -> tuple[list[list[int]], bool]:
        await engine.start()
        try:
            await ids("plain")
            assert engine._adapters is not None
            stacked_only = engine._adapters._peft_model is None
            return await asyncio.gather(ids(None), ids("plain"), ids("dora"), ids("plain")), stacked_only
        finally:
            await engine.stop()

    got, stacked_only = asyncio.run(scenario())
    assert got == [refs[None], refs["plain"], refs["dora"], refs["plain"]]
    assert stacked_only, "a plain LoRA adapter must load without PEFT"
    # The row index is built when a set of rows forms (a group; rows joining or leaving the
    # batch), not at every step: back-to-back decode steps share it exactly when their rows match.
    decode_steps = [(a, b) for a, b in zip(steps, steps[1:], strict=False) if not a[2] and not b[2] and a[1] and b[1]]
    assert decode_steps
    for (names, selection, _), (next_names, next_selection, _) in decode_steps:
        assert (selection is next_selection) == (names == next_names), steps
    assert any(s[1] is None for s in steps), "the DoRA adapter's rows run on PEFT, without a stacked selection"


def test_waiting_rows_of_an_adapter_already_in_the_batch_join_first(tiny_base: Path, tmp_path: Path) -> None:
    import threading
    import time

    adapters = {
        "a": _save_lora(tiny_base, tmp_path / "a", seed=10, r=4, target_modules=["q_proj"]),
        "b": _save_lora(tiny_base, tmp_path / "b", seed=11, r=4, target_modules=["q_proj"]),
    }
    engine = TorchEngine(tiny_base, device="cpu", batch_window_ms=0, adapters=adapters, max_batch_size=2)
    prefills: list[list[str]] = []
    hold, blocked, release = threading.Event(), threading.Event(), threading.Event()
    forward = engine._forward

    def record(*args: Any) -> Any:
        if hold.is_set():
            blocked.set()
            release.wait(timeout=30)  # the worker waits here while both requests queue up
        if args[0].shape[1] > 1:
            prefills.append(list(args[4]))
        return forward(*args)

    fused = engine._fused_forward

    def record_fused(*args: Any) -> Any:  # a group's (one-chunk) prefill in the decode step's forward
        prefills.append(list(args[-1]))
        return fused(*args)

    engine._forward = record  # type: ignore[method-assign]
    engine._fused_forward = record_fused  # type: ignore[method-assign]

    async def text(adapter: str, max_tokens: int, started: asyncio.Event | None = None) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        async for _ in engine.generate(PROMPT, params, adapter=adapter):
            if started is not None:
                started.set()

    async def scenario() -> None:
        await engine.start()
        try:
            assert engine._scheduler is not None
            engine._scheduler.affinity_wait_s = 60.0  # however slow this box is, `b` is not yet overdue
            started = asyncio.Event()
            long = asyncio.create_task(text("a", 24, started))
            await started.wait()
            hold.set()
            await asyncio.to_thread(blocked.wait, 30)
            # While the worker is held mid-step, `b` queues first, then another `a`; the batch
            # has one row of room.
            queued = []
            for adapter in ("b", "a"):
                queued.append(asyncio.create_task(text(adapter, 2)))
                deadline = time.monotonic() + 30
                while engine._inbox.qsize() < len(queued) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            assert engine._inbox.qsize() == 2
            hold.clear()
            release.set()
            await asyncio.gather(long, *queued)
        finally:
            release.set()
            await engine.stop()

    asyncio.run(scenario())
    assert len(prefills) == 3, prefills
    assert prefills[1] == prefills[0], f"the second `a` must join before `b` adds an adapter: {prefills}"
    assert prefills[2] != prefills[0]
