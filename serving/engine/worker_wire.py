"""HTTP/1.1 to workers on the event loop's own transports, answers parsed by httptools: the gateway's client.

aiohttp does all this and more; the gateway's calls need little of it. Each is one POST of a
JSON body to a worker on a kept-alive connection, answered by one JSON body or one SSE stream,
and in the fourth pass's profile (c1 unary) aiohttp's request machinery around those bytes
(request and response objects, timeout context managers, tracing signals, the connector's
bookkeeping) was about a quarter of the gateway's own time. Here a request's bytes are built
once (a header block per worker origin, the request's own headers, Content-Length, the body)
and written in one call; the answer is parsed in C by httptools (uvicorn's parser, already a
dependency) and its body handed over in the pieces it arrives in. Measured against
`AiohttpWorkerClient` in the same runs (load average 3-5 on 2 cores; BENCHMARKS.md §1, fifth
pass): the client alone (`bench.gateway_ab --clients`, sequential requests to the fake worker)
spends 0.044 ms of CPU per unary request instead of 0.139 and 0.17 per 16-token stream instead
of 0.29; the whole gateway (`bench.gateway_ab`, c1 and c16) 0.70-0.78x the CPU per request,
every paired round below 1.

Not done, because workers need none of it: redirects, cookies, compression (no
Accept-Encoding is sent), proxies, HTTP/2, request bodies streamed, ``Expect: 100-continue``.
The four `WorkerError` kinds mean what they mean for the aiohttp client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import httptools

from serving.engine.worker_http import (
    KEEPALIVE_S,
    Answer,
    WorkerBrokenError,
    WorkerError,
    WorkerRefusedError,
    WorkerTimeoutError,
)

HIGH_WATER = 4 * 1024 * 1024
"""Bytes of a streamed answer held for a slow reader before reading from the worker pauses."""


class _ClosedEarly(WorkerBrokenError):
    """The worker closed the connection before any byte of its answer (retried once on a reused one)."""


class _Conn(asyncio.Protocol):
    """One connection to a worker: one exchange at a time, its answer parsed as it arrives."""

    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self.loop = origin.loop
        self.transport: Any = None
        # httptools takes its callbacks from the protocol once, when the parser is made: body
        # pieces go straight into the one buffer this connection keeps (emptied in place,
        # never replaced), with no Python call of ours per piece (`data_received` counts them).
        self.buffer: list[bytes] = []
        self.on_body: Callable[[bytes], None] = self.buffer.append
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.active = False  # an exchange is under way
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.waiter: asyncio.Future[None] | None = None
        self._begin(0.0)

    def _begin(self, timeout: float) -> None:
        self.status = 0
        self.headers_done = self.complete = self.framed = self.got_bytes = self.keep_alive = self.paused = False
        self.error: WorkerError | None = None
        self.buffer.clear()
        self.buffered = 0
        self.limit: float = HIGH_WATER
        self.timeout = timeout

    def send(self, data: bytes, timeout: float) -> None:
        """Write a request; ``timeout``: the longest wait for any byte of its answer."""
        self._begin(timeout)
        self.active = True
        self.last_read = now = self.loop.time()
        self.timer = self.loop.call_at(now + timeout, self._on_timer)
        self.transport.write(data)

    def release(self) -> None:
        """End the exchange: back to the pool when the answer was whole and the worker keeps the connection."""
        self.active = False
        self._stop_timer()
        if self.paused and not self.closed:  # the rest of the answer came in the read that paused it
            self.paused = False
            self.transport.resume_reading()
        if self.complete and self.keep_alive and self.error is None and not self.closed and not self.transport.is_closing():
            self.origin.put(self)
        else:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # the worker sees the disconnect (a client that left ends its request there)

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.origin.open.add(self)

    def data_received(self, data: bytes) -> None:
        if not self.active:  # the worker spoke out of turn: the connection's state is unknown
            self.close()
            return
        self.got_bytes = True
        self.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(WorkerBrokenError(f"the worker's answer is malformed: {type(exc).__name__}: {exc}"))
            self.close()
            return
        if self.buffer:
            # Counted and woken once per read, not per chunk: a streamed answer's read brings
            # one HTTP chunk per event, ~20 for 16 tokens (framing bytes count here too).
            self.buffered += len(data)
            if self.buffered > self.limit and not self.paused:
                self.paused = True
                self.transport.pause_reading()
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.origin.lost(self)
        if self.active and not self.complete:
            if self.headers_done and not self.framed:  # a body that ends with the connection
                self.on_message_complete()
            else:
                why = f"{type(exc).__name__}: {exc}" if exc else "the worker closed the connection"
                self._fail(_ClosedEarly(why) if not self.got_bytes else WorkerBrokenError(f"{why} mid-answer"))
        self._stop_timer()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, _value: bytes) -> None:
        if not self.framed:
            name = name.lower()
            self.framed = name == b"content-length" or name == b"transfer-encoding"

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._stop_timer()
        self._wake()

    # -- waiting -----------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: WorkerError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    async def wait_for(self, whole: bool) -> None:
        """Until the answer's headers (or all of it) are in; raises the exchange's error."""
        while not (self.complete if whole else self.headers_done):
            if self.error is not None:
                raise self.error
            await self.woken()

    async def woken(self) -> None:
        """Until the parser, the timer or the connection's end has news for this exchange (`_wake`)."""
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def take(self) -> bytes:
        """The body bytes that arrived since the last call (resumes reading when paused)."""
        buffer = self.buffer
        data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        self.buffered = 0
        if self.paused:
            self.paused = False
            self.last_read = self.loop.time()
            self.transport.resume_reading()
        return data

    def _on_timer(self) -> None:
        # One timer per exchange, moved on lazily: reads only note their time.
        self.timer = None
        now = self.loop.time()
        due = self.last_read + self.timeout
        if self.paused or due > now:  # bytes came meanwhile, or our reader holds them back
            self.timer = self.loop.call_at(now + self.timeout if self.paused else due, self._on_timer)
            return
        self._fail(WorkerTimeoutError(f"the worker sent nothing for {self.timeout:g} s"))
        self.close()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Origin:
    """A worker's scheme, host and port: its header block and its idle connections (most recent last)."""

    def __init__(self, scheme: str, host: str, port: int, netloc: str, headers: bytes, connect_timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.host, self.port, self.tls = host, port, scheme == "https"
        self.block = b"Host: " + netloc.encode("idna") + b"\r\nUser-Agent: forgeline-gateway\r\n" + headers
        self.connect_timeout = connect_timeout
        self.idle: list[_Conn] = []
        self.open: set[_Conn] = set()
        self.sweeper: asyncio.TimerHandle | None = None

    async def connect(self) -> _Conn:
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self.loop.create_connection(lambda: _Conn(self), self.host, self.port, ssl=self.tls or None)
        except TimeoutError as exc:
            raise WorkerTimeoutError(f"no connection to {self.host}:{self.port} within {self.connect_timeout:g} s") from exc
        except OSError as exc:
            raise WorkerRefusedError(f"{type(exc).__name__}: {exc}") from exc
        return conn

    def take(self) -> _Conn | None:
        """An idle connection still open and younger than `KEEPALIVE_S`, or None."""
        now = self.loop.time()
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and not conn.transport.is_closing() and now - conn.idle_since < KEEPALIVE_S:
                return conn
            conn.close()
        return None

    def put(self, conn: _Conn) -> None:
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        if self.sweeper is None:
            self.sweeper = self.loop.call_at(conn.idle_since + KEEPALIVE_S, self._sweep)

    def lost(self, conn: _Conn) -> None:
        self.open.discard(conn)
        if conn in self.idle:  # the worker closed it while idle: never handed out again
            self.idle.remove(conn)

    def _sweep(self) -> None:
        # Idle connections go before uvicorn-based workers (5 s) close theirs.
        self.sweeper = None
        now = self.loop.time()
        while self.idle and now - self.idle[0].idle_since >= KEEPALIVE_S:
            self.idle.pop(0).close()
        if self.idle:
            self.sweeper = self.loop.call_at(self.idle[0].idle_since + KEEPALIVE_S, self._sweep)

    def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
        for conn in list(self.open):
            conn.close()  # in-flight exchanges end with WorkerBrokenError


class WireWorkerClient:
    """A `WorkerClient`: keep-alive connections without a cap, per worker origin."""

    def __init__(self, *, headers: dict[str, str], connect_timeout: float, read_timeout: float) -> None:
        self._headers = _header_lines(headers)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._origins: dict[tuple[str, str, int], _Origin] = {}
        self._targets: dict[str, tuple[_Origin, bytes]] = {}
        self._closed = False

    def _target(self, url: str) -> tuple[_Origin, bytes]:
        target = self._targets.get(url)
        if target is None:
            if self._closed:
                raise WorkerError("the client to the workers is closed")
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise WorkerError(f"not an http(s) URL of a worker: {url!r}")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            key = (parts.scheme, parts.hostname, port)
            origin = self._origins.get(key)
            if origin is None:
                netloc = parts.netloc.rpartition("@")[2]
                origin = self._origins[key] = _Origin(parts.scheme, parts.hostname, port, netloc, self._headers, self._connect_timeout)
            if len(self._targets) > 4096:  # workers come and go under discovery
                self._targets.clear()
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            target = self._targets[url] = (origin, path.encode("ascii"))
        return target

    async def _exchange(self, origin: _Origin, request: bytes, timeout: float, *, whole: bool) -> _Conn:
        """A connection with ``request`` sent and its answer's headers (or all of it) in; the caller releases it."""
        conn = origin.take()
        fresh = conn is None
        if conn is None:
            conn = await origin.connect()
        while True:
            conn.send(request, timeout)
            try:
                await conn.wait_for(whole)
                return conn
            except _ClosedEarly:
                conn.release()
                if fresh:
                    raise
                # The worker closed a kept-alive connection as we reused it: it saw no request.
                conn, fresh = await origin.connect(), True
            except BaseException:
                conn.release()  # a client that left: closing the connection tells the worker
                raise

    async def get(self, url: str, *, timeout: float) -> Answer:
        origin, path = self._target(url)
        try:
            async with asyncio.timeout(timeout):
                conn = await self._exchange(origin, b"GET " + path + b" HTTP/1.1\r\n" + origin.block + b"\r\n", timeout, whole=True)
        except TimeoutError as exc:
            raise WorkerTimeoutError(f"no whole answer within {timeout:g} s") from exc
        try:
            return Answer(conn.status, conn.take())
        finally:
            conn.release()

    async def post_json(self, url: str, body: dict[str, Any], headers: dict[str, str] | None, *, timeout: float) -> Answer:
        origin, path = self._target(url)
        conn = await self._exchange(origin, _post(origin, path, body, headers), timeout, whole=True)
        try:
            return Answer(conn.status, conn.take())
        finally:
            conn.release()

    def stream(self, url: str, body: dict[str, Any], headers: dict[str, str] | None) -> _Streamed:
        """An async context manager giving a `StreamedAnswer` (the read timeout bounds each wait for bytes)."""
        origin, path = self._target(url)
        return _Streamed(self, origin, _post(origin, path, body, headers))

    async def aclose(self) -> None:
        self._closed = True
        for origin in self._origins.values():
            origin.close()
        self._origins.clear()
        self._targets.clear()


class _Streamed:
    """The answer of one streamed request, as an async context manager."""

    status: int

    def __init__(self, client: WireWorkerClient, origin: _Origin, request: bytes) -> None:
        self._client, self._origin, self._request = client, origin, request

    async def __aenter__(self) -> _Streamed:
        self._conn = await self._client._exchange(self._origin, self._request, self._client._read_timeout, whole=False)
        self.status = self._conn.status
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._conn.release()  # not read to the end (the client left, an error): closed, and the worker sees it

    async def read(self) -> bytes:
        conn = self._conn
        conn.limit = float("inf")  # the whole body is wanted: no point pausing
        pieces = [conn.take()]
        await conn.wait_for(whole=True)
        pieces.append(conn.take())
        return b"".join(pieces)

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.buffer:
                yield conn.take()
            elif conn.complete:
                return
            elif conn.error is not None:
                raise conn.error
            else:
                await conn.woken()


def _header_lines(headers: dict[str, str]) -> bytes:
    text = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    if text.count("\n") != len(headers) or text.count("\r") != len(headers):
        raise WorkerError("a header for the worker holds a line break")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise WorkerError(f"a header for the worker is not latin-1: {exc}") from exc


_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
"""``json.dumps`` with these options builds an encoder per call; this one is built once."""


def _post(origin: _Origin, path: bytes, body: dict[str, Any], headers: dict[str, str] | None) -> bytes:
    data = _COMPACT.encode(body).encode()
    extra = _header_lines(headers) if headers else b""
    length = b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data)
    return b"".join((b"POST ", path, b" HTTP/1.1\r\n", origin.block, extra, length, data))
