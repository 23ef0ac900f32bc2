"""Which token ids end a generation, read from the model artifact's ``generation_config.json``.

The artifact's data is the single source of truth: the engine build
(`serving.artifacts.torch_build`) writes the base's ``generation_config.eos_token_id`` list into
every artifact, the torch engine stops on it, and the upstream relay sends it to its worker
as ``stop_token_ids`` (the field ``trtllm-serve`` and vLLM take), so a served answer ends
where ``forgeline evaluate`` ends it. ``training.stop_tokens`` reads the same data with the
same rule on the training side (the packages may not import each other); a contract test
checks they agree on every model family.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"


def stop_token_ids(generation_config: Any, tokenizer: Any) -> list[int]:
    """``generation_config.eos_token_id`` (an int or a list), then the tokenizer's eos when the config lacks it."""
    raw = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    return _with_eos(raw, getattr(tokenizer, "eos_token_id", None))


def read_stop_token_ids(folder: str | Path, tokenizer: Any) -> list[int]:
    """The stop ids of the model in ``folder`` (its ``generation_config.json``), without loading weights.

    A folder without a readable generation config (a hub id, a bare tokenizer) falls back to
    the tokenizer's eos alone.
    """
    path = Path(folder) / GENERATION_CONFIG
    raw: Any = None
    if path.is_file():
        try:
            raw = json.loads(path.read_text()).get("eos_token_id")
        except (ValueError, AttributeError) as exc:
            logger.warning("%s is not valid JSON (%s); stopping at the tokenizer's eos only", path, exc)
    return _with_eos(raw, getattr(tokenizer, "eos_token_id", None))


def _with_eos(raw: Any, eos: int | None) -> list[int]:
    ids = [raw] if isinstance(raw, int) else [int(i) for i in raw or []]
    if eos is not None and int(eos) not in ids:
        ids.append(int(eos))
    return list(dict.fromkeys(ids))
