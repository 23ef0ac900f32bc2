"""An adapter's own chat template (saved with its tokenizer files) is the one it is served with."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from registry.errors import ConflictError
from serving.engine.base import SamplingParams
from serving.engine.request import Request
from serving.engine.torch_engine import TorchEngine
from tests.support.tiny_model import build_tiny_adapter

OWN_TEMPLATE = (
    "{%- for m in messages -%}{{- '### ' + m['role'] + ': ' + m['content'] + '\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### assistant:' -}}{%- endif -%}"
)
MESSAGES = [{"role": "user", "content": "Where is my order?"}]


@pytest.fixture(scope="module")
def adapters(tiny_base: Path) -> dict[str, Path]:
    """``plain``: no tokenizer files; ``same``: the base's; ``own``: its own template and end-of-turn token;
    ``grown``: a token the base lacks."""
    from transformers import AutoTokenizer

    root = tiny_base.parent / "chat-adapters"
    plain = build_tiny_adapter(tiny_base, root / "plain", seed=1)
    made = {"plain": plain}
    for name in ("same", "own", "grown"):
        folder = root / name
        shutil.copytree(plain, folder)
        tokenizer = AutoTokenizer.from_pretrained(tiny_base)
        if name == "own":
            tokenizer.chat_template = OWN_TEMPLATE
            tokenizer.eos_token = "<|user|>"  # its turn ends where the next user turn starts
        if name == "grown":
            tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
        tokenizer.save_pretrained(folder)
        made[name] = folder
    return made


@pytest.fixture(scope="module")
def chat_engine(tiny_base: Path, adapters: dict[str, Path]) -> TorchEngine:
    engine = TorchEngine(tiny_base, device="cpu", batch_window_ms=1, adapters=adapters, model_id="tiny")
    asyncio.run(engine.start())
    yield engine  # type: ignore[misc]
    asyncio.run(engine.stop())


def test_an_adapter_is_rendered_with_its_own_template_and_others_with_the_base(chat_engine: TorchEngine) -> None:
    base = chat_engine.render_chat(MESSAGES)
    assert base.startswith("<|bos|><|user|>\nWhere is my order?")
    assert chat_engine.render_chat(MESSAGES, adapter="plain") == base
    assert chat_engine.render_chat(MESSAGES, adapter="same") == base
    assert chat_engine.render_chat(MESSAGES, adapter="own") == "### user: Where is my order?\n### assistant:"


def test_an_adapter_stops_at_its_own_end_of_turn_token(chat_engine: TorchEngine) -> None:
    async def generate() -> str:
        params = SamplingParams(max_tokens=3, temperature=0)
        return "".join([c.text async for c in chat_engine.generate("Hi", params, adapter="own")])

    assert asyncio.run(generate())  # resolves the adapter (and its conventions)
    tokenizer = chat_engine._tokenizer
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    assert user not in chat_engine._eos_ids

    loop = asyncio.new_event_loop()

    def ends_at(token: int, stop_ids: frozenset[int]) -> bool:
        r = Request([1], SamplingParams(max_tokens=8), loop, asyncio.Queue(), stop_ids=stop_ids)
        assert chat_engine._detokenizer is not None
        return chat_engine._detokenizer.advance(r, token, [])

    try:
        own_stops = chat_engine._adapter_chats["own"].stop_ids
        assert own_stops == {user}
        assert ends_at(user, own_stops) and not ends_at(user, chat_engine._adapter_chats["plain"].stop_ids)
    finally:
        loop.close()


def test_an_adapter_with_tokens_the_base_lacks_is_refused_with_409(chat_engine: TorchEngine) -> None:
    with pytest.raises(ConflictError) as err:
        chat_engine.render_chat(MESSAGES, adapter="grown")
    assert err.value.http_status == 409
    assert err.value.message.startswith("adapter `grown` cannot be served on `tiny`: its tokenizer has 1281 tokens")

    async def generate() -> None:
        async for _ in chat_engine.generate("Hi", SamplingParams(max_tokens=2), adapter="grown"):
            pass

    with pytest.raises(ConflictError):
        asyncio.run(generate())
