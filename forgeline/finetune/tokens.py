"""``trained_tokens``: the tokens of the training examples times the epochs, as OpenAI counts them.

Each training example (after the validation split) is rendered with the base model's chat
template and cut at ``train.max_length``, as the trainer sees it; a DPO pair counts both of its sides. Reinforcement jobs are not
counted (their cost is in the sampled completions, not the file), nor are jobs whose
tokenizer cannot be loaded where the control plane runs.
"""

from __future__ import annotations

import logging
from typing import Any

from training.job import TrainJob

log = logging.getLogger(__name__)


def _conversations(row: dict[str, Any]) -> list[list[dict[str, Any]]]:
    prompt = row.get("prompt", [])
    if "chosen" in row:
        return [prompt + row["chosen"], prompt + row["rejected"]]
    return [prompt + row.get("completion", [])]


def trained_tokens(job: TrainJob) -> int | None:
    """Tokens the job trained on (all epochs), or None when it cannot be counted."""
    if job.method.kind == "grpo":
        return None
    from training.data import load_data
    from training.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(job.model)
        rows = load_data(job.data, seed=job.train.seed, method=job.method).train  # the split the trainer used
        per_epoch = 0
        for row in rows:
            for messages in _conversations(row):
                ids = tokenizer.apply_chat_template(messages, tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
                per_epoch += min(len(ids), job.train.max_length)
    except Exception as err:  # the count is informative; a job never fails for it
        log.warning("cannot count the trained tokens of %s: %s", job.name, err)
        return None
    return int(per_epoch * job.train.epochs)
