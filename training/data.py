"""Training data: load local files or hub datasets, check every row, split, digest.

Rows are validated against the method's format *before* training starts; bad rows are
reported with file and line number (the first few, plus a count) as one ``DataError``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.errors import ErrorCode, ForgelineError

from .config import DataSpec, DPOMethod, GRPOMethod, MethodSpec, SFTMethod
from .conversations import check_conversation, is_conversation
from .preferences import check_tool_preference, is_tool_preference

log = logging.getLogger(__name__)

_SHOWN = 5
_ROLES = {"system", "user", "assistant", "tool"}

RowCheck = Callable[[Any], str | None]
"""Why a row is not valid for a method, or None when it is."""


class DataError(ForgelineError):
    code = ErrorCode.INVALID_CONFIG


@dataclass(frozen=True)
class DataSplit:
    """Validated rows ready for a trainer, plus what lineage needs to know of them."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    digest: str
    sources: tuple[str, ...]


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str) for m in value)
    )


def check_sft_row(row: Any) -> str | None:
    """Why a row is not a valid SFT example, or None when it is.

    Accepted: ``{"prompt", "completion"}`` (both strings, or both message lists),
    ``{"messages": [...]}``, or ``{"text": "..."}`` — TRL's SFT formats; and conversations
    in OpenAI's chat fine-tuning format (``tools``, assistant ``tool_calls``, ``tool``
    results, per-message ``weight``: see ``training.conversations``).
    """
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if is_conversation(row):
        return check_conversation(row)
    if "messages" in row:
        return None if _is_messages(row["messages"]) else "`messages` must be a non-empty list of {role, content}"
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            return None if completion else "`completion` is empty"
        if _is_messages(prompt) and _is_messages(completion):
            return None
        return "`prompt` and `completion` must both be strings or both be message lists"
    if "text" in row:
        return None if isinstance(row["text"], str) and row["text"] else "`text` must be a non-empty string"
    return f"no known fields (got {sorted(row)[:5]}); use prompt/completion, messages or text"


def _is_completion_messages(value: Any) -> bool:
    return _is_messages(value) and all(m["role"] == "assistant" for m in value)


def check_dpo_row(row: Any) -> str | None:
    """Why a row is not a valid preference pair, or None when it is.

    Accepted: ``{"prompt", "chosen", "rejected"}`` all strings, or a message-list prompt
    with assistant-message ``chosen`` and ``rejected`` — TRL's preference formats — which
    may carry ``tools``, tool calls and tool results (see ``training.preferences``).
    """
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    missing = [key for key in ("prompt", "chosen", "rejected") if key not in row]
    if missing:
        return f"missing {', '.join(f'`{k}`' for k in missing)}; a preference row needs prompt, chosen and rejected"
    if is_tool_preference(row):
        return check_tool_preference(row)
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        if not prompt or not chosen or not rejected:
            return "`prompt`, `chosen` and `rejected` must be non-empty"
    elif _is_messages(prompt) and _is_completion_messages(chosen) and _is_completion_messages(rejected):
        pass
    else:
        return (
            "`prompt`, `chosen` and `rejected` must all be strings, or a message list and two lists of "
            "assistant messages"
        )
    if chosen == rejected:
        return "`chosen` and `rejected` are identical; the pair teaches nothing"
    return None


def grpo_row_check(fields: list[str]) -> RowCheck:
    """A check for prompt-only rows that also carry the reference ``fields`` the rewards read."""

    def check(row: Any) -> str | None:
        if not isinstance(row, dict):
            return f"expected a JSON object, got {type(row).__name__}"
        prompt = row.get("prompt")
        if prompt is None:
            return "missing `prompt`; a GRPO row is a prompt plus the reference fields its rewards read"
        if isinstance(prompt, str):
            if not prompt:
                return "`prompt` is empty"
        elif not _is_messages(prompt) or prompt[-1]["role"] == "assistant":
            return "`prompt` must be a string or a message list that ends with a user (or system/tool) turn"
        for name in fields:
            if name not in row or row[name] is None or row[name] == "":
                return f"missing reference field `{name}` (read by a reward in method.rewards)"
        return None

    return check


def row_check(method: MethodSpec | None) -> RowCheck:
    """The row check of ``method`` (SFT when None)."""
    if isinstance(method, DPOMethod):
        return check_dpo_row
    if isinstance(method, GRPOMethod):
        fields = sorted({f for f in (r.reference_field() for r in method.rewards) if f})
        return grpo_row_check(fields)
    return check_sft_row


def check_any_row(row: Any) -> str | None:
    """Valid for at least one method (evaluation reads whatever a version was trained on)."""
    for check in (check_sft_row, check_dpo_row, grpo_row_check([])):
        if check(row) is None:
            return None
    return check_sft_row(row)


_FORMATS = {
    SFTMethod: "each row needs prompt+completion, messages, or text (see recipes/data/support-tickets/train.jsonl)",
    DPOMethod: "each row needs prompt, chosen and rejected (see recipes/data/support-preferences/train.jsonl)",
    GRPOMethod: "each row needs a prompt and the reference fields its rewards read (see recipes/data/toy-arithmetic/train.jsonl)",
}


def _read_local(path: Path) -> list[tuple[int, Any]]:
    """(line number, row) pairs; line numbers are 1-based, or row indexes for non-JSONL."""
    if path.suffix == ".jsonl":
        rows = []
        with path.open() as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    rows.append((number, _BadJson(str(err))))
        return rows
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows; fix: write one object per row in a list, or use JSONL")
        return list(enumerate(data, start=1))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; fix: use .jsonl, .json or .parquet")


@dataclass(frozen=True)
class _BadJson:
    error: str


def _load_source(source: str, check: RowCheck = check_sft_row) -> tuple[list[dict[str, Any]], str, list[str]]:
    """Rows, content digest and problems of one data source."""
    path = Path(source)
    if path.exists():
        numbered = _read_local(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        unit = "line" if path.suffix == ".jsonl" else "row"
    else:
        numbered, digest = _load_hub(source)
        unit = "row"
    rows, problems = [], []
    for number, row in numbered:
        reason = f"invalid JSON: {row.error}" if isinstance(row, _BadJson) else check(row)
        if reason:
            problems.append(f"{source}:{unit} {number}: {reason}")
        else:
            rows.append(row)
    if not numbered:
        problems.append(f"{source}: no rows")
    return rows, digest, problems


def _load_hub(name: str) -> tuple[list[tuple[int, Any]], str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as err:  # datasets raises many types for "not found / offline"
        raise DataError(
            f"data source {name!r} is neither a local file nor a loadable hub dataset ({type(err).__name__}); "
            "fix: check the path (relative to the recipe) or the dataset name"
        ) from err
    return list(enumerate(ds, start=1)), ds._fingerprint


def _describe(problems: list[str], consequence: str, method: MethodSpec | None = None) -> str:
    """The first few problems, a count of the rest, and the fix."""
    shown = "\n  ".join(problems[:_SHOWN])
    more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    fix = _FORMATS[type(method)] if method is not None else "each row needs one of the formats of the method it trains"
    return f"{len(problems)} bad row(s); {consequence}:\n  {shown}{more}\nfix: {fix}"


def load_data(spec: DataSpec, *, seed: int, method: MethodSpec | None = None) -> DataSplit:
    """Load, validate against ``method``'s row format (SFT when None) and split the recipe's data.

    Raises:
        DataError: listing the first bad rows (file and line) and how many there are.
    """
    check = row_check(method)
    train, train_digest, problems = _load_source(spec.train, check)
    sources = [spec.train]
    if spec.eval:
        evals, eval_digest, eval_problems = _load_source(spec.eval, check)
        problems += eval_problems
        sources.append(spec.eval)
    else:
        import random

        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(len(train) * spec.eval_fraction))
        held = set(order[:n_eval])
        evals = [row for i, row in enumerate(train) if i in held]
        train = [row for i, row in enumerate(train) if i not in held]
        eval_digest = f"split:{spec.eval_fraction}:{seed}"
    if problems:
        raise DataError(_describe(problems, "training did not start", method or SFTMethod()))
    digest = hashlib.sha256(f"{train_digest}:{eval_digest}".encode()).hexdigest()[:16]
    log.info("data: %d train rows, %d eval rows, digest %s", len(train), len(evals), digest)
    return DataSplit(train=train, eval=evals, digest=digest, sources=tuple(sources))


def load_rows(source: str) -> list[dict[str, Any]]:
    """All rows of one source, validated; for evaluating a version on its recorded data."""
    rows, _, problems = _load_source(source, check_any_row)
    if problems:
        raise DataError(_describe(problems, f"cannot evaluate on {source}"))
    return rows
