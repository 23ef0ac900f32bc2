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

Calls are read incrementally (`ToolFormat.partial_calls`): in the usual key order (name first)
a call is known from its name on and its arguments are the generated text itself, growing
token by token, so a stream can send them as they come and a unary answer carries the same text.

A format also gives the llguidance grammar that forces a call (``tool_choice`` ``required``
or a named function), with each function's arguments constrained to its JSON schema, and the
one for ``strict`` tools under ``auto`` (free text that does not start a call, or valid calls).
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


def new_call_id() -> str:
    """A fresh OpenAI-style call id."""
    return f"call_{uuid.uuid4().hex[:24]}"


def new_call(name: str, arguments: Any) -> ToolCall:
    """A call with a fresh OpenAI-style id; ``arguments`` as an object or its JSON text."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=new_call_id(), name=name, arguments=text)


@dataclass(frozen=True)
class PartialCall:
    """A call as generated so far: its name, its arguments' JSON text so far, whether it is whole.

    ``arguments`` only grows while the call is generated, so a stream can send the new part
    of it after each token; ``complete`` once the arguments are a closed, valid JSON object
    and the format's closing (if any) is there.
    """

    name: str
    arguments: str
    complete: bool


# `{"name": "f", "arguments": {` — the key order every template we know renders calls in (and
# our grammars force): the name is known before the arguments, which then stream as they come.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')
_CLOSE_BRACE = re.compile(r"\s*\}")
_DECODER = json.JSONDecoder()


def _object_end(text: str, pos: int) -> int | None:
    """Where the JSON object opening at ``text[pos]`` ends (after its ``}``), or None if still open."""
    depth, in_string, escaped = 0, False, False
    for i in range(pos, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _whole_call(obj: Any) -> PartialCall | None:
    """A call from a decoded ``{"name", "arguments" | "parameters"}`` object (arguments re-encoded)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return PartialCall(obj["name"], json.dumps(arguments, ensure_ascii=False), True)


def _args_call(name: str, text: str, pos: int) -> tuple[PartialCall, int | None]:
    """The call named ``name`` whose arguments object opens at ``text[pos]``; the end of the arguments."""
    end = _object_end(text, pos)
    if end is None:
        return PartialCall(name, text[pos:], False), None
    arguments = text[pos:end]
    return PartialCall(name, arguments, _is_object(arguments)), end


def _scan_object(text: str, pos: int) -> tuple[PartialCall | None, int | None]:
    """The call object starting at ``pos`` (after whitespace) as generated so far, and where it ends.

    In the usual key order (``_HEAD``) the call is known from its name on and its arguments are
    the generated text itself; in any other shape it is known only once the object is whole.
    """
    head = _HEAD.match(text, pos)
    if head is not None:
        call, end = _args_call(json.loads(f'"{head.group(1)}"'), text, head.end())
        close = _CLOSE_BRACE.match(text, end) if end is not None else None
        if close is None:
            return PartialCall(call.name, call.arguments, False), None
        return call, close.end()
    at = len(text) - len(text[pos:].lstrip())
    try:
        obj, end = _DECODER.raw_decode(text, at)
    except ValueError:
        return None, None
    return _whole_call(obj), end


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


def _whole_calls(calls: list[PartialCall]) -> list[ToolCall]:
    """The complete ones of ``calls``, each with a fresh id."""
    return [ToolCall(new_call_id(), c.name, c.arguments) for c in calls if c.complete]


def _separated_calls(text: str, pos: int, separator: str) -> tuple[list[PartialCall], int | None]:
    """Call objects from ``pos`` on, separated by ``separator`` (Llama-3 ``;``, a Mistral list's
    ``,``), and where they end when they are complete and only whitespace follows (else None)."""
    calls: list[PartialCall] = []
    while True:
        call, end = _scan_object(text, pos)
        if call is None:
            return calls, None
        calls.append(call)
        if end is None or not call.complete:
            return calls, None
        rest = text[end:].lstrip()
        if not rest:
            return calls, end
        if not rest.startswith(separator):
            return calls, None
        pos = len(text) - len(rest) + 1


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

    def partial_calls(self, region: str) -> list[PartialCall]:
        """The calls in ``region`` (from `start` on) as generated so far, in order (see `PartialCall`)."""
        raise NotImplementedError

    def complete_calls(self, region: str) -> list[ToolCall]:
        """The whole calls in ``region`` (a finished answer from `start` on)."""
        return _whole_calls(self.partial_calls(region))

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
        calls = self.complete_calls(text[at:])
        if not calls:
            return text, []
        content = text[:at].strip()
        return content or None, calls


class HermesFormat(ToolFormat):
    """``<tool_call>{json}</tool_call>`` blocks."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def start(self, text: str) -> int | None:
        at = text.find(self.OPEN)
        return None if at < 0 else at

    def holdback(self, text: str) -> int:
        for size in range(min(len(self.OPEN) - 1, len(text)), 0, -1):
            if self.OPEN.startswith(text[-size:]):
                return size
        return 0

    def partial_calls(self, region: str) -> list[PartialCall]:
        calls: list[PartialCall] = []
        pos = 0
        while (at := region.find(self.OPEN, pos)) >= 0:
            call, end = _scan_object(region, at + len(self.OPEN))
            close = region.find(self.CLOSE, end if end is not None else at)
            if call is not None:
                closed = end is not None and region[end:close].strip() == "" and close >= 0
                calls.append(PartialCall(call.name, call.arguments, call.complete and closed))
            if close < 0 or (call is not None and not calls[-1].complete):
                break  # still being generated (or broken: nothing after it counts)
            pos = close + len(self.CLOSE)
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

    def partial_calls(self, region: str) -> list[PartialCall]:
        return _separated_calls(region.lstrip().removeprefix(self.TAG), 0, ";")[0]

    def complete_calls(self, region: str) -> list[ToolCall]:
        # The whole answer is the calls: any other text after them means it was not a call after all.
        body = region.lstrip().removeprefix(self.TAG)
        calls, end = _separated_calls(body, 0, ";")
        if end is None:
            return []
        return _whole_calls(calls)

    def grammar(self, tools: list[dict[str, Any]], *, parallel: bool) -> str:
        call = _one_of_calls(tools, "parameters")
        more = ' ("; " call)*' if parallel else ""
        return f"start: call{more}\ncall: {call}"

    def auto_grammar(self, tools: list[dict[str, Any]], *, parallel: bool) -> str | None:
        # Text that does not start as a call does (`{` or the python tag), or the calls alone.
        return (
            f"{self.grammar(tools, parallel=parallel).replace('start: call', 'calls: call', 1)}\n"
            "start: TEXT | calls\n"
            r"TEXT: /(?s:.+)/ & ~/(?s:\s*(\{|<\|python_tag\|>).*)/"
        )


class MistralFormat(ToolFormat):
    """``[TOOL_CALLS][{"name", "arguments"}, ...]`` or ``[TOOL_CALLS]name[ARGS]{...}``."""

    name = "mistral"
    TAG = "[TOOL_CALLS]"
    _NAMED = re.compile(r"\s*(?:\[TOOL_CALLS\])?\s*([A-Za-z0-9_.-]+)\[ARGS\](?=\s*\{)")

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

    def partial_calls(self, region: str) -> list[PartialCall]:
        body = region.lstrip().removeprefix(self.TAG).lstrip()
        if body.startswith("["):
            return _separated_calls(body, 1, ",")[0]
        calls: list[PartialCall] = []
        pos = 0
        while (named := self._NAMED.match(body, pos)) is not None:
            call, end = _args_call(named.group(1), body, named.end())
            calls.append(call)
            if end is None or not call.complete:
                break
            pos = end
        return calls

    def complete_calls(self, region: str) -> list[ToolCall]:
        calls = self.partial_calls(region)
        return _whole_calls(calls) if calls and all(c.complete for c in calls) else []

    def grammar(self, tools: list[dict[str, Any]], *, parallel: bool) -> str:
        schemas = [_function_schema(t, "arguments") for t in tools]
        item = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        array: dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
        if not parallel:
            array["maxItems"] = 1
        return f'start: "{self.TAG}" {_json_rule(array)}'

    def auto_grammar(self, tools: list[dict[str, Any]], *, parallel: bool) -> str | None:
        # Text that neither holds the tag nor starts as a list of calls, or the tag and the calls.
        calls = self.grammar(tools, parallel=parallel).removeprefix("start: ")
        return f"start: TEXT | {calls}\n" r"TEXT: /(?s:.+)/ & ~/(?s:(\s*\[\{|.*\[TOOL_CALLS\]).*)/"


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
