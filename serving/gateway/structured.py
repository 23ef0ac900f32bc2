"""Structured chat on an engine of our own: ``tools`` / ``tool_choice`` and ``response_format``.

`plan_structure` turns a request into what the engine needs: the messages and tools for
the chat template, a guide factory (constrained decoding) and the model's tool-call format
to parse answers with. `ToolCallStream` splits a streamed answer into content deltas and
OpenAI ``tool_calls`` deltas: each call's id, type and name first (arguments ``""``), then
its arguments piece by piece as they are generated, in every format (Hermes, Llama-3 JSON,
Mistral).

Rules, as OpenAI's:
- ``tool_choice`` ``none`` leaves the tools out of the prompt and parses nothing; ``auto``
  (the default with tools) lets the model answer or call; ``required`` and a named function
  force a call by constrained decoding, the arguments following each function's JSON schema.
- ``response_format`` ``json_object`` / ``json_schema`` constrain the content when no call is forced.
- ``parallel_tool_calls: false`` allows one call.
- ``strict`` tools under ``auto``: free text that never opens a call, or calls that follow the
  schemas (for Llama-3 JSON: text that does not start with `{`; for Mistral: text that does not start
  as a list of calls and never writes `[TOOL_CALLS]`).
  Non-strict tools under ``auto`` are parsed, not constrained.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from registry.errors import ErrorCode, ForgelineError
from serving.engine.base import TokenGuide
from serving.engine.grammar import schema_of_response_format
from serving.engine.structured import StructuredEngine
from serving.engine.tool_formats import FORMATS, ToolCall, ToolFormat, new_call_id, select_tools
from serving.gateway.protocol import ChatCompletionRequest, ChatMessage


@dataclass
class StructurePlan:
    """What one chat request needs from the engine beyond plain text.

    Attributes:
        messages: the conversation as chat templates read it (tool-call arguments as objects).
        tools: function definitions for the template, or None.
        guide: makes each choice's `TokenGuide`, or None for free decoding.
        tool_format: the model's call format when answers are to be parsed for calls.
        parallel: whether more than one call per answer is kept.
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    guide: Callable[[], TokenGuide] | None = None
    tool_format: ToolFormat | None = None
    parallel: bool = True


def _bad(message: str, param: str) -> ForgelineError:
    return ForgelineError(message, code=ErrorCode.INVALID_REQUEST, param=param)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as Hugging Face chat templates read them.

    Assistant ``tool_calls`` keep their ids, with ``arguments`` parsed into objects; ``tool``
    messages carry ``tool_call_id`` and the called function's ``name``.

    Raises:
        ForgelineError: ``invalid_request`` naming the message field that is malformed.
    """
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        entry: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            calls = []
            for j, call in enumerate(m.tool_calls):
                where = f"messages[{i}].tool_calls[{j}]"
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise _bad(f"`{where}` needs `function: {{name, arguments}}`", where)
                raw = function.get("arguments") or "{}"
                try:
                    arguments = json.loads(raw) if isinstance(raw, str) else raw
                except ValueError as exc:
                    raise _bad(f"`{where}.function.arguments` is not JSON ({exc}); send a JSON object as a string",
                               f"{where}.function.arguments") from exc
                if not isinstance(arguments, dict):
                    raise _bad(f"`{where}.function.arguments` must be a JSON object", f"{where}.function.arguments")
                call_id = str(call.get("id") or f"call_{i}_{j}")
                names[call_id] = function["name"]
                calls.append({"id": call_id, "type": "function",
                              "function": {"name": function["name"], "arguments": arguments}})
            entry["tool_calls"] = calls
        if m.role == "tool":
            if m.tool_call_id is None:
                raise _bad(f"`messages[{i}].tool_call_id` is missing: a `tool` message must name the call it answers",
                           f"messages[{i}].tool_call_id")
            entry["tool_call_id"] = m.tool_call_id
            entry["name"] = names.get(m.tool_call_id, m.name or "")
        out.append(entry)
    return out


def _check_tools(tools: list[dict[str, Any]]) -> list[str]:
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(function, dict) or not isinstance(
            function.get("name"), str
        ):
            raise _bad(f'`tools[{i}]` must be {{"type": "function", "function": {{"name": ..., "parameters": {{...}}}}}}',
                       f"tools[{i}]")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise _bad(f"`tools[{i}].function.parameters` must be a JSON schema object", f"tools[{i}].function.parameters")
        names.append(function["name"])
    return names


def _choice(body: ChatCompletionRequest, names: list[str]) -> str | dict[str, Any]:
    choice = body.tool_choice
    if choice is None:
        return "auto" if names else "none"
    if not names and choice != "none":
        raise _bad("`tool_choice` needs `tools`; declare the functions the model may call", "tool_choice")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise _bad(f"`tool_choice` {choice!r} is not one of none, auto, required, or a named function", "tool_choice")
        return choice
    name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
    if name not in names:
        raise _bad(f"`tool_choice` names function {name!r}, which is not in `tools` ({', '.join(names)})", "tool_choice")
    return choice


def plan_structure(body: ChatCompletionRequest, engine: StructuredEngine, adapter: str | None) -> StructurePlan:
    """Check the request's tools and response format against the engine, and plan its decoding.

    Resolving a new adapter's template reads its folder: call this off the event loop.

    Raises:
        ForgelineError: ``invalid_request`` naming the field that cannot be served.
    """
    messages = template_messages(body.messages)
    plan = StructurePlan(messages=messages, parallel=body.parallel_tool_calls is not False)
    names = _check_tools(body.tools or [])
    choice = _choice(body, names)
    if names and choice != "none":
        fmt = engine.tool_format(adapter)
        if fmt is None:
            raise _bad(
                f"`tools` cannot be served: the chat template of `{body.model}` renders no tools in a format this engine parses "
                f"({', '.join(FORMATS)}); fix: serve a model whose template takes `tools`, or leave `tools` unset",
                "tools",
            )
        plan.tools, plan.tool_format = list(body.tools or []), fmt
        if choice != "auto":
            forced = select_tools(plan.tools, choice)
            grammar: str | None = fmt.grammar(forced, parallel=plan.parallel)
        elif any((t.get("function") or {}).get("strict") for t in plan.tools):
            grammar = fmt.auto_grammar(plan.tools, parallel=plan.parallel)
        else:
            grammar = None
        if grammar is not None:
            plan.guide = engine.guide_compiler().lark(grammar, param="tools")
    if plan.guide is None and body.response_format is not None and body.response_format.get("type") != "text":
        schema, param = schema_of_response_format(body.response_format)
        plan.guide = engine.guide_compiler().json_schema(schema, param=param)
    return plan


class ToolCallStream:
    """Splits one choice's streamed text into content and OpenAI ``tool_calls`` deltas.

    As OpenAI streams them: a call's first delta has its ``index``, ``id``, ``type`` and
    ``function.name`` with ``arguments: ""``, then each new piece of its arguments follows
    as generated. A call counts from its first delta on, so once a call has started the
    answer stays a call (under free decoding a call that never closes keeps what was sent).
    """

    def __init__(self, fmt: ToolFormat, *, parallel: bool = True) -> None:
        self._fmt = fmt
        self._parallel = parallel
        self._text = ""
        self._emitted = 0  # characters delivered as content
        self._start: int | None = None
        self._sent: list[int] = []  # characters of each call's arguments sent so far
        self.calls: list[ToolCall] = []

    def feed(self, piece: str) -> tuple[str, list[dict[str, Any]]]:
        """New content and tool-call deltas after ``piece`` of generated text."""
        self._text += piece
        if self._start is None:
            self._start = self._fmt.start(self._text)
        end = self._start if self._start is not None else len(self._text) - self._fmt.holdback(self._text)
        content = self._text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return content, self._new_deltas()

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """What is left once generation ended: held-back content, the last argument pieces."""
        deltas = self._new_deltas()
        content = ""
        if not self.calls:  # no call after all: everything is content
            content, self._emitted = self._text[self._emitted :], len(self._text)
        return content, deltas

    def _new_deltas(self) -> list[dict[str, Any]]:
        if self._start is None:
            return []
        found = self._fmt.partial_calls(self._text[self._start :])
        if not self._parallel:
            found = found[:1]
        deltas: list[dict[str, Any]] = []
        for index, partial in enumerate(found):
            if index == len(self.calls):
                call = ToolCall(new_call_id(), partial.name, partial.arguments)
                self.calls.append(call)
                self._sent.append(0)
                deltas.append({"index": index, "id": call.id, "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            else:
                self.calls[index] = ToolCall(self.calls[index].id, partial.name, partial.arguments)
            if len(partial.arguments) > self._sent[index]:
                deltas.append({"index": index, "function": {"arguments": partial.arguments[self._sent[index] :]}})
                self._sent[index] = len(partial.arguments)
        return deltas


def parse_answer(fmt: ToolFormat, text: str, *, parallel: bool) -> tuple[str | None, list[ToolCall]]:
    """A finished answer's content and calls (at most one without ``parallel``)."""
    content, calls = fmt.parse(text)
    return content, calls if parallel else calls[:1]
