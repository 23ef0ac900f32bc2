"""Which token ids end a generated answer: the model's ``generation_config.eos_token_id`` list.

The *data* is the single source of truth: the ``generation_config.json`` saved with every
base, full fine-tune and engine artifact. A turn often ends with a token that is not the
tokenizer's eos (Llama-3 ``<|eot_id|>``, Gemma ``<end_of_turn>``, Phi-3 ``<|end|>``); only
generation_config lists them all. ``training`` and ``serving`` may not import each other,
so each side has one small reader of that data with the same rule (this module, and
``serving.stop_tokens`` for the torch engine and the upstream relay); a contract test
checks they agree on every model family (tests/integration/conformance/test_stop_tokens.py).

The rule — config list first, plus the tokenizer's eos when it is missing from the list —
is also the one TRL's trainers apply, so training, evaluation and serving agree on where an
answer ends.
"""

from __future__ import annotations

from typing import Any


def stop_token_ids(generation_config: Any, tokenizer: Any) -> list[int]:
    """The ids that end generation: ``generation_config.eos_token_id`` (an int or a list),
    then the tokenizer's eos if the config does not list it.

    Args:
        generation_config: a ``transformers.GenerationConfig`` (``model.generation_config``),
            or None when the model has none.
        tokenizer: the model's tokenizer.
    """
    raw = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids = [raw] if isinstance(raw, int) else [int(i) for i in raw or []]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and int(eos) not in ids:
        ids.append(int(eos))
    return list(dict.fromkeys(ids))
