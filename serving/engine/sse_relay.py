"""A worker's server-sent events relayed as bytes, parsed only where the gateway needs to.

A streamed answer is one event per token. Parsing each event and serialising it again,
and writing each to the client on its own, made the streamed relay the gateway's most
expensive path. Here the worker's stream is cut into blocks of whole events, a block
being everything one socket read delivered (so events that arrived together leave in
one write, and none waits for a later one), and each block is examined with byte
searches that run in C: the end marker, in-band errors (only events that mention
``"error"`` are parsed) and the usage event (the only event always parsed). The model
name is rewritten by a byte substitution.

A JSON string cannot hold an unescaped quote, so a pattern that begins with a quoted
key (``"model":``, ``"usage":``) matches only keys, never text a model generated.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any

_DONE = re.compile(rb"data: ?\[DONE\][ \t]*\n\n")
_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_MODEL = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')
# An event with output: non-empty text (``content``, ``reasoning_content``: a key that ends in
# content; begun with a literal, the pattern is searched for fast) or a tool call.
_TEXT = re.compile(rb'content"\s*:\s*"[^"]')
_TOOL_CALLS = re.compile(rb'"tool_calls"\s*:\s*\[')


class WorkerEventError(Exception):
    """The worker reported an error in-band, after it had answered 200.

    Attributes:
        payload: the error event's JSON text.
    """

    def __init__(self, payload: str) -> None:
        super().__init__(payload)
        self.payload = payload


@dataclass(slots=True)
class SseBlock:
    """Whole SSE events as the client gets them (``data: [DONE]`` taken out).

    Attributes:
        data: the events' bytes; empty when the block held only what was taken out.
        usage: the ``usage`` object of an event in the block that carried one, else None.
        done: the worker's ``data: [DONE]`` was in the block.
    """

    data: bytes
    usage: dict[str, Any] | None = None
    done: bool = False

    def payloads(self) -> list[bytes]:
        """Each event's ``data`` (for a caller that needs the events parsed)."""
        return [p for event in self.data.split(b"\n\n") if (p := _payload(event))]

    def outputs(self) -> int:
        """How many events in the block carry output (text, reasoning or a tool call)."""
        data = self.data
        return len(_TEXT.findall(data)) + (len(_TOOL_CALLS.findall(data)) if b'"tool_calls"' in data else 0)


class SseSplitter:
    """Cuts a byte stream into runs of whole events; keeps a partial event for the next piece."""

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, data: bytes) -> bytes:
        """The whole events completed by ``data`` (``b""`` while the first is still partial)."""
        buf = self._tail + data if self._tail else data
        if b"\r" in buf:  # SSE allows CRLF; a CR at the end waits for its LF
            buf = buf.replace(b"\r\n", b"\n")
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self._tail = buf
            return b""
        self._tail = buf[cut + 2 :]
        return buf[: cut + 2]

    def rest(self) -> bytes:
        """A last event the stream ended without a blank line after, made whole; else ``b""``."""
        tail, self._tail = self._tail.strip(), b""
        return tail + b"\n\n" if tail else b""


async def whole_events(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Runs of whole events from a byte stream, one per piece that completes any; a last
    event the stream ended without a blank line after comes made whole."""
    splitter = SseSplitter()
    async for data in chunks:
        if whole := splitter.feed(data):
            yield whole
    if rest := splitter.rest():
        yield rest


def inspect(data: bytes, *, keep_usage: bool) -> SseBlock:
    """Examine whole events from a worker.

    Only the events that need it are looked at: the end marker, events that mention
    ``"error"`` and those that carry ``"usage"`` (the last one or two of a stream) are found
    by byte searches and cut out or parsed where they are; the other events are not split apart.

    Args:
        data: whole events (see `SseSplitter`).
        keep_usage: leave a usage-only event (``choices: []``) in the block; False when the
            gateway asked for usage for its own accounting and the client did not.

    Raises:
        WorkerEventError: an event is an error report.
    """
    done = False
    at = data.rfind(b"[DONE]")  # from the end: where the marker is, when a block has it
    if at >= 0:
        data, done = _without_done(data, at)
    if b'"error"' in data:
        for payload in SseBlock(data).payloads():
            if b'"error"' in payload and _is_error(payload):
                raise WorkerEventError(payload.decode(errors="replace"))
    usage: dict[str, Any] | None = None
    at = data.rfind(b'"usage"')
    if at >= 0:
        # From the last event back: the last usage is the one that counts.
        kept: list[bytes] = []  # pieces kept after `upto`, last first
        upto = len(data)
        while at >= 0:
            start, end = _event_around(data, at, at)
            if _USAGE.match(data, at):
                parsed = json.loads(_payload(data[start:end]))
                usage = usage or parsed.get("usage") or None
                if not keep_usage and not parsed.get("choices"):
                    if end < upto:
                        kept.append(data[end:upto])
                    upto = start
            at = data.rfind(b'"usage"', 0, start)
        if upto < len(data) or kept:
            data = b"".join([data[:upto], *reversed(kept)]) if kept else data[:upto]
    return SseBlock(data, usage, done)


def _event_around(data: bytes, start: int, end: int) -> tuple[int, int]:
    """The bounds of the whole event (its blank line included) that holds ``data[start:end]``."""
    before = data.rfind(b"\n\n", 0, start)
    after = data.find(b"\n\n", end)
    return (0 if before < 0 else before + 2), (len(data) if after < 0 else after + 2)


def _without_done(data: bytes, at: int) -> tuple[bytes, bool]:
    """``data`` without its ``data: [DONE]`` event, and whether it had one (``at``: the last ``[DONE]``)."""
    # The marker ends a stream: the block's last event, cut off without looking at the rest.
    start, _ = _event_around(data, at, at)
    last = _DONE.match(data, start)
    if last is not None and last.end() == len(data):
        return data[:start], True
    data, found = _DONE.subn(b"", data)  # anywhere else, or "[DONE]" in a model's text
    return data, found > 0


def rename_model(data: bytes, model: bytes) -> bytes:
    """``data`` with every event's ``model`` set to ``model`` (a JSON string, quoted)."""
    return _MODEL.sub(b'"model":' + model.replace(b"\\", b"\\\\"), data)


def _payload(event: bytes) -> bytes:
    # An event's data lines, joined (SSE allows several); comments and other fields are not data.
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if len(lines) != 1 else lines[0]


def _is_error(payload: bytes) -> bool:
    try:
        parsed = json.loads(payload)
    except ValueError:
        return False
    return isinstance(parsed, dict) and bool(parsed.get("error"))
