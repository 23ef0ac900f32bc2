"""Streamed text: decoding each row incrementally gives exactly the chunks that decoding everything gives."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serving.engine.base import Chunk, SamplingParams
from serving.engine.detokenizer import Detokenizer
from serving.engine.request import Request

TINY_BASE = Path(__file__).resolve().parents[3] / "assets" / "tiny-base"
TEXT = "Héllo wörld: 3 € for 日本語 🙂, naïve café\n"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_BASE)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _stream(
    detokenizer: Detokenizer, tokens: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop
) -> list[tuple[str, list[int], str | None]]:
    r = Request([1], params, loop, asyncio.Queue())
    outbox: list[tuple[Request, Chunk]] = []
    for token in tokens:
        if detokenizer.advance(r, token, outbox):
            break
    return [(c.text, list(c.token_ids), c.finish_reason) for _, c in outbox]


def _sequences(tokenizer: Any, count: int) -> Iterator[list[int]]:
    """Random outputs: text with multi-byte characters, random tokens (special and partial-byte ones among them)."""
    rng = random.Random(0)
    words = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    special = sorted(tokenizer.all_special_ids)
    for _ in range(count):
        out: list[int] = []
        while len(out) < 40:
            pick = rng.random()
            if pick < 0.5:
                start = rng.randrange(len(words))
                out += words[start : start + rng.randint(1, 8)]
            elif pick < 0.9:
                out.append(rng.randrange(len(tokenizer)))
            else:
                out.append(rng.choice(special))
        yield out


def test_the_tiny_base_tokenizer_decodes_incrementally(tokenizer: Any) -> None:
    assert Detokenizer(tokenizer, set(), None).stream_backend is not None


@pytest.mark.parametrize("stops", [[], ["o", "€ f"], ["日本"], ["\ufffd"]])
def test_incremental_chunks_equal_full_decode_chunks(
    tokenizer: Any, loop: asyncio.AbstractEventLoop, stops: list[str]
) -> None:
    incremental = Detokenizer(tokenizer, set(), None)
    full = Detokenizer(tokenizer, set(), None)
    full.stream_backend = None
    for tokens in _sequences(tokenizer, 60):
        for max_tokens in (len(tokens), 7):
            params = SamplingParams(max_tokens=max_tokens, stop=stops)
            got = _stream(incremental, tokens, params, loop)
            assert got == _stream(full, tokens, params, loop), tokens
            assert "".join(text for text, _, _ in got) == tokenizer.decode(
                tokens[: sum(len(ids) for _, ids, _ in got)], skip_special_tokens=True
            ) or any(reason == "stop" for _, _, reason in got)


def test_a_character_split_over_tokens_streams_whole(tokenizer: Any, loop: asyncio.AbstractEventLoop) -> None:
    # "€" is three bytes; byte-level tokens of it alone are not valid UTF-8.
    ids = tokenizer("€€", add_special_tokens=False)["input_ids"]
    chunks = _stream(Detokenizer(tokenizer, set(), None), ids, SamplingParams(max_tokens=len(ids)), loop)
    assert "".join(text for text, _, _ in chunks) == "€€"
    assert all("\ufffd" not in text for text, _, _ in chunks)


def test_a_row_cut_inside_a_character_ends_as_a_full_decode_does(
    tokenizer: Any, loop: asyncio.AbstractEventLoop
) -> None:
    ids = tokenizer("a€", add_special_tokens=False)["input_ids"]
    byte_ids = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    if not byte_ids:
        pytest.skip("the tokenizer has a whole token for the character")
    cut = ids[: ids.index(byte_ids[0]) + 1]
    chunks = _stream(Detokenizer(tokenizer, set(), None), cut, SamplingParams(max_tokens=len(cut)), loop)
    assert "".join(text for text, _, _ in chunks) == tokenizer.decode(cut, skip_special_tokens=True)
    assert chunks[-1][2] == "length"
