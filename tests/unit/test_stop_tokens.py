"""One source of truth for stop tokens: generation_config's list, read the same way by
``forgeline evaluate`` (training side), the build, the torch engine and the upstream relay.

The scripted Llama-3-style model answers "5", ends its turn with ``<|eot_id|>`` (which is not
the tokenizer's eos, as in Llama-3-8B-Instruct) and then rambles on; anything that stops only
at ``tokenizer.eos_token_id`` returns "5 and more and more…" and scores 0.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.engine.base import SamplingParams
from serving.stop_tokens import read_stop_token_ids
from serving.stop_tokens import stop_token_ids as serving_stop_ids
from tests.support.families import FAMILIES, family
from tests.support.scripted import save_scripted
from training.stop_tokens import stop_token_ids as training_stop_ids

QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.mark.parametrize("name", FAMILIES)
def test_training_and_serving_read_the_same_stop_ids(name: str, family_checkpoint: Callable[[str], Path]) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    folder = family_checkpoint(name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = GenerationConfig.from_pretrained(folder)
    expected = [tokenizer.convert_tokens_to_ids(t) for t in family(name).stop]
    assert training_stop_ids(config, tokenizer) == expected
    assert serving_stop_ids(config, tokenizer) == expected
    assert read_stop_token_ids(folder, tokenizer) == expected


def test_the_tokenizers_eos_is_added_when_the_config_lacks_it(family_checkpoint: Callable[[str], Path]) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(family_checkpoint("gemma2"))
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    for reader in (training_stop_ids, serving_stop_ids):
        assert reader(GenerationConfig(eos_token_id=end_of_turn), tokenizer) == [end_of_turn, tokenizer.eos_token_id]
        assert reader(None, tokenizer) == [tokenizer.eos_token_id]
    assert read_stop_token_ids(Path("/nonexistent"), tokenizer) == [tokenizer.eos_token_id]


@pytest.fixture(scope="module")
def scripted(family_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama3 scripted to answer QUESTION with "5<|eot_id|> and more and more…"."""
    from transformers import AutoTokenizer

    source = family_checkpoint("llama3")
    tok = AutoTokenizer.from_pretrained(source)
    prompt = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    last = tok(prompt, add_special_tokens=False)["input_ids"][-1]
    [five] = tok("5", add_special_tokens=False)["input_ids"]
    ramble = tok(" and more", add_special_tokens=False)["input_ids"]
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot != tok.eos_token_id
    transitions = {last: five, five: eot, eot: ramble[0]}
    for current, following in zip(ramble, [*ramble[1:], ramble[0]], strict=True):
        transitions.setdefault(current, following)
    return save_scripted(source, tmp_path_factory.mktemp("scripted") / "llama3", transitions)


def _prompt(folder: Path) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)


def test_evaluate_stops_at_the_turn_end_and_scores_the_answer(scripted: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.config import EvaluateSpec
    from training.evaluation import evaluate_model, generate_answers

    tokenizer = AutoTokenizer.from_pretrained(scripted)
    model = AutoModelForCausalLM.from_pretrained(scripted)
    rows = [{"prompt": QUESTION, "completion": [{"role": "assistant", "content": "5"}]}]
    assert evaluate_model(model, tokenizer, rows, EvaluateSpec(max_new_tokens=8))["accuracy"] == 1.0

    # The bug this guards against: stopping at the tokenizer's eos alone runs past <|eot_id|>.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    [rambling] = generate_answers(model, tokenizer, [_prompt(scripted)], max_new_tokens=8, batch_size=1)
    assert rambling.startswith("5") and "more" in rambling


def test_completion_loss_scores_the_turn_end_token(scripted: Path) -> None:
    from transformers import AutoTokenizer

    from training.evaluation import to_examples

    tokenizer = AutoTokenizer.from_pretrained(scripted)
    [example] = to_examples([{"prompt": QUESTION, "completion": [{"role": "assistant", "content": "5"}]}], tokenizer)
    assert example.completion == "5<|eot_id|>"


def test_build_and_torch_engine_stop_where_evaluate_does(scripted: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from serving.artifacts.torch_build import build_torch_artifact
    from serving.engine.torch_engine import TorchEngine

    artifact = tmp_path / "artifact"
    build_torch_artifact(str(scripted), None, artifact)
    tokenizer = AutoTokenizer.from_pretrained(scripted)
    eot, eos = tokenizer.convert_tokens_to_ids("<|eot_id|>"), tokenizer.eos_token_id
    assert sorted(json.loads((artifact / "generation_config.json").read_text())["eos_token_id"]) == sorted([eos, eot])

    async def run() -> tuple[str, str | None]:
        engine = TorchEngine(artifact, device="cpu", model_id="scripted")
        await engine.start()
        try:
            chunks = [c async for c in engine.generate(_prompt(scripted), SamplingParams(max_tokens=8, temperature=0))]
        finally:
            await engine.stop()
        return "".join(c.text for c in chunks), chunks[-1].finish_reason

    assert asyncio.run(run()) == ("5", "stop")


def test_torch_engine_honours_request_stop_token_ids(scripted: Path, tmp_path: Path) -> None:
    """``stop_token_ids`` (the relay's field) ends generation on a token the model does not list."""
    from transformers import AutoTokenizer

    from serving.artifacts.torch_build import build_torch_artifact
    from serving.engine.torch_engine import TorchEngine

    artifact = tmp_path / "artifact"
    build_torch_artifact(str(scripted), None, artifact)
    [five] = AutoTokenizer.from_pretrained(scripted)("5", add_special_tokens=False)["input_ids"]

    async def run() -> tuple[str, str | None, int]:
        engine = TorchEngine(artifact, device="cpu", model_id="scripted")
        await engine.start()
        try:
            params = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[five])
            chunks = [c async for c in engine.generate(_prompt(scripted), params)]
        finally:
            await engine.stop()
        return "".join(c.text for c in chunks), chunks[-1].finish_reason, sum(len(c.token_ids) for c in chunks)

    assert asyncio.run(run()) == ("5", "stop", 1)


def test_upstream_relay_sends_the_models_stop_ids(scripted: Path) -> None:
    from transformers import AutoTokenizer

    from serving.engine.upstream import UpstreamEngine

    bodies: list[dict[str, Any]] = []

    def worker(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        bodies.append(json.loads(request.content))
        sse = 'data: {"choices": [{"index": 0, "text": "5", "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'
        return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})

    async def run() -> None:
        engine = UpstreamEngine("http://worker:8000", str(scripted), transport=httpx.MockTransport(worker))
        await engine.start()
        try:
            _ = [c async for c in engine.generate("hi", SamplingParams(max_tokens=4, stop_token_ids=[7]))]
        finally:
            await engine.stop()

    asyncio.run(run())
    tokenizer = AutoTokenizer.from_pretrained(scripted)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert bodies[0]["stop_token_ids"] == [tokenizer.eos_token_id, eot, 7]


def test_completions_wire_field_is_validated() -> None:
    from pydantic import ValidationError

    from serving.gateway.protocol import CompletionRequest

    assert CompletionRequest(model="m", prompt="p", stop_token_ids=[3, 9]).stop_token_ids == [3, 9]
    for bad in ([-1], [2**40], list(range(65)), ["x"]):
        with pytest.raises(ValidationError, match="stop_token_ids"):
            CompletionRequest(model="m", prompt="p", stop_token_ids=bad)
