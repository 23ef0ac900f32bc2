"""Reading a suite's JSONL rows and rendering their prompts with the model's chat template."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from registry.errors import ErrorCode, ForgelineError


def read_jsonl(path: str, *, required: tuple[str, ...], limit: int | None = None) -> list[dict[str, Any]]:
    """The rows of a JSONL file, each checked to have the ``required`` fields.

    Raises:
        ForgelineError: a line is not a JSON object or lacks a field (naming the line and the fix).
    """
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ForgelineError(f"{path}:{number}: not JSON ({err}); fix: one JSON object per line",
                                 code=ErrorCode.INVALID_REQUEST, param="data") from None
        missing = [f for f in required if not isinstance(row, dict) or f not in row]
        if missing:
            raise ForgelineError(f"{path}:{number}: missing {', '.join(missing)}; fix: every row needs {', '.join(required)}",
                                 code=ErrorCode.INVALID_REQUEST, param="data")
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    return rows


def messages_of(row: dict[str, Any]) -> list[dict[str, str]]:
    """A row's prompt as chat messages (`prompt` text is one user turn)."""
    prompt = row.get("messages", row.get("prompt"))
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt as the model sees it when served: its chat template with the generation prompt."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def stable_id(*parts: object) -> str:
    """A short digest identifying an item, so two versions scored on the same file pair up item by item."""
    return hashlib.sha256("\0".join(json.dumps(p, sort_keys=True) for p in parts).encode()).hexdigest()[:16]


def unique_ids(ids: list[str]) -> list[str]:
    """``ids`` with repeats numbered (``x``, ``x#2``): a repeated row is a second item, not the same one twice."""
    seen: dict[str, int] = {}
    out = []
    for item in ids:
        seen[item] = seen.get(item, 0) + 1
        out.append(item if seen[item] == 1 else f"{item}#{seen[item]}")
    return out
