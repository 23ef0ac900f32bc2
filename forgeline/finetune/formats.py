"""OpenAI fine-tuning JSONL: check a whole file, then convert its rows for our trainers.

Three OpenAI formats, one per method; a file holds exactly one of them (its first valid
line decides):

* ``chat`` (``supervised``): ``{"messages": [...]}`` ending with an assistant message.
* ``preference`` (``dpo``): ``{"input": {"messages": [...]}, "preferred_output": [...],
  "non_preferred_output": [...]}``.
* ``prompt`` (``reinforcement``): ``{"messages": [...]}`` ending with a user message, plus
  the reference fields the graders read (``"reference_answer": "42"``).

Tool calls, function definitions and multi-part (image) content are refused with a clear
"not supported yet" problem rather than silently dropped. Converted rows are the formats
``training.data`` already checks (TRL's conversational prompt-completion, preference and
prompt-only rows).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from registry.errors import ErrorCode, ForgelineError
from serving.gateway.json_body import UntrustedJSONError, loads_untrusted
from training.conversations import check_conversation, is_conversation, to_template_messages
from training.preferences import check_tool_preference, is_tool_preference

_SHOWN = 5
_ROLES = ("system", "user", "assistant", "tool")
# The legacy function-calling fields (superseded by `tools` / `tool_calls`).
_UNSUPPORTED_FIELDS = ("functions",)
_UNSUPPORTED_MESSAGE_FIELDS = ("function_call",)


class FileFormat(StrEnum):
    """The OpenAI fine-tuning file formats."""

    CHAT = "chat"
    PREFERENCE = "preference"
    PROMPT = "prompt"


METHOD_FORMATS: dict[str, FileFormat] = {
    "supervised": FileFormat.CHAT,
    "dpo": FileFormat.PREFERENCE,
    "reinforcement": FileFormat.PROMPT,
}
"""The file format each OpenAI fine-tuning method trains on."""

_SHAPES: dict[FileFormat, str] = {
    FileFormat.CHAT: '{"messages": [...]} ending with an assistant message (supervised)',
    FileFormat.PREFERENCE: (
        '{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": "..."}], '
        '"non_preferred_output": [{"role": "assistant", "content": "..."}]} (dpo)'
    ),
    FileFormat.PROMPT: '{"messages": [...]} ending with a user message, plus reference fields (reinforcement)',
}
_ROW_NAMES: dict[FileFormat, str] = {
    FileFormat.CHAT: '{"messages"} ending with an assistant message',
    FileFormat.PREFERENCE: '{"input", "preferred_output", "non_preferred_output"}',
    FileFormat.PROMPT: '{"messages"} ending with a user message',
}


class FileFormatError(ForgelineError):
    """A fine-tuning file is not valid JSONL of one OpenAI format (HTTP 400, ``param`` ``file``)."""

    code = ErrorCode.INVALID_REQUEST

    def __init__(self, message: str, *, code: str | None = None, param: str | None = "file") -> None:
        super().__init__(message, code=code, param=param)


@dataclass(frozen=True)
class FileSummary:
    """What a valid file holds.

    Attributes:
        format: the one format of every row.
        rows: number of rows (blank lines not counted).
        reference_fields: prompt files only: the top-level fields other than ``messages``
            present on every row (sorted); ``()`` for other formats.
    """

    format: FileFormat
    rows: int
    reference_fields: tuple[str, ...]


def _fix(fmt: FileFormat | None) -> str:
    if fmt is not None:
        return f"fix: each line must be {_SHAPES[fmt]}"
    shapes = [_SHAPES[f] for f in FileFormat]
    return f"fix: each line must be one JSON object of one format: {shapes[0]}, {shapes[1]}, or {shapes[2]}"


def _message_problem(message: Any, where: str, *, final: bool = False) -> str | None:
    if not isinstance(message, dict):
        return f"{where} must be an object {{role, content}}, got {type(message).__name__}"
    for name in _UNSUPPORTED_MESSAGE_FIELDS:
        if name in message:
            return f"{where} has `{name}`, the legacy form of function calling; use `tool_calls` and a `tool` message"
    role = message.get("role")
    if role == "function":
        return f"{where} has role 'function', the legacy form of function calling; use role 'tool'"
    if role not in _ROLES:
        return f"{where} has role {role!r}; use one of {', '.join(_ROLES)}"
    content = message.get("content")
    if role == "assistant" and message.get("tool_calls") and content in (None, ""):
        return None  # a pure tool call; `training.conversations.check_conversation` checks the calls
    if isinstance(content, list):
        return f"{where} has multi-part (e.g. image) content, which is not supported yet; use a string"
    if not isinstance(content, str):
        return f"{where} needs string `content`, got {type(content).__name__}"
    if "weight" in message:
        weight = message["weight"]
        if role != "assistant":
            return f"{where} has `weight`, which only assistant messages may carry"
        if weight not in (0, 1) or isinstance(weight, bool):
            return f"{where} has `weight` {weight!r}; use 0 or 1"
        if final and weight == 0:
            return f"{where} is the final assistant message with weight 0; forgeline trains on that message, so drop it"
    return None


def _messages_problem(messages: Any, where: str, *, last_roles: tuple[str, ...]) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"`{where}` must be a non-empty list of messages"
    for i, message in enumerate(messages):
        problem = _message_problem(message, f"{where}[{i}]", final=i == len(messages) - 1)
        if problem:
            return problem
    if messages[-1]["role"] not in last_roles:
        return f"`{where}` must end with a {' or '.join(last_roles)} message, not {messages[-1]['role']!r}"
    return None


def _unsupported(row: dict[str, Any], where: str = "") -> str | None:
    for name in _UNSUPPORTED_FIELDS:
        if name in row:
            return f"`{where}{name}` is the legacy form of function calling; use `tools`"
    return None


def _output_problem(value: Any, name: str) -> str | None:
    if not isinstance(value, list) or len(value) != 1:
        return f"`{name}` must be a list of exactly one assistant message"
    problem = _message_problem(value[0], f"{name}[0]")
    if problem:
        return problem
    if value[0]["role"] != "assistant":
        return f"`{name}[0]` must be an assistant message, not {value[0]['role']!r}"
    if not value[0].get("content") and not value[0].get("tool_calls"):
        return f"`{name}[0].content` is empty (and it makes no `tool_calls`)"
    return None


def _classify(row: dict[str, Any]) -> tuple[FileFormat | None, str | None]:
    """The format a row is meant to be (None when unrecognisable) and its problem, if any."""
    if any(k in row for k in ("input", "preferred_output", "non_preferred_output")):
        missing = [k for k in ("input", "preferred_output", "non_preferred_output") if k not in row]
        if missing:
            return FileFormat.PREFERENCE, f"a preference row needs {', '.join(f'`{k}`' for k in missing)}"
        if not isinstance(row["input"], dict):
            return FileFormat.PREFERENCE, '`input` must be an object {"messages": [...]}'
        problem = (
            _unsupported(row["input"], "input.")
            or _messages_problem(row["input"].get("messages"), "input.messages", last_roles=("user", "tool"))
            or _output_problem(row["preferred_output"], "preferred_output")
            or _output_problem(row["non_preferred_output"], "non_preferred_output")
        )
        if problem is None:
            pair = _preference_row(row)
            if is_tool_preference(pair):  # tool calls name declared tools, results answer calls
                problem = check_tool_preference(pair)
            elif pair["chosen"] == pair["rejected"]:
                problem = "`chosen` and `rejected` are identical; the pair teaches nothing"
            if problem:  # in the names of the uploaded format
                for ours, theirs in (("prompt", "input.messages"), ("chosen", "preferred_output"),
                                     ("rejected", "non_preferred_output")):
                    problem = problem.replace(f"`{ours}", f"`{theirs}")
        return FileFormat.PREFERENCE, problem
    if "messages" not in row:
        return None, (
            f"no `messages` or `input`/`preferred_output`/`non_preferred_output` (got keys {sorted(row)[:5]})"
        )
    messages = row["messages"]
    last = messages[-1] if isinstance(messages, list) and messages else None
    fmt = FileFormat.CHAT if isinstance(last, dict) and last.get("role") == "assistant" else FileFormat.PROMPT
    problem = _unsupported(row)
    if fmt is FileFormat.CHAT:
        problem = problem or _messages_problem(messages, "messages", last_roles=("assistant",))
        if problem is None and not any(m["role"] == "user" for m in messages[:-1]):
            problem = "`messages` needs a user message before the final assistant message"
        if problem is None and is_conversation(row):
            problem = check_conversation(row)  # tools, tool calls, tool results, weights
        elif problem is None and not messages[-1]["content"]:
            problem = "the final assistant message has empty `content`"
    else:
        problem = problem or _messages_problem(messages, "messages", last_roles=("user",))
        if problem is None and "prompt" in row:
            problem = "a reference field may not be named `prompt` (the trainer's prompt column); rename it"
    return fmt, problem


def _scan(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, FileFormat | None, str | None]]:
    """Yield ``(line number, row, format, problem)`` for every non-blank line."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, None, None, f"not UTF-8 (byte {exc.start})"
                continue
            if not text.strip():
                continue
            try:
                row = loads_untrusted(text, what="row")
            except json.JSONDecodeError as exc:
                yield number, None, None, f"not valid JSON ({exc.msg} at column {exc.colno})"
                continue
            except UntrustedJSONError as exc:
                yield number, None, None, exc.message
                continue
            if not isinstance(row, dict):
                yield number, None, None, f"expected a JSON object, got {type(row).__name__}"
                continue
            fmt, problem = _classify(row)
            yield number, row, fmt, problem


def _read(path: Path, *, filename: str, param: str, keep: bool) -> tuple[FileSummary, list[dict[str, Any]]]:
    name = filename or path.name
    fmt: FileFormat | None = None
    problems: list[str] = []
    rows: list[dict[str, Any]] = []
    count = 0
    common: set[str] | None = None
    for number, row, kind, problem in _scan(path):
        if problem is None and row is not None and kind is not None:
            if fmt is None:
                fmt = kind
            elif kind is not fmt:
                problem = f"a {kind} row in a {fmt} file"
        if problem is not None:
            problems.append(f"line {number}: {problem}")
            continue
        assert row is not None
        count += 1
        if kind is FileFormat.PROMPT:
            fields = set(row) - {"messages"}
            common = fields if common is None else common & fields
        if keep:
            rows.append(row)
    if problems:
        shown = [f"  {p}" for p in problems[:_SHOWN]]
        if len(problems) > _SHOWN:
            shown.append(f"  ... and {len(problems) - _SHOWN} more")
        message = "\n".join([f"file {name!r} has {len(problems)} problem(s):", *shown, _fix(fmt)])
        raise FileFormatError(message, param=param)
    if fmt is None:
        what = "is empty" if path.stat().st_size == 0 else "has no rows (only blank lines)"
        raise FileFormatError(f"file {name!r} {what}; {_fix(None)}", param=param)
    reference = tuple(sorted(common or ())) if fmt is FileFormat.PROMPT else ()
    return FileSummary(format=fmt, rows=count, reference_fields=reference), rows


def inspect_jsonl(path: Path, *, filename: str = "") -> FileSummary:
    """Check every line of an OpenAI fine-tuning JSONL file.

    Args:
        path: the file on disk.
        filename: the name to show in messages (the uploaded name); default ``path.name``.

    Returns:
        The file's format, row count and (prompt files) reference fields.

    Raises:
        FileFormatError: any line is not a valid row of the file's one format, or the
            file has no rows. The message lists the first few problems by line number.
    """
    return _read(path, filename=filename, param="file", keep=False)[0]


def _strip(message: dict[str, Any]) -> dict[str, Any]:
    # Only role and content reach the chat template of a plain row (`name` is dropped).
    return {"role": message["role"], "content": message["content"]}


def _preference_row(row: dict[str, Any]) -> dict[str, Any]:
    # Tool calls keep their arguments (as objects, for the template); `training.preferences`
    # renders rows with tools for TRL.
    pair = {
        "prompt": to_template_messages(row["input"]["messages"]),
        "chosen": [_answer(m) for m in row["preferred_output"]],
        "rejected": [_answer(m) for m in row["non_preferred_output"]],
    }
    return pair | ({"tools": row["input"]["tools"]} if row["input"].get("tools") else {})


def _answer(message: dict[str, Any]) -> dict[str, Any]:
    return to_template_messages([message])[0] if message.get("tool_calls") else _strip(message)


def _chat_row(row: dict[str, Any]) -> dict[str, Any]:
    if is_conversation(row):
        # Tools, tool calls, several assistant turns or weights: trained turn by turn
        # (`training.conversations`), every weight-1 assistant message.
        kept = {"messages": row["messages"]}
        return kept | ({"tools": row["tools"]} if row.get("tools") else {})
    return {"prompt": [_strip(m) for m in row["messages"][:-1]], "completion": [_strip(row["messages"][-1])]}


def training_rows(path: Path, method: str) -> list[dict[str, Any]]:
    """The rows of a fine-tuning file converted for forgeline's trainer of ``method``.

    * chat → ``{"prompt": messages[:-1], "completion": [messages[-1]]}`` (loss on the
      final assistant message), or, for rows with tools, tool calls, several assistant
      turns or weights, ``{"messages", "tools"}`` as uploaded (every weight-1 turn trained),
    * preference → ``{"prompt": input.messages, "chosen": preferred_output,
      "rejected": non_preferred_output}``,
    * prompt → ``{"prompt": messages, **reference fields}``.

    Args:
        path: a file that passed :func:`inspect_jsonl`.
        method: ``supervised``, ``dpo`` or ``reinforcement``.

    Raises:
        FileFormatError: (``param`` ``training_file``) the file is invalid or its format
            does not fit ``method``; ``param`` ``method`` for an unknown method.
    """
    if method not in METHOD_FORMATS:
        raise FileFormatError(
            f"method {method!r} is not supported; fix: use one of {', '.join(METHOD_FORMATS)}", param="method"
        )
    summary, rows = _read(path, filename=path.name, param="training_file", keep=True)
    wanted = METHOD_FORMATS[method]
    if summary.format is not wanted:
        raise FileFormatError(
            f"file is a {summary.format} file, but method `{method}` needs {wanted} rows ({_ROW_NAMES[wanted]}); "
            f"fix: upload a file whose lines are {_SHAPES[wanted]}, or choose the method for {summary.format} "
            f"files (`{next(m for m, f in METHOD_FORMATS.items() if f is summary.format)}`)",
            param="training_file",
        )
    if wanted is FileFormat.CHAT:
        return [_chat_row(row) for row in rows]
    if wanted is FileFormat.PREFERENCE:
        return [_preference_row(row) for row in rows]
    return [
        {"prompt": [_strip(m) for m in row["messages"]], **{k: v for k, v in row.items() if k != "messages"}}
        for row in rows
    ]
