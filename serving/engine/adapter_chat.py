"""What an adapter's own tokenizer files say about chatting with it.

Training saves the tokenizer next to a LoRA adapter, with the chat template the recipe
trained on (``model.chat_template``), which may differ from the base's. An engine serving
the adapter on the shared base must render that template and stop at that template's
end-of-turn token, or the fine-tune answers in a format it never saw. An adapter whose
tokenizer has tokens the base lacks (added during training, e.g. ChatML markers) cannot be
served on the shared base at all: its embeddings were resized, so it is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.errors import ConflictError

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


@dataclass(frozen=True)
class AdapterChat:
    """How to chat with one adapter on its base.

    Attributes:
        chat_template: the adapter's own template when it differs from the base's, else
            None (the base's template applies).
        stop_ids: token ids that end the adapter's turn, besides the base's.
    """

    chat_template: str | None = None
    stop_ids: frozenset[int] = frozenset()


BASE_CHAT = AdapterChat()


def read_adapter_chat(adapter: str, path: Path, base_tokenizer: Any, *, model_id: str) -> AdapterChat:
    """Read the chat conventions saved with adapter ``adapter`` at ``path``.

    Args:
        adapter: the public adapter name (for messages).
        path: the adapter folder; without tokenizer files the base's conventions apply.
        base_tokenizer: the tokenizer of the base the engine serves.
        model_id: the served model (for messages).

    Raises:
        ConflictError: the adapter's tokenizer does not match the base's vocabulary.
    """
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return BASE_CHAT
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(path)
    if len(own) != len(base_tokenizer) or own.convert_ids_to_tokens(len(own) - 1) != base_tokenizer.convert_ids_to_tokens(
        len(base_tokenizer) - 1
    ):
        raise ConflictError(
            f"adapter `{adapter}` cannot be served on `{model_id}`: its tokenizer has {len(own)} tokens and the "
            f"base's {len(base_tokenizer)}, so it was trained with tokens (and embeddings) the base lacks; fix: "
            "serve it merged as its own model (`forgeline build`), or train it without adding tokens",
            param="model",
        )
    template = getattr(own, "chat_template", None) or None
    base_template = getattr(base_tokenizer, "chat_template", None) or None
    stop: set[int] = set()
    if own.eos_token_id is not None and own.eos_token_id != base_tokenizer.eos_token_id:
        stop.add(int(own.eos_token_id))
    if template is None or template == base_template:
        return AdapterChat(None, frozenset(stop))
    logger.info("adapter %s of %s brings its own chat template", adapter, model_id)
    return AdapterChat(template, frozenset(stop))
