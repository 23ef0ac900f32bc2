"""The tiny family checkpoints are what the conformance tests claim they are."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.families import FAMILIES, MOE_FAMILIES, family, stop_token_ids

CHAT = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_loads_and_keeps_its_conventions(name: str, family_checkpoint: Callable[[str], Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = family_checkpoint(name)
    spec = family(name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == ("llama" if name == "llama3" else name)
    assert model.config.num_hidden_layers == 2

    # Every stop token of the family is in generation_config, and the tokenizer's eos is one of them.
    stops = stop_token_ids(name, folder)
    assert stops == [tokenizer.convert_tokens_to_ids(t) for t in spec.stop]
    assert tokenizer.eos_token_id in stops
    if name in ("llama3", "gemma2", "phi3"):  # turn end differs from the tokenizer's eos: the stop-token bug's trigger
        assert len(stops) > 1

    ids = tokenizer("What is 2 + 3?", return_tensors="pt")
    with torch.no_grad():
        assert model(**ids).logits.shape[-1] == len(tokenizer)

    if spec.chat_template is None:
        assert not tokenizer.chat_template
        return
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    prompt = tokenizer.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert full.startswith(prompt)  # TRL's prompt-completion masking relies on it
    answer = full[len(prompt) :]
    assert any(token in answer for token in tokenizer.convert_ids_to_tokens(stops))  # the turn ends with a stop token


def test_architecture_features(family_checkpoint: Callable[[str], Path]) -> None:
    from transformers import AutoModelForCausalLM

    names = lambda m: {n.rsplit(".", 1)[-1] for n, _ in m.named_modules()}  # noqa: E731
    phi3 = AutoModelForCausalLM.from_pretrained(family_checkpoint("phi3"))
    assert {"qkv_proj", "gate_up_proj"} <= names(phi3)
    gpt2 = AutoModelForCausalLM.from_pretrained(family_checkpoint("gpt2"))
    assert type(gpt2.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    qwen2 = AutoModelForCausalLM.from_pretrained(family_checkpoint("qwen2"))
    assert qwen2.lm_head.weight.data_ptr() == qwen2.model.embed_tokens.weight.data_ptr()
    assert qwen2.config.num_key_value_heads < qwen2.config.num_attention_heads
    for name in MOE_FAMILIES:
        model = AutoModelForCausalLM.from_pretrained(family_checkpoint(name))
        assert "experts" in names(model)


def test_gemma_and_mixtral_refuse_a_system_turn(family_checkpoint: Callable[[str], Path]) -> None:
    from transformers import AutoTokenizer

    for name in ("gemma2", "mixtral"):
        tokenizer = AutoTokenizer.from_pretrained(family_checkpoint(name))
        with pytest.raises(Exception, match="(?i)system|alternate"):
            tokenizer.apply_chat_template([{"role": "system", "content": "x"}, *CHAT], tokenize=False)


def test_build_is_idempotent(tmp_path: Path) -> None:
    from tests.support.families import build_family

    first = build_family("qwen2", tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert build_family("qwen2", tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
