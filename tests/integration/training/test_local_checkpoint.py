"""A Hugging Face checkpoint in a local folder trains through the same code as the shipped base."""

from __future__ import annotations

from pathlib import Path

import pytest

from forgeline import pipeline
from forgeline.recipe import parse_recipe
from registry import lineage
from registry.client import Registry

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]


def save_tiny_checkpoint(folder: Path) -> Path:
    """A 2-layer, hidden-64 Llama built from config, saved like any hub checkpoint."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(REPO / "assets" / "tiny-base")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_local_checkpoint_trains_registers_and_its_adapter_loads(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = save_tiny_checkpoint(tmp_path / "my-model")
    data = REPO / "recipes" / "data" / "support-tickets"
    recipe = parse_recipe(
        {
            "name": "local-ckpt",
            "model": {"base": str(base)},
            "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")},
            "train": {"max_steps": 3, "batch_size": 4, "logging_steps": 1},
        },
        base_dir=tmp_path,
    )
    registry = Registry()
    result = pipeline.train(recipe, None, registry=registry)
    assert result.version.version == 1
    assert result.version.tags[lineage.BASE_MODEL] == str(base)
    assert result.version.tags[lineage.ADAPTER] == "lora"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(result.adapter_dir))
    assert any("lora_" in name for name, _ in model.named_parameters())
