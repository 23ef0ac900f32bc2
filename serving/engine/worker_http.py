"""HTTP to upstream workers: one small client seam, so the pool's logic does not depend on a library.

The gateway uses `serving.engine.worker_wire.WireWorkerClient` (HTTP/1.1 on the loop's own
transports, httptools; why a client of our own: its docstring). `AiohttpWorkerClient` was
the gateway's before it and is kept as the reference the wire client's contract tests run
against too: measured against httpx on this path (sequential requests to a fake worker on
loopback, uvloop), it spent 0.1 ms of CPU per unary request instead of 0.57, and 0.23 per
16-token stream instead of 0.87.
`HttpxWorkerClient` takes an httpx transport, so unit tests can script workers with
``httpx.MockTransport``. Both raise the same four errors, which say what the failure means
for routing: the connection was refused (the worker is gone; nothing was sent), broke
mid-answer, timed out, or something else went wrong on the wire.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

KEEPALIVE_S = 4.0
"""Seconds an idle connection to a worker is kept for reuse."""


class WorkerError(Exception):
    """A request to a worker failed below HTTP (no status to go by)."""


class WorkerRefusedError(WorkerError):
    """The connection could not be made: the request reached no worker."""


class WorkerBrokenError(WorkerError):
    """The connection broke or the worker's answer was malformed mid-response."""


class WorkerTimeoutError(WorkerError):
    """The worker sent nothing for the read timeout (or did not accept the connection in time)."""


@dataclass
class Answer:
    """A whole response."""

    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class StreamedAnswer(Protocol):
    """A response being read: its status, then its body whole or in the pieces it arrives in."""

    status: int

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body in the pieces it arrives in (no waiting to fill a buffer)."""
        ...


class WorkerClient(Protocol):
    """What `UpstreamEngine` needs of an HTTP client."""

    async def get(self, url: str, *, timeout: float) -> Answer: ...

    async def post_json(self, url: str, body: dict[str, Any], headers: dict[str, str] | None, *, timeout: float) -> Answer:
        """POST and read the whole answer; ``timeout``: the longest wait for any byte of it."""
        ...

    def stream(self, url: str, body: dict[str, Any], headers: dict[str, str] | None) -> Any:
        """An async context manager giving a `StreamedAnswer`."""
        ...

    async def aclose(self) -> None: ...


class AiohttpWorkerClient:
    """Workers over aiohttp: keep-alive connections without a cap (a pool of workers, each
    with as many requests in flight as it batches), reused across requests."""

    def __init__(self, *, headers: dict[str, str], connect_timeout: float, read_timeout: float) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout)
        # limit=0: no cap on connections (as httpx's max_connections=None); every worker keeps its own.
        # Idle ones are dropped after 4 s, before uvicorn-based workers (vLLM, trtllm-serve, ours)
        # close theirs at 5 s: reusing one the worker is closing would fail a request and eject it.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=KEEPALIVE_S)
        self._session = aiohttp.ClientSession(
            connector=connector, headers=headers, timeout=self._timeout, json_serialize=_dumps,
            cookie_jar=aiohttp.DummyCookieJar(),  # workers set no cookies worth keeping; a jar costs every request
            read_bufsize=4 * 1024 * 1024,  # one SSE line (an event) may be long: tool calls, logprobs
        )

    def _mapped(self, exc: BaseException) -> WorkerError:
        aiohttp = self._aiohttp
        if isinstance(exc, aiohttp.ClientConnectorError):
            return WorkerRefusedError(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
            return WorkerTimeoutError(f"{type(exc).__name__}: {exc}")
        # ClientResponseError: the answer did not parse (nothing here calls raise_for_status).
        broken = (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError, aiohttp.ClientResponseError)
        if isinstance(exc, broken):
            return WorkerBrokenError(f"{type(exc).__name__}: {exc}")
        return WorkerError(f"{type(exc).__name__}: {exc}")

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (self._aiohttp.ClientError, asyncio.TimeoutError)

    async def get(self, url: str, *, timeout: float) -> Answer:
        try:
            async with self._session.get(url, timeout=self._aiohttp.ClientTimeout(total=timeout)) as response:
                return Answer(response.status, await response.read())
        except self._errors() as exc:
            raise self._mapped(exc) from exc

    async def post_json(self, url: str, body: dict[str, Any], headers: dict[str, str] | None, *, timeout: float) -> Answer:
        wait = self._aiohttp.ClientTimeout(total=None, connect=self._timeout.connect, sock_read=timeout)
        try:
            async with self._session.post(url, json=body, headers=headers, timeout=wait) as response:
                return Answer(response.status, await response.read())
        except self._errors() as exc:
            raise self._mapped(exc) from exc

    @asynccontextmanager
    async def stream(self, url: str, body: dict[str, Any], headers: dict[str, str] | None) -> AsyncIterator[StreamedAnswer]:
        try:
            async with self._session.post(url, json=body, headers=headers) as response:
                yield _AiohttpStream(response, self)
        except self._errors() as exc:
            raise self._mapped(exc) from exc

    async def aclose(self) -> None:
        await self._session.close()


class _AiohttpStream:
    def __init__(self, response: Any, client: AiohttpWorkerClient) -> None:
        self._response = response
        self._client = client
        self.status: int = response.status

    async def read(self) -> bytes:
        return bytes(await self._response.read())

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for data in self._response.content.iter_any():
                yield data
        except self._client._errors() as exc:
            raise self._client._mapped(exc) from exc


class HttpxWorkerClient:
    """Workers over httpx, through a given transport (tests script workers with ``httpx.MockTransport``)."""

    def __init__(self, *, headers: dict[str, str], connect_timeout: float, read_timeout: float, transport: Any = None) -> None:
        import httpx

        self._httpx = httpx
        timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=30.0, pool=connect_timeout)
        self._client = httpx.AsyncClient(timeout=timeout, headers=headers, transport=transport, limits=httpx.Limits(max_connections=None))

    def _mapped(self, exc: BaseException) -> WorkerError:
        httpx = self._httpx
        if isinstance(exc, httpx.ConnectError):
            return WorkerRefusedError(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, httpx.TimeoutException):
            return WorkerTimeoutError(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, httpx.RemoteProtocolError):
            return WorkerBrokenError(f"{type(exc).__name__}: {exc}")
        return WorkerError(f"{type(exc).__name__}: {exc}")

    async def get(self, url: str, *, timeout: float) -> Answer:
        try:
            response = await self._client.get(url, timeout=timeout)
        except self._httpx.HTTPError as exc:
            raise self._mapped(exc) from exc
        return Answer(response.status_code, response.content)

    async def post_json(self, url: str, body: dict[str, Any], headers: dict[str, str] | None, *, timeout: float) -> Answer:
        wait = self._httpx.Timeout(connect=self._client.timeout.connect, read=timeout, write=30.0, pool=self._client.timeout.pool)
        try:
            response = await self._client.post(url, json=body, headers=headers, timeout=wait)
        except self._httpx.HTTPError as exc:
            raise self._mapped(exc) from exc
        return Answer(response.status_code, response.content)

    @asynccontextmanager
    async def stream(self, url: str, body: dict[str, Any], headers: dict[str, str] | None) -> AsyncIterator[StreamedAnswer]:
        try:
            async with self._client.stream("POST", url, json=body, headers=headers) as response:
                yield _HttpxStream(response, self)
        except self._httpx.HTTPError as exc:
            raise self._mapped(exc) from exc

    async def aclose(self) -> None:
        await self._client.aclose()


class _HttpxStream:
    def __init__(self, response: Any, client: HttpxWorkerClient) -> None:
        self._response = response
        self._client = client
        self.status: int = response.status_code

    async def read(self) -> bytes:
        return bytes(await self._response.aread())

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for data in self._response.aiter_bytes():
                yield data
        except self._client._httpx.HTTPError as exc:
            raise self._client._mapped(exc) from exc


def _dumps(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
