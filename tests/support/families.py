"""Tiny random-weight checkpoints of every model family forgeline claims to support.

The way vLLM keeps a registry of tiny test models: each family is built from its real
transformers config class (2 layers, hidden 64), saved with ``save_pretrained`` next to a
byte-level BPE tokenizer trained here on the project's own recipe data, with that family's
special tokens, chat-template conventions and stop tokens:

=============  ==========================================================================
``llama3``     Llama-3 headers; tokenizer eos ``<|end_of_text|>`` but turns end with
               ``<|eot_id|>``: generation_config lists both (several eos ids)
``qwen2``      GQA, tied embeddings, ChatML ``<|im_start|>``/``<|im_end|>``
``qwen2_moe``  Qwen2-MoE: routed experts (3-D expert tensors in transformers 5) + shared expert
``mixtral``    Mixtral MoE, Mistral ``[INST]`` format, ``</s>``; no system role
``gemma2``     ``<start_of_turn>``/``<end_of_turn>``, no system role, soft-capping,
               tokenizer eos ``<eos>`` but turns end with ``<end_of_turn>``
``phi3``       fused ``qkv_proj``/``gate_up_proj``; tokenizer eos ``<|endoftext|>``, turns end
               with ``<|end|>``
``gpt2``       Conv1D projections, no chat template, no pad token
=============  ==========================================================================

``build_family(name, root)`` is idempotent and takes about a second per family on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CORPUS_FILES = (
    REPO / "recipes" / "data" / "support-tickets" / "train.jsonl",
    REPO / "recipes" / "data" / "toy-arithmetic" / "train.jsonl",
    REPO / "recipes" / "data" / "toy-arithmetic" / "cold-start.jsonl",
    REPO / "recipes" / "data" / "r1-math" / "eval.jsonl",
)
VOCAB_SIZE = 640
SEED = 0
_COMMON = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 512}

LLAMA3_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
CHATML_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# Mistral v1 conventions, like Mixtral-8x7B-Instruct: roles must alternate, no system role.
MISTRAL_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- if m['role'] == 'user' -%}{{- '[INST] ' + m['content'] + ' [/INST]' -}}"
    "{%- else -%}{{- ' ' + m['content'] + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)
# Gemma conventions: the assistant is "model", a system turn is refused.
GEMMA_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{- raise_exception('System role not supported') -}}{%- endif -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)
PHI3_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class Family:
    """How to build one family's tiny checkpoint.

    ``specials`` are given ids 0..n-1 in order; ``bos``/``eos``/``pad`` name the tokenizer's
    tokens, ``stop`` every token that ends a turn (generation_config.eos_token_id).
    """

    name: str
    config_class: str
    config: dict[str, Any]
    specials: tuple[str, ...]
    eos: str
    stop: tuple[str, ...]
    bos: str | None = None
    pad: str | None = None
    chat_template: str | None = None
    tied: bool = False
    moe: bool = False
    fused: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


_FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="llama3",
            config_class="LlamaConfig",
            config={"intermediate_size": 128, "num_key_value_heads": 2},
            specials=(
                "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>", "<|finetune_right_pad_id|>",
            ),
            bos="<|begin_of_text|>",
            eos="<|end_of_text|>",  # as Llama-3-8B-Instruct first shipped: eot_id only in generation_config
            stop=("<|end_of_text|>", "<|eot_id|>"),
            pad="<|finetune_right_pad_id|>",
            chat_template=LLAMA3_TEMPLATE,
        ),
        Family(
            name="qwen2",
            config_class="Qwen2Config",
            config={"intermediate_size": 128, "num_key_value_heads": 2},
            specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            eos="<|im_end|>",
            stop=("<|im_end|>", "<|endoftext|>"),
            pad="<|endoftext|>",
            chat_template=CHATML_TEMPLATE,
            tied=True,
        ),
        Family(
            name="qwen2_moe",
            config_class="Qwen2MoeConfig",
            config={
                "intermediate_size": 128, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
                "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "decoder_sparse_step": 1,
            },
            specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            eos="<|im_end|>",
            stop=("<|im_end|>", "<|endoftext|>"),
            pad="<|endoftext|>",
            chat_template=CHATML_TEMPLATE,
            moe=True,
        ),
        Family(
            name="mixtral",
            config_class="MixtralConfig",
            config={"intermediate_size": 64, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
            specials=("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
            bos="<s>",
            eos="</s>",
            stop=("</s>",),
            chat_template=MISTRAL_TEMPLATE,
            moe=True,
        ),
        Family(
            name="gemma2",
            config_class="Gemma2Config",
            config={
                "intermediate_size": 128, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
                "sliding_window": 64,
            },
            specials=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
            bos="<bos>",
            eos="<eos>",  # as gemma-2-it ships: <end_of_turn> only in generation_config
            stop=("<eos>", "<end_of_turn>"),
            pad="<pad>",
            chat_template=GEMMA_TEMPLATE,
            tied=True,
        ),
        Family(
            name="phi3",
            config_class="Phi3Config",
            config={"intermediate_size": 128, "num_key_value_heads": 4, "original_max_position_embeddings": 512},
            specials=("<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
            bos="<s>",
            eos="<|endoftext|>",  # as Phi-3-mini-4k-instruct first shipped: <|end|> only in generation_config
            stop=("<|endoftext|>", "<|end|>"),
            pad="<|endoftext|>",
            chat_template=PHI3_TEMPLATE,
            fused=True,
        ),
        Family(
            name="gpt2",
            config_class="GPT2Config",
            config={"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512, "n_inner": 128},
            specials=("<|endoftext|>",),
            bos="<|endoftext|>",
            eos="<|endoftext|>",
            stop=("<|endoftext|>",),
            tied=True,
        ),
    )
}

FAMILIES: tuple[str, ...] = tuple(_FAMILIES)
MOE_FAMILIES: tuple[str, ...] = tuple(n for n, f in _FAMILIES.items() if f.moe)


def family(name: str) -> Family:
    """The spec of one family; raises KeyError naming the known ones."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}") from None


def _corpus() -> list[str]:
    """Every string of the recipe data sets (prompts and answers), so all test tasks tokenise compactly."""
    texts: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for path in CORPUS_FILES:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                walk(json.loads(line))
    return texts


@cache
def _bpe(specials: tuple[str, ...]) -> str:
    """A byte-level BPE tokenizer (as JSON) with ``specials`` at ids 0..n-1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def build_tokenizer(name: str) -> Any:
    """The family's tokenizer (a ``PreTrainedTokenizerFast``) with its special tokens and chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = family(name)
    named = {t for t in (spec.bos, spec.eos, spec.pad) if t}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_bpe(spec.specials)),
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        unk_token="<unk>" if "<unk>" in spec.specials else None,
        additional_special_tokens=[t for t in spec.specials if t not in named and t != "<unk>"],
        model_max_length=512,
    )
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    return tokenizer


def _config(spec: Family, tokenizer: Any, overrides: dict[str, Any]) -> Any:
    import transformers

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    common = {} if spec.name == "gpt2" else _COMMON
    config_class = getattr(transformers, spec.config_class)
    kwargs = {"vocab_size": len(tokenizer), "tie_word_embeddings": spec.tied, **common, **spec.config, **ids, **spec.extra}
    return config_class(**{**kwargs, **overrides})


def build_family(name: str, root: Path, **config_overrides: Any) -> Path:
    """Build (once) and return ``root / name``: a tiny random-weight checkpoint of ``name``.

    ``config_overrides`` change the family's config (e.g. ``initializer_range=0.2`` for a
    base whose logits LoRA can sharpen); give such variants their own ``root``.

    The folder holds ``config.json``, ``model.safetensors``, ``generation_config.json``
    (``eos_token_id`` lists every stop token of the family) and the tokenizer files.
    Idempotent: an existing complete folder is returned as is; a build goes to a
    staging folder first, so a crashed build never leaves a half-written checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    spec = family(name)
    folder = Path(root) / name
    if (folder / "generation_config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    tokenizer = build_tokenizer(name)
    config = _config(spec, tokenizer, config_overrides)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config)
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in spec.stop]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_ids if len(stop_ids) > 1 else stop_ids[0],
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=32,
    )
    staging = folder.with_name(f"{name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if folder.exists():  # a stale or partial build
        shutil.rmtree(folder)
    staging.rename(folder)
    return folder


def stop_token_ids(name: str, folder: Path) -> list[int]:
    """The ids of the family's stop tokens in the checkpoint at ``folder`` (what tests expect)."""
    data = json.loads((Path(folder) / "generation_config.json").read_text())
    eos = data["eos_token_id"]
    return list(eos) if isinstance(eos, list) else [eos]
