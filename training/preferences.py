"""Preference pairs with tools for DPO: checked like conversations, rendered to text up front.

A tool-use pair is TRL's conversational preference row plus ``tools``: a message-list
``prompt`` (which may hold earlier tool calls and tool results) and one assistant message
each in ``chosen`` and ``rejected``, either of which may be a tool call. Agents are mostly
taught *which call to make*, so a pair whose chosen answer is the right call and whose
rejected one is a wrong function or wrong arguments is the common case.

Such rows are rendered through the model's chat template here rather than by TRL: TRL would
first put them in an Arrow table, which gives every tool call's ``arguments`` the union of
all rows' argument keys (missing ones as null), so the model would be trained on arguments
nobody wrote. The rendered strings are exactly what TRL's own conversational path renders:
the prompt with the generation prompt, and each answer as the rest of prompt + answer.
"""

from __future__ import annotations

from typing import Any

from .conversations import ConversationError, check_conversation, template_renders_tools, to_template_messages


def is_tool_preference(row: Any) -> bool:
    """Whether a preference row has tools, tool calls or tool results (so needs `render_preference`)."""
    if not isinstance(row, dict):
        return False
    messages = [m for key in ("prompt", "chosen", "rejected") if isinstance(row.get(key), list) for m in row[key]]
    return bool(row.get("tools")) or any(
        isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in messages
    )


def check_tool_preference(row: dict[str, Any]) -> str | None:
    """Why a tool-use preference row is invalid, or None.

    Each answer, appended to the prompt, must be a valid conversation: calls name a declared
    tool with JSON-object arguments and every tool result answers an earlier call.
    """
    prompt = row["prompt"]
    if not isinstance(prompt, list) or not prompt:
        return "a preference row with tools needs a message-list `prompt`"
    if not isinstance(prompt[-1], dict) or prompt[-1].get("role") not in ("user", "tool"):
        return "`prompt` must end with a user or tool message (the answers follow it)"
    for key in ("chosen", "rejected"):
        answer = row[key]
        if not (isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], dict)):
            return f"`{key}` must be a list of exactly one assistant message"
        if answer[0].get("role") != "assistant":
            return f"`{key}[0]` must be an assistant message, not {answer[0].get('role')!r}"
        if not answer[0].get("content") and not answer[0].get("tool_calls"):
            return f"`{key}[0]` needs `content` or `tool_calls`"
        problem = check_conversation({"messages": [*prompt, *answer], "tools": row.get("tools")})
        if problem:
            return f"`prompt` + `{key}`: {problem}"
    if to_template_messages(row["chosen"]) == to_template_messages(row["rejected"]):
        return "`chosen` and `rejected` are identical; the pair teaches nothing"
    return None


def render_preference(tokenizer: Any, row: dict[str, Any]) -> dict[str, str]:
    """A preference row as the strings TRL's DPO trains on: ``prompt``, ``chosen``, ``rejected``.

    Raises:
        ConversationError: the chat template renders the prompt differently once an answer
            follows, so the answer's text cannot be cut out.
    """
    tools = row.get("tools") or None
    prompt = to_template_messages(row["prompt"])
    head = tokenizer.apply_chat_template(prompt, tools=tools, tokenize=False, add_generation_prompt=True)
    out = {"prompt": head}
    for key in ("chosen", "rejected"):
        whole = tokenizer.apply_chat_template(
            prompt + to_template_messages(row[key]), tools=tools, tokenize=False, add_generation_prompt=False
        )
        if not whole.startswith(head):
            raise ConversationError(
                f"the chat template renders the prompt differently once `{key}` follows, so the answer cannot be "
                "cut out; fix: set model.chat_template to a template that renders each turn the same way",
                param="model.chat_template",
            )
        out[key] = _end_on_eos(whole[len(head) :], tokenizer.eos_token)
    return out


def _end_on_eos(answer: str, eos: str | None) -> str:
    # TRL appends EOS to a text answer that does not end with it; a template that closes the
    # turn with EOS and then a newline would otherwise train a second EOS.
    stripped = answer.rstrip()
    return stripped if eos and stripped.endswith(eos) else answer


def preference_dataset_rows(rows: list[dict[str, Any]], tokenizer: Any) -> list[dict[str, Any]]:
    """``rows`` for TRL's DPO: as they are, or all rendered to text when any has tools.

    Raises:
        ConversationError: rows have tools but the chat template does not show them.
    """
    if not any(is_tool_preference(row) for row in rows):
        return rows
    if not template_renders_tools(tokenizer):
        raise ConversationError(
            "the preference data has tools or tool calls, but the model's chat template does not render them, "
            "so the model would never see them; fix: set model.chat_template to a template with tool support",
            param="model.chat_template",
        )
    return [_as_text(tokenizer, row) for row in rows]


def _as_text(tokenizer: Any, row: dict[str, Any]) -> dict[str, str]:
    if isinstance(row["prompt"], str):  # a plain-text pair beside tool pairs: the template frames it too
        row = {"prompt": [{"role": "user", "content": row["prompt"]}],
               "chosen": [{"role": "assistant", "content": row["chosen"]}],
               "rejected": [{"role": "assistant", "content": row["rejected"]}]}
    return render_preference(tokenizer, row)
