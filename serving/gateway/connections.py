"""Bounds on what one connection may hold: header and body read timeouts, a connection cap.

uvicorn closes idle keep-alive connections, but not one that trickles a request's headers
a byte at a time, nor one that opens and sends nothing, nor one that stops in the middle of
a body; and its ``limit_concurrency`` is only checked once a request's headers are
complete. `limited_protocol` builds uvicorn's httptools protocol (h11 when httptools is
not installed) with the missing ones added (`serving.config.ServerLimits` holds every
limit). httptools parses a request in C, which is most of the server's cost per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from registry.errors import ErrorCode
from serving.config import ServerLimits
from serving.gateway.errors import error_body

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools comes with uvicorn[standard]; h11 is the fallback
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)

_REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_HEADERS_TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


_OVERLOADED_BODY = json.dumps(
    error_body("The server is handling as many requests as it can; retry shortly.", 503, code=ErrorCode.UNAVAILABLE)
).encode()
_OVERLOADED_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_OVERLOADED_BODY)).encode()),
    (b"retry-after", b"1"),
    (b"connection", b"close"),
]


def http_implementation() -> str:
    """``httptools`` when it is installed (uvicorn[standard]), else ``h11``."""
    return "httptools" if HttpToolsProtocol is not None else "h11"


def limited_protocol(limits: ServerLimits, http: str | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (``http``: ``httptools`` or ``h11``; default: the fastest
    installed) with ``limits``' header/body timeouts, header size and connection cap."""
    base: type[asyncio.Protocol] = _LimitedHttpTools if (http or http_implementation()) == "httptools" else _LimitedH11

    class LimitedProtocol(base):  # type: ignore[valid-type,misc]
        header_timeout_s = limits.header_timeout_s
        body_timeout_s = limits.body_timeout_s
        max_connections = limits.max_connections
        max_header_bytes = limits.max_header_bytes

    return LimitedProtocol


class _LimitedMixin:
    """The timers and caps; mixed into uvicorn's h11 and httptools protocols alike (both
    keep ``cycle``, ``flow``, ``transport``, ``loop`` and ``connections``)."""

    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    max_header_bytes: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn answers requests over its concurrency limit with a plain-text 503; the check
        # is taken over here so that clients get an OpenAI-shaped error body they can parse.
        self._concurrency_cap: int | None = self.limit_concurrency
        self.limit_concurrency = None
        self._asgi_app = self.app
        self.app = self._admit
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._got_bytes = False
        self._header_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            logger.warning("closing a connection: %d open, the limit is %d", len(self.connections), self.max_connections)
            transport.close()
            return
        self._arm_header_timer()  # a connection that never sends a byte is bounded too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        awaiting = self._awaiting_request()
        if awaiting:
            self._got_bytes = True
            # Bytes of the request line and headers so far: up to their blank line, if it is here.
            # Counted before parsing, so neither parser ever holds more (h11's own bound only
            # covers headers that are still incomplete; httptools has none).
            end = data.find(b"\r\n\r\n")
            self._header_bytes += end if end >= 0 else len(data)
            if self._header_bytes > self.max_header_bytes:
                logger.info("closing %s: request headers over %d bytes", self.client, self.max_header_bytes)
                self.transport.write(_HEADERS_TOO_LARGE)
                self.transport.close()
                return
        super().data_received(data)
        if self.cycle is not before:  # the headers of a new request are complete
            self._cancel_header_timer()
            self._got_bytes = False
            self._header_bytes = 0
        elif awaiting and self._header_timer is None and not self.transport.is_closing():
            # Armed only for headers still incomplete after this read: nearly every request's
            # headers arrive whole in one, and a timer made and cancelled per request costs.
            self._arm_header_timer()
        if self.cycle is not None and self.cycle.more_body and not self.cycle.response_complete:
            self._arm_body_timer()  # restarted by every piece of body
        elif self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def on_response_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_response_complete()

    async def _admit(self, scope: Any, receive: Any, send: Any) -> None:
        cap = self._concurrency_cap
        # As uvicorn counts, but from inside the request's own task (already among ``tasks``).
        if scope["type"] == "http" and cap is not None and (len(self.connections) >= cap or len(self.tasks) > cap):
            logger.warning("answering 503: over the concurrency limit of %d", cap)
            await send({"type": "http.response.start", "status": 503, "headers": _OVERLOADED_HEADERS})
            await send({"type": "http.response.body", "body": _OVERLOADED_BODY, "more_body": False})
            return
        cycle = getattr(send, "__self__", None)  # uvicorn's RequestResponseCycle.send
        if getattr(cycle, "transport", None) is None:
            await self._asgi_app(scope, receive, send)
            return
        await self._asgi_app(scope, receive, _one_write_start(cycle, send, self.loop))

    # -- timers ------------------------------------------------------------------------

    def _awaiting_request(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._on_header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _arm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = self.loop.call_later(self.body_timeout_s, self._on_body_timeout)

    def _cancel_timers(self) -> None:
        self._cancel_header_timer()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._awaiting_request():
            return
        if self._got_bytes:
            logger.info("closing %s: request headers incomplete after %.0f s", self.client, self.header_timeout_s)
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()

    def _on_body_timeout(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or not cycle.more_body or cycle.response_complete:
            return
        if self.flow.read_paused:
            self._arm_body_timer()  # the app is not reading yet: the client is not the one stalling
            return
        logger.info("closing %s: no request body data for %.0f s", self.client, self.body_timeout_s)
        self.transport.close()  # the app sees http.disconnect


def _one_write_start(cycle: Any, send: Any, loop: asyncio.AbstractEventLoop) -> Any:
    """``send``, with the status line and headers held back until the body's first bytes.

    uvicorn writes a response's head to the socket at once and its body in a second write:
    two system calls (and, on loopback, two wake-ups of the client) for every answer. Held
    until the body follows, both leave in one write. The head waits for nothing: a body
    sent right after it (a JSON answer, a stream's first event) joins it, and otherwise it
    is written when the event loop next runs.
    """

    async def one_write_send(message: Any) -> None:
        held = cycle.transport
        if message["type"] == "http.response.start" and not isinstance(held, _HeldWrites):
            holding = cycle.transport = _HeldWrites(held)
            loop.call_soon(_release, cycle, holding)
            await send(message)
            return
        if not isinstance(held, _HeldWrites):
            await send(message)
            return
        try:
            await send(message)  # its bytes join the held head
        finally:
            _release(cycle, held)

    return one_write_send


def _release(cycle: Any, holding: _HeldWrites) -> None:
    if cycle.transport is holding:
        cycle.transport = holding.transport
    holding.flush()


class _HeldWrites:
    """A transport that keeps what is written until `flush` (closing flushes first)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._held.append(data)

    def flush(self) -> None:
        if self._held:
            data, self._held = b"".join(self._held), []
            if not self.transport.is_closing():
                self.transport.write(data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _LimitedH11(_LimitedMixin, H11Protocol):
    pass


if HttpToolsProtocol is not None:

    class _LimitedHttpTools(_LimitedMixin, HttpToolsProtocol):
        def on_header(self, name: bytes, value: bytes) -> None:
            # Lowered all at once when the headers are complete: uvicorn lowers each name
            # as it comes, a call per header (a client's request brings ~17).
            self.headers.append((name, value))

        def on_headers_complete(self) -> None:
            headers = self.headers
            if headers:
                # httptools refuses a line break in a header name, so none splits here.
                names = b"\n".join([name for name, _ in headers]).lower().split(b"\n")
                headers[:] = zip(names, [value for _, value in headers], strict=True)  # the scope's own list
                if b"expect" in names:
                    self.expect_100_continue = any(n == b"expect" and v.lower() == b"100-continue" for n, v in headers)
            super().on_headers_complete()

else:  # pragma: no cover - without httptools every server uses h11
    _LimitedHttpTools = _LimitedH11  # type: ignore[misc,assignment]
