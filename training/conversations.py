"""Multi-turn and tool-use conversations for SFT: which tokens each assistant turn trains.

A conversation row is OpenAI's chat fine-tuning format: ``{"messages": [...], "tools": [...]}``
where assistant messages may carry ``tool_calls`` and a ``weight`` (1: trained, 0: context),
and ``tool`` messages carry results. Every assistant turn with weight 1 (the default) is
trained; everything else — system, user and tool messages, and weight-0 turns — is context.

The row is rendered once through the model's own chat template (with ``tools``, so each
family's tool format is its own), and each trained turn's characters are found by rendering
the conversation up to that turn: the span between "everything before, plus the generation
prompt" and "everything up to and including the turn". Tokens inside a trained span get
``assistant_masks = 1``, which TRL's ``SFTTrainer`` turns into labels. This needs a template
whose rendering of a prefix of the conversation is a prefix of the whole (true of the common
families); one that rewrites earlier turns (e.g. drops past reasoning) is refused with the fix.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from registry.errors import ErrorCode, ForgelineError


class ConversationError(ForgelineError):
    code = ErrorCode.INVALID_CONFIG


def is_conversation(row: Any) -> bool:
    """Whether a row needs per-turn masking: tools, tool calls, tool results, several assistant
    turns, or an assistant turn that is not trained (weight 0). A row whose one assistant
    message is last (weight 1) is a plain prompt/completion row."""
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        return False
    messages = [m for m in row["messages"] if isinstance(m, dict)]
    assistants = [m for m in messages if m.get("role") == "assistant"]
    return (
        bool(row.get("tools"))
        or len(assistants) > 1
        or any(m.get("weight", 1) != 1 or m.get("tool_calls") for m in assistants)
        or any(m.get("role") == "tool" for m in messages)
    )


def _arguments(raw: Any, where: str) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ConversationError(f"{where}: `arguments` must be a JSON object (as a string), got {str(raw)[:60]!r}")
    return value


def check_conversation(row: dict[str, Any]) -> str | None:
    """Why a conversation row is invalid (with the message index), or None.

    Checks what the chat template cannot: weights are 0 or 1 on assistant messages, at
    least one turn is trained, tool calls name a declared tool with JSON-object arguments,
    and every tool result answers a call made before it.
    """
    tools = row.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return "`tools` must be a list of {type: function, function: {name, description, parameters}}"
    for k, tool in enumerate(tools or []):
        if not isinstance(tool.get("function"), dict) or not tool["function"].get("name"):
            return f"tools[{k}] needs `function: {{name, description, parameters}}`"
    declared = {t["function"]["name"] for t in tools or []}
    messages = row["messages"]
    open_calls: dict[str, str] = {}
    trained = 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            return f"{where} must be an object with role system, user, assistant or tool"
        role, content = m["role"], m.get("content")
        if "weight" in m and role != "assistant":
            return f"{where} has `weight`, which only assistant messages may carry"
        if role == "assistant":
            weight = m.get("weight", 1)
            if weight not in (0, 1) or isinstance(weight, bool):
                return f"{where} has `weight` {weight!r}; use 0 (context) or 1 (trained)"
            calls = m.get("tool_calls") or []
            if not calls and not (isinstance(content, str) and content):
                return f"{where} is an assistant message with neither `content` nor `tool_calls`"
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not function.get("name"):
                    return f"{where}.tool_calls[{j}] needs `function: {{name, arguments}}`"
                if tools is not None and function["name"] not in declared:
                    return f"{where}.tool_calls[{j}] calls `{function['name']}`, which `tools` does not declare"
                try:
                    _arguments(function.get("arguments", "{}"), f"{where}.tool_calls[{j}]")
                except ConversationError as exc:
                    return str(exc)
                open_calls[str(call.get("id", f"call_{i}_{j}"))] = function["name"]
            trained += weight
        elif role == "tool":
            if not isinstance(content, str):
                return f"{where} (a tool result) needs string `content`"
            call_id = m.get("tool_call_id")
            if call_id is not None and str(call_id) not in open_calls:
                return f"{where} answers tool call {call_id!r}, which no earlier assistant message made"
            if not open_calls:
                return f"{where} is a tool result with no tool call before it"
        elif not isinstance(content, str):
            return f"{where} needs string `content`"
    if not trained:
        return "no assistant message has weight 1, so the row trains nothing; give at least one weight 1"
    return None


def to_template_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages → what Hugging Face chat templates read: tool-call arguments as objects,
    tool results named after their call; ``weight`` removed."""
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        message: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            calls = []
            for j, call in enumerate(m["tool_calls"]):
                function = call["function"]
                call_id = str(call.get("id", f"call_{i}_{j}"))
                names[call_id] = function["name"]
                calls.append(
                    {"id": call_id, "type": "function",
                     "function": {"name": function["name"], "arguments": _arguments(function.get("arguments", "{}"), "")}}
                )
            message["tool_calls"] = calls
        if m["role"] == "tool":
            if m.get("tool_call_id") is not None:
                message["tool_call_id"] = str(m["tool_call_id"])
                message["name"] = names.get(str(m["tool_call_id"]), m.get("name", ""))
            elif m.get("name"):
                message["name"] = m["name"]
        out.append(message)
    return out


def _render(tokenizer: Any, messages: list[dict[str, Any]], tools: Any, *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, tokenize=False, add_generation_prompt=generation_prompt
    )


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template shows tools and tool calls to the model at all."""
    tools = [{"type": "function", "function": {"name": "probe_tool_x7", "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "probe_call_y9", "arguments": {}}}]},
    ]
    try:
        text = _render(tokenizer, messages, tools, generation_prompt=False)
    except Exception:  # noqa: BLE001 - templates raise anything (TemplateError, TypeError) on unknown shapes
        return False
    return "probe_tool_x7" in text and "probe_call_y9" in text


def tokenize_conversation(tokenizer: Any, row: dict[str, Any], *, max_length: int | None = None) -> dict[str, list[int]]:
    """``input_ids`` and ``assistant_masks`` (1 on every trained assistant turn) of one row.

    Raises:
        ConversationError: the chat template is not prefix-stable for this row, or the
            tokenizer gives no character offsets (a slow tokenizer).
    """
    messages = to_template_messages(row["messages"])
    tools = row.get("tools")
    text = _render(tokenizer, messages, tools, generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, original in enumerate(row["messages"]):
        if original["role"] != "assistant" or original.get("weight", 1) == 0:
            continue
        before = _render(tokenizer, messages[:i], tools, generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], tools, generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ConversationError(
                f"the chat template renders messages[{i}] differently once later turns follow, so its tokens cannot "
                "be found; fix: set model.chat_template to a template that renders each turn the same way "
                "(or train on the final turn only)",
                param="model.chat_template",
            )
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded.get("offset_mapping")
    if offsets is None:
        raise ConversationError("multi-turn training needs a fast tokenizer (character offsets)", param="model.base")
    mask = [int(any(start < end and s <= start and end <= e for s, e in spans)) for start, end in offsets]
    ids = list(encoded["input_ids"])
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return {"input_ids": ids, "assistant_masks": mask}
