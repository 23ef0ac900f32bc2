"""A small generated routing task a random-weight tiny model learns with LoRA in a minute.

Each prompt names an issue by one keyword inside a few phrasings; the answer is its queue.
Eval prompts use phrasings never seen in training, so a model must read the keyword, not
memorise rows. Kept tiny on purpose: the support-ticket data needs a pretrained base
(``assets/tiny-base``), while the family checkpoints are random weights.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

KEYWORDS: dict[str, tuple[str, ...]] = {
    "billing": ("invoice", "charge", "fee"),
    "shipping": ("parcel", "courier", "delivery"),
    "account": ("password", "login", "username"),
    "refund": ("refund", "money", "return"),
}
TRAIN_PHRASES = (
    "Route this ticket: my {k} is wrong.",
    "Route this ticket: a problem with the {k}.",
    "Route this ticket: help with my {k} please.",
    "Route this ticket: the {k} again.",
    "Route this ticket: question about {k}.",
    "Route this ticket: {k} issue today.",
)
EVAL_PHRASES = (
    "Route this ticket: something about my {k}.",
    "Route this ticket: urgent {k} question.",
)


def _rows(phrases: tuple[str, ...]) -> list[dict[str, object]]:
    return [
        {"prompt": [{"role": "user", "content": phrase.format(k=k)}], "completion": [{"role": "assistant", "content": queue}]}
        for queue, words in KEYWORDS.items()
        for k in words
        for phrase in phrases
    ]


def write_routing_task(folder: Path, *, seed: int = 0) -> dict[str, str]:
    """``train.jsonl`` (every train phrasing, shuffled) and ``eval.jsonl`` (unseen phrasings) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    train = _rows(TRAIN_PHRASES)
    random.Random(seed).shuffle(train)
    paths = {"train": folder / "train.jsonl", "eval": folder / "eval.jsonl"}
    paths["train"].write_text("".join(json.dumps(r) + "\n" for r in train))
    paths["eval"].write_text("".join(json.dumps(r) + "\n" for r in _rows(EVAL_PHRASES)))
    return {k: str(v) for k, v in paths.items()}
