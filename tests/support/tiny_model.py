"""Tiny causal LMs built from config, shared by every test tree (serving, training, forgeline, gpu).

Uses the project's tokenizer in ``assets/tiny-base`` when it exists; otherwise trains a
small byte-level BPE so the tests need no model hub.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PROJECT_TOKENIZER = Path(__file__).resolve().parents[2] / "assets" / "tiny-base"

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Forgeline trains, registers and serves language models.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Serving engines batch requests and stream tokens back to clients.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000; symbols: + - * / = < > ( ) [ ] { }",
    "Ünïcödé, café, naïve, 東京, 😀 — bytes must decode correctly.",
]


def _train_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE
    )


def load_tokenizer() -> Any:
    """The project's tiny tokenizer if present, else a freshly trained one; always with a chat template."""
    from transformers import AutoTokenizer

    if (PROJECT_TOKENIZER / "tokenizer.json").is_file() or (PROJECT_TOKENIZER / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(PROJECT_TOKENIZER)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = CHATML_TEMPLATE
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    return _train_tokenizer()


def build_tiny_base(folder: Path, *, seed: int = 0) -> Path:
    """Save a 2-layer, hidden-64 Llama with random weights and its tokenizer into ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer()
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _prefer_printable_tokens(model, tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _prefer_printable_tokens(model: Any, tokenizer: Any) -> None:
    """Make the random model emit whole, printable tokens (no eos, no stray UTF-8 bytes).

    A random model mostly emits byte tokens that are not valid UTF-8 on their own, so its
    text would be held back until the end and a stream would have one chunk. Zeroing the
    output rows of special and partial-byte tokens (logit 0) and sharpening the rest makes
    greedy and sampled decoding pick printable tokens, so streams have many chunks and
    generations run to ``max_tokens`` deterministically.
    """
    import torch

    special = set(tokenizer.all_special_ids)
    with torch.no_grad():
        weight = model.lm_head.weight
        for token_id in range(weight.shape[0]):
            text = tokenizer.decode([token_id])
            if token_id in special or not text or "\ufffd" in text or not text.isprintable():
                weight[token_id].zero_()
        weight.mul_(20.0)


def build_tiny_adapter(base: Path, folder: Path, *, seed: int = 1) -> Path:
    """Save a LoRA adapter with non-zero weights (so merging visibly changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    # init_lora_weights=False draws B randomly instead of zeros, so the adapter is not a no-op.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(folder)
    return folder
