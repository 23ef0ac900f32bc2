"""Make a tiny random model follow a script: "after token A, emit token B".

With every attention and MLP output projection zeroed, a pre-norm decoder's last hidden
state is the normalised embedding of the current token, so the next token depends on the
current one only. Giving token A a unit-vector embedding and token B's output row a large
multiple of that vector makes greedy decoding go A -> B, deterministically. Tests use it to
build a model whose answer ends with the family's turn-end token and then rambles on, the
way a real chat model does when a decoder ignores that stop token.

Works for untied families with ``o_proj``/``down_proj`` (``llama3``, ``phi3``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def script_model(model: Any, transitions: dict[int, int]) -> Any:
    """Rewrite ``model`` in place so greedy decoding follows ``transitions`` (token id -> next id)."""
    import torch

    if model.config.tie_word_embeddings:
        raise ValueError("a scripted model needs untied embeddings (use llama3 or phi3)")
    hidden = model.config.hidden_size
    if len(transitions) > hidden:
        raise ValueError(f"at most {hidden} transitions fit in hidden size {hidden}")
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("o_proj", "down_proj")):
                module.weight.zero_()
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        for axis, (current, following) in enumerate(transitions.items()):
            embed[current].zero_()
            embed[current, axis] = 1.0
            head[following, :] = 0.0
            head[following, axis] = 50.0
    return model


def save_scripted(source: Path, out: Path, transitions: dict[int, int]) -> Path:
    """Copy the checkpoint at ``source`` to ``out`` with ``transitions`` scripted in; returns ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = script_model(AutoModelForCausalLM.from_pretrained(source), transitions)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out
