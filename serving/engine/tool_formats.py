"""How model families write tool calls: find them in generated text, and constrain them.

Each chat template that renders ``tools`` teaches its model one way to call them; the
format is recognised from the template text (`detect_tool_format`):

- **Hermes / Qwen** (``hermes``): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  one block per call, after optional text. Qwen2.5/3, Hermes 2/3 and our tiny tool template.
- **Llama 3.1+ JSON** (``llama3_json``): the whole answer is ``{"name": ..., "parameters": {...}}``,
  optionally after ``<|python_tag|>``; several calls are separated by ``;``.
- **Mistral** (``mistral``): ``[TOOL_CALLS]`` then a JSON list ``[{"name", "arguments"}, ...]``
  (v3 tokenizers) or ``name[ARGS]{...}`` per call (v11+). ``[TOOL_CALLS]`` is a special
  token, removed when the engine decodes text, so a list of calls at the very start counts too.

A format also gives the llguidance grammar that forces a call (``tool_choice`` ``required``
or a named function), with each function's arguments constrained to its JSON schema.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from serving.engine.grammar import JSON_OPTIONS


@dataclass(frozen=True)
class ToolCall:
    """One parsed call, as OpenAI returns it (``arguments`` is a JSON string)."""

    id: str
    name: str
    arguments: str

    def wire(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's ``tool_calls`` entry (with ``index`` for a streamed delta)."""
        entry: dict[str, Any] = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return entry if index is None else {"index": index, **entry}


def new_call(name: str, arguments: Any) -> ToolCall:
    """A call with a fresh OpenAI-style id; ``arguments`` as an object or its JSON text."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=name, arguments=text)


def _call_of(obj: Any, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return new_call(obj["name"], arguments)


def _function_schema(tool: dict[str, Any], args_key: str) -> dict[str, Any]:
    function = tool.get("function", tool)
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, args_key: parameters},
        "required": ["name", args_key],
        "additionalProperties": False,
    }


def _json_rule(schema: dict[str, Any]) -> str:
    # JSON as templates render calls (`tojson`: ", " and ": "), no free whitespace; see `serving.engine.grammar`.
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def _one_of_calls(tools: list[dict[str, Any]], args_key: str) -> str:
    schemas = [_function_schema(t, args_key) for t in tools]
    return _json_rule(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})


class ToolFormat:
    """Base: a format whose calls take the whole answer (decided at its first characters)."""

    name = "none"
    args_key = "arguments"

    def start(self, text: str) -> int | None:
        """Where tool calls begin in ``text`` (generated so far), or None."""
        raise NotImplementedError

    def holdback(self, text: str) -> int:
        """Trailing characters of ``text`` that may still grow into the start of a call (not yet content)."""
        return 0

    def complete_calls(self, region: str, *, final: bool) -> list[ToolCall]:
        """The calls in ``region`` (from `start` on) that are complete; ``final`` once generation ended."""
        raise NotImplementedError

    def grammar(self, tools: list[dict[str, Any]], *, parallel: bool) -> str:
        """A Lark grammar (llguidance dialect) that allows only calls of ``tools``."""
        raise NotImplementedError

    def auto_grammar(self, tools: list[dict[str, Any]], *, parallel: bool) -> str | None:
        """A grammar for ``tool_choice: auto`` with strict tools: free text, or calls that follow
        the schemas; None where the format has none (the answer is then unconstrained)."""
        return None

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Split a whole answer into its content (None when empty) and its tool calls."""
        at = self.start(text)
        if at is None:
            return text, []
        calls = self.complete_calls(text[at:], final=True)
        if not calls:
            return text, []
        content = text[:at].strip()
        return content or None, calls


class HermesFormat(ToolFormat):
    """``<tool_call>{json}</tool_call>`` blocks."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def start(self, text: str) -> int | None:
        at = text.find(self.OPEN)
        return None if at < 0 else at

    def holdback(self, text: str) -> int:
        for size in range(min(len(self.OPEN) - 1, len(text)), 0, -1):
            if self.OPEN.startswith(text[-size:]):
                return size
        return 0

    def complete_calls(self, region: str, *, final: bool) -> list[ToolCall]:
        calls = []
        for block in self._BLOCK.findall(region):
            try:
                call = _call_of(json.loads(block), "arguments")
            except ValueError:
                call = None
            if call is not None:
                calls.append(call)
        return calls

    def grammar(self, tools: list[dict[str, Any]], *, parallel: bool) -> str:
        call = f'call: "{self.OPEN}" {_one_of_calls(tools, "arguments")} "{self.CLOSE}"'
        return ("start: call (\"\\n\"? call)*\n" if parallel else "start: call\n") + call

    def auto_grammar(self, tools: list[dict[str, Any]], *, parallel: bool) -> str | None:
        # Text that never opens a call, or text up to the first opening (lazy: it ends there) and
        # calls; llguidance's `&` / `~` on lexemes say "contains no opening".
        call = _one_of_calls(tools, "arguments")
        more = f'more: "\\n"? "{self.OPEN}" {call} "{self.CLOSE}"\n' if parallel else ""
        return (
            f'start: TEXT | opening {call} "{self.CLOSE}"{" more*" if parallel else ""}\n{more}'
            f"TEXT: /(?s:.+)/ & ~/(?s:.*){self.OPEN}(?s:.*)/\n"
            f"opening[lazy]: /(?s:.*){self.OPEN}/"
        )


class Llama3JsonFormat(ToolFormat):
    """A whole answer of ``{"name": ..., "parameters": {...}}`` (``;``-separated for several)."""

    name = "llama3_json"
    args_key = "parameters"
    TAG = "<|python_tag|>"

    def start(self, text: str) -> int | None:
        stripped = text.lstrip()
        offset = len(text) - len(stripped)
        if stripped.startswith(self.TAG):
            return offset
        return offset if stripped.startswith("{") else None

    def complete_calls(self, region: str, *, final: bool) -> list[ToolCall]:
        if not final:
            return []  # one JSON value: complete only when generation ends
        body = region.strip().removeprefix(self.TAG).strip()
        calls = []
        for part in body.split(";") if body.count("{") > 1 else [body]:
            try:
                call = _call_of(json.loads(part), "parameters")
            except ValueError:
                return []
            if call is None:
                return []
            calls.append(call)
        return calls

    def grammar(self, tools: list[dict[str, Any]], *, parallel: bool) -> str:
        return "start: " + _one_of_calls(tools, "parameters")


class MistralFormat(ToolFormat):
    """``[TOOL_CALLS][{"name", "arguments"}, ...]`` or ``[TOOL_CALLS]name[ARGS]{...}``."""

    name = "mistral"
    TAG = "[TOOL_CALLS]"
    _NAMED = re.compile(r"([A-Za-z0-9_.-]+)\[ARGS\]")

    def start(self, text: str) -> int | None:
        at = text.find(self.TAG)
        if at >= 0:
            return at
        stripped = text.lstrip()
        # The tag is a special token the decoder drops: a list at the very start is the calls.
        return len(text) - len(stripped) if stripped.startswith("[{") else None

    def holdback(self, text: str) -> int:
        if text.strip() == "[":
            return len(text)  # may open a list of calls
        for size in range(min(len(self.TAG) - 1, len(text)), 0, -1):
            if self.TAG.startswith(text[-size:]):
                return size
        return 0

    def complete_calls(self, region: str, *, final: bool) -> list[ToolCall]:
        if not final:
            return []
        body = region.replace(self.TAG, "").strip()
        if body.startswith("["):
            try:
                items = json.loads(body)
            except ValueError:
                return []
            calls = [_call_of(item, "arguments") for item in items] if isinstance(items, list) else []
            return [c for c in calls if c is not None] if calls and all(calls) else []
        calls = []
        decoder = json.JSONDecoder()
        pos = 0
        while (match := self._NAMED.search(body, pos)) is not None:
            try:
                arguments, end = decoder.raw_decode(body, match.end())
            except ValueError:
                return []
            call = _call_of({"name": match.group(1), "arguments": arguments}, "arguments")
            if call is None:
                return []
            calls.append(call)
            pos = end
        return calls

    def grammar(self, tools: list[dict[str, Any]], *, parallel: bool) -> str:
        schemas = [_function_schema(t, "arguments") for t in tools]
        item = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        array: dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
        if not parallel:
            array["maxItems"] = 1
        return f'start: "{self.TAG}" {_json_rule(array)}'


FORMATS: dict[str, type[ToolFormat]] = {f.name: f for f in (HermesFormat, Llama3JsonFormat, MistralFormat)}


def detect_tool_format(chat_template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template teaches, or None when it renders no tools we know.

    Recognised by the markers the template writes (see the module docstring).
    """
    if not chat_template or "tools" not in chat_template:
        return None
    if "<tool_call>" in chat_template:
        return HermesFormat()
    if "[TOOL_CALLS]" in chat_template:
        return MistralFormat()
    if "<|python_tag|>" in chat_template or ("<|start_header_id|>" in chat_template and "parameters" in chat_template):
        return Llama3JsonFormat()
    return None


def select_tools(tools: list[dict[str, Any]], tool_choice: str | dict[str, Any] | None) -> list[dict[str, Any]]:
    """The tools a forced call may use: all for ``required``, the named one for a named choice."""
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        return [t for t in tools if (t.get("function") or {}).get("name") == name]
    return tools
