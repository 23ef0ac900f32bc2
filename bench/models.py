"""Models for the engine benchmarks: Llamas built from config with the shipped tokenizer, and LoRA adapters.

Random weights are fine for throughput: decoding costs the same whatever the values.
The output rows of special tokens and of partial UTF-8 byte tokens are zeroed, so greedy
decoding of a random model neither stops early on eos (every request generates
``max_tokens`` tokens) nor holds text back (every token streams as it is made).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from bench.procs import REPO

logger = logging.getLogger(__name__)

TINY_BASE = REPO / "assets" / "tiny-base"
EVAL_DATA = REPO / "recipes" / "data" / "support-tickets" / "eval.jsonl"

SIZES: dict[str, dict[str, int]] = {
    # ~10M parameters (10x the tiny base): a decode step is not only Python overhead.
    "small": {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 2},
    # ~1M parameters, the shape of assets/tiny-base: for smoke runs.
    "tiny": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2},
    # One decoder layer of Llama-3-8B's shape (229M parameters with this tokenizer's small
    # vocabulary): a rank-16 adapter on it is 0.6 % of the layer, as on the real model, where on
    # `small` it is 6.9 % (bench/lora_step.py).
    "llama3-8b-layer": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 1, "num_attention_heads": 32, "num_key_value_heads": 8},
}


def layer_linears(shape: dict[str, int]) -> list[tuple[int, int]]:
    """(in, out) of the seven linear layers of one Llama decoder layer of ``shape`` (a `SIZES` entry or a config)."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]


def weight_reads(config: dict[str, Any], rank: int, rows: int) -> dict[str, float]:
    """Weights one decode step of ``rows`` rows reads (parameters), each row with its own rank-``rank`` adapter.

    The base's linear layers and output head are read once however many rows the step has;
    each row's adapter (every linear layer) is read for that row alone. On a CPU a decode step
    is mostly these reads, so ``lora_over_base`` says what the stacked adapters add to a step.
    """
    linears = layer_linears(config)
    layers = config["num_hidden_layers"]
    base = layers * sum(i * o for i, o in linears) + config["hidden_size"] * config["vocab_size"]
    lora = rows * layers * rank * sum(i + o for i, o in linears)
    return {"base": float(base), "lora": float(lora), "lora_over_base": lora / base}


def build_llama(folder: Path, size: str, *, seed: int = 0) -> Path:
    """Save a random Llama of ``size`` with the tiny base's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(TINY_BASE)
    config = LlamaConfig(
        **SIZES[size],
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for token_id in range(len(tokenizer)):
            text = tokenizer.decode([token_id])
            if token_id in tokenizer.all_special_ids or not text or "\ufffd" in text or not text.isprintable():
                model.lm_head.weight[token_id].zero_()
        model.lm_head.weight.mul_(20.0)  # sharper logits: zeroed tokens (logit 0) never win
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "bench-model.json").write_text(json.dumps({"size": size, "parameters": parameter_count(model)}))
    logger.info("built a %s Llama (%.1fM parameters) in %s", size, parameter_count(model) / 1e6, folder)
    return folder


def parameter_count(model: Any) -> int:
    """Number of parameters of a torch module."""
    return sum(p.numel() for p in model.parameters())


def model_parameters(folder: Path) -> int | None:
    """Parameters of a model `build_llama` saved (None for other folders)."""
    info = folder / "bench-model.json"
    return int(json.loads(info.read_text())["parameters"]) if info.is_file() else None


def build_adapters(base: Path, root: Path, count: int, *, r: int = 16, seed: int = 0) -> dict[str, Path]:
    """Save ``count`` LoRA adapters (rank ``r``, every linear layer, random non-zero weights) on ``base``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    out: dict[str, Path] = {}
    for i in range(count):
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, 0.02)
        folder = root / f"adapter-{i:02d}"
        peft_model.save_pretrained(folder)
        out[f"a{i:02d}"] = folder
    logger.info("built %d LoRA adapters (r=%d, all-linear) in %s", count, r, root)
    return out


def prompts(tokenizer_dir: Path, count: int) -> list[str]:
    """``count`` chat prompts (support tickets of varied length), rendered with the chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [json.loads(line) for line in EVAL_DATA.read_text().splitlines() if line.strip()]
    out = []
    for i in range(count):
        messages = rows[i % len(rows)]["prompt"]
        out.append(str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)))
    return out
