"""``trained_tokens``: the tokens of the training examples times the epochs, as OpenAI counts them.

Each training example (after the validation split) is rendered with the base model's chat
template and cut at ``train.max_length``, as the trainer sees it; a DPO pair counts both of its sides. Reinforcement jobs are not
counted (their cost is in the sampled completions, not the file). Counted by the training job
itself (rank 0, with the tokenizer it trains with) and tagged on its run
(``registry.lineage.TRAINED_TOKENS``), so the control plane never loads a tokenizer.
"""

from __future__ import annotations

import logging
from typing import Any

from .config import MethodSpec, TrainSpec

log = logging.getLogger(__name__)


def _conversations(row: dict[str, Any]) -> list[list[dict[str, Any]]]:
    prompt = row.get("prompt", [])
    if "chosen" in row:
        return [prompt + row["chosen"], prompt + row["rejected"]]
    return [prompt + row.get("completion", [])]


def trained_tokens(method: MethodSpec, train: TrainSpec, rows: list[dict[str, Any]], tokenizer: Any) -> int | None:
    """Tokens a job trains on (all epochs) from its training split ``rows``, or None when they cannot be counted."""
    if method.kind == "grpo":
        return None
    try:
        per_epoch = 0
        for row in rows:
            for messages in _conversations(row):
                ids = tokenizer.apply_chat_template(messages, tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
                per_epoch += min(len(ids), train.max_length)
    except Exception as err:  # the count is informative; a job never fails for it
        log.warning("cannot count the trained tokens: %s", err)
        return None
    return int(per_epoch * train.epochs)
