"""Through the gateway with the stock ``openai`` SDK: a chat with ``base:adapter`` uses the adapter's template."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from serving.engine.torch_engine import TorchEngine
from serving.gateway.app import ServedModel, StaticCatalog, create_app
from serving.gateway.server import serve_in_background
from tests.support.tiny_model import build_tiny_adapter

pytestmark = pytest.mark.integration

OWN_TEMPLATE = (
    "{%- for m in messages -%}{{- '### ' + m['role'] + ': ' + m['content'] + '\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### assistant:' -}}{%- endif -%}"
)
MESSAGES = [{"role": "user", "content": "Where is my order?"}]


@pytest.fixture(scope="module")
def client(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("adapter-chat")
    plain = build_tiny_adapter(tiny_base, root / "plain", seed=1)
    own = root / "own"
    shutil.copytree(plain, own)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.chat_template = OWN_TEMPLATE
    tokenizer.save_pretrained(own)
    engine = TorchEngine(tiny_base, device="cpu", model_id="tiny", adapters={"plain": plain, "own": own})
    app = create_app(StaticCatalog([ServedModel(name="tiny", version="1", engine=engine)]), max_new_tokens=8)
    base_url, stop = serve_in_background(app)
    try:
        yield openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    finally:
        stop()


def test_the_adapters_own_template_renders_its_chats(client: openai.OpenAI, tiny_base: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)

    def prompt_tokens(model: str) -> int:
        reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, temperature=0)  # type: ignore[arg-type]
        assert reply.usage is not None
        return reply.usage.prompt_tokens

    base_prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    own_prompt = "### user: Where is my order?\n### assistant:"
    expected_base = len(tokenizer(base_prompt, add_special_tokens=False)["input_ids"])
    expected_own = len(tokenizer(own_prompt)["input_ids"])
    assert expected_base != expected_own
    assert prompt_tokens("tiny") == expected_base
    assert prompt_tokens("tiny:plain") == expected_base  # no template of its own: the base's
    assert prompt_tokens("tiny:own") == expected_own
