"""The clients to workers, one contract for both (aiohttp's and the gateway's own), against real servers on loopback.

A uvicorn worker (`bench.fake_upstream`) for the ordinary answers; a raw asyncio server, scripted
per request, for what a well-behaved worker never does on purpose: close mid-answer, answer
garbage, stall, close a kept-alive connection just as it is reused.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import uvloop

from bench.fake_upstream import create_app as fake_worker
from serving.engine.worker_http import (
    KEEPALIVE_S,
    AiohttpWorkerClient,
    WorkerBrokenError,
    WorkerRefusedError,
    WorkerTimeoutError,
)
from serving.engine.worker_wire import HIGH_WATER, WireWorkerClient
from serving.gateway.server import serve_in_background

pytestmark = pytest.mark.integration

CLIENTS = {"aiohttp": AiohttpWorkerClient, "wire": WireWorkerClient}
BODY = {"model": "fake", "prompt": "x", "max_tokens": 2}
Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


@pytest.fixture(params=sorted(CLIENTS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def uvicorn_worker() -> Iterator[str]:
    url, stop = serve_in_background(fake_worker(tokens=4, token_delay_s=0.02))
    yield url
    stop()


def _run(kind: str, main: Callable[[Any], Awaitable[Any]], *, read_timeout: float = 30.0) -> Any:
    """``main(client)`` on uvloop (the gateway's loop), the client closed afterwards."""

    async def go() -> Any:
        client = CLIENTS[kind](headers={"Authorization": "Bearer k"}, connect_timeout=5, read_timeout=read_timeout)
        try:
            async with asyncio.timeout(20):
                return await main(client)
        finally:
            await client.aclose()

    return uvloop.run(go())


class RawWorker:
    """An HTTP/1.1 server on a raw asyncio socket; ``answer(reader, writer, n)`` answers the n-th request
    (counted over all connections) and says whether to keep the connection."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.url = ""

    async def __aenter__(self) -> RawWorker:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
                self.requests.append(head + await reader.readexactly(length))
                if not await self.answer(reader, writer, len(self.requests)):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed the connection
        finally:
            writer.close()


def _json(payload: dict[str, Any], extra: bytes = b"") -> bytes:
    body = json.dumps(payload).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def _chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


async def _ok(_r: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
    writer.write(_json({"n": n}))
    return True


# -- ordinary answers (uvicorn) ------------------------------------------------------------


def test_unary_and_streamed_answers_from_a_uvicorn_worker(kind: str, uvicorn_worker: str) -> None:
    async def main(client: Any) -> None:
        answer = await client.post_json(f"{uvicorn_worker}/v1/completions", BODY, {"x-request-id": "r1"}, timeout=30)
        assert answer.status == 200 and answer.json()["choices"][0]["text"] == " tok tok"
        assert (await client.get(f"{uvicorn_worker}/health", timeout=5)).status == 200
        assert (await client.get(f"{uvicorn_worker}/nowhere", timeout=5)).status == 404
        seen = (await client.get(f"{uvicorn_worker}/debug/requests", timeout=5)).json()
        assert seen["request_id"] == "r1" and seen["last"] == BODY
        chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with client.stream(f"{uvicorn_worker}/v1/chat/completions", chat, None) as response:
            assert response.status == 200
            pieces = [piece async for piece in response.chunks()]
        # Tokens 20 ms apart arrive in pieces of their own, not as one body at the end.
        assert len(pieces) >= 4 and b"".join(pieces).endswith(b"data: [DONE]\n\n")

    _run(kind, main)


def test_requests_after_idle_gaps_around_the_workers_keep_alive_all_succeed(uvicorn_worker: str) -> None:
    # uvicorn (vLLM, trtllm-serve, forgeline worker) closes an idle connection after 5 s; a
    # client that reused one it was closing would fail the request (and eject the worker).
    async def main(client: Any) -> list[int]:
        statuses = []
        for gap in (0.0, KEEPALIVE_S + 0.5, 5.05, 0.1):
            await asyncio.sleep(gap)
            statuses.append((await client.post_json(f"{uvicorn_worker}/v1/completions", BODY, None, timeout=30)).status)
        return statuses

    assert _run("wire", main) == [200, 200, 200, 200]


# -- framing, keep-alive ------------------------------------------------------------------


def test_streamed_pieces_arrive_before_the_body_ends(kind: str) -> None:
    async def main(client: Any) -> None:
        go = asyncio.Event()

        async def answer(_r: asyncio.StreamReader, writer: asyncio.StreamWriter, _n: int) -> bool:
            writer.write(SSE_HEAD + _chunked(b"data: 1\n\n"))
            await go.wait()  # the rest only once the client has the first event
            writer.write(_chunked(b"data: 2\n\n", b"data: [DONE]\n\n") + b"0\r\n\r\n")
            return True

        async with RawWorker(answer) as worker, client.stream(worker.url + "/v1/completions", BODY, None) as response:
            pieces = response.chunks()
            assert await anext(pieces) == b"data: 1\n\n"
            go.set()
            assert b"".join([piece async for piece in pieces]) == b"data: 2\n\ndata: [DONE]\n\n"

    _run(kind, main)


def test_content_length_chunked_and_until_close_bodies_read_whole_or_streamed(kind: str) -> None:
    payload = b'{"a":1}'

    async def answer(_r: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        if n % 3 == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n" + payload)
        elif n % 3 == 2:
            writer.write(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(payload[:3], payload[3:]) + b"0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 202 Accepted\r\nConnection: close\r\n\r\n" + payload)  # ends when the connection does
            return False
        return True

    async def main(client: Any) -> list[tuple[int, bytes]]:
        got = []
        async with RawWorker(answer) as worker:
            for _ in range(3):
                answer_ = await client.post_json(worker.url + "/v1/completions", BODY, None, timeout=5)
                got.append((answer_.status, answer_.body))
            for _ in range(3):
                async with client.stream(worker.url + "/v1/completions", BODY, None) as response:
                    got.append((response.status, b"".join([piece async for piece in response.chunks()])))
        return got

    assert _run(kind, main) == [(200, payload), (201, payload), (202, payload)] * 2


def test_sequential_requests_reuse_one_connection(kind: str) -> None:
    async def main(client: Any) -> None:
        async with RawWorker(_ok) as worker:
            for i in range(4):
                assert (await client.post_json(worker.url + "/v1/completions", BODY, None, timeout=5)).json() == {"n": 2 * i + 1}
                async with client.stream(worker.url + "/v1/completions", BODY, None) as response:
                    assert await response.read() == json.dumps({"n": 2 * i + 2}).encode()
            assert worker.connections == 1 and len(worker.requests) == 8
            # What the worker got: one POST, the client's headers, the JSON body.
            head, _, body = worker.requests[0].partition(b"\r\n\r\n")
            lines = [line.lower() for line in head.split(b"\r\n")]
            assert lines[0] == b"post /v1/completions http/1.1" and b"authorization: bearer k" in lines and json.loads(body) == BODY
            if kind == "wire":  # no compression asked for (aiohttp asks for gzip)
                assert not any(line.startswith(b"accept-encoding") for line in lines)

    _run(kind, main)


def test_a_connection_the_worker_closed_while_idle_is_not_reused(kind: str) -> None:
    async def answer(_r: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(_json({"n": n}))
        await asyncio.sleep(0.05)
        return False  # closed 50 ms later, without a word

    async def main(client: Any) -> None:
        async with RawWorker(answer) as worker:
            for n in (1, 2, 3):
                await asyncio.sleep(0.2)
                assert (await client.post_json(worker.url + "/v1/completions", BODY, None, timeout=5)).json() == {"n": n}
            assert worker.connections == 3

    _run(kind, main)


def test_a_reused_connection_closed_as_the_request_arrives_is_retried_once_on_a_new_one() -> None:
    # The race the idle sweep cannot rule out: the worker closes a kept-alive connection just as
    # the next request is written to it. It saw no request, so the client sends it again.
    # (aiohttp retries only idempotent methods, so a POST fails there.)
    async def answer(_r: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        if n == 2:
            return False  # the second request, on the reused connection: closed unanswered
        writer.write(_json({"n": n}))
        return True

    async def main(client: Any) -> None:
        async with RawWorker(answer) as worker:
            assert (await client.post_json(worker.url + "/v1/completions", BODY, None, timeout=5)).json() == {"n": 1}
            assert (await client.post_json(worker.url + "/v1/completions", BODY, None, timeout=5)).json() == {"n": 3}
            assert worker.connections == 2

    _run("wire", main)


# -- failures -----------------------------------------------------------------------------


def test_a_refused_connection_is_refused(kind: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed

    async def main(client: Any) -> None:
        with pytest.raises(WorkerRefusedError):
            await client.post_json(f"http://127.0.0.1:{port}/v1/completions", BODY, None, timeout=5)
        with pytest.raises(WorkerRefusedError):
            async with client.stream(f"http://127.0.0.1:{port}/v1/completions", BODY, None):
                pass

    _run(kind, main)


@pytest.mark.parametrize(
    "answer_bytes",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10,  # closed mid-body
        SSE_HEAD + _chunked(b"data: 1\n\n"),  # closed between chunks
        b"",  # closed before any byte, on a new connection: the request was sent
        b"HTTP/1.1 abc\r\n\r\n",  # not HTTP
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # a bad chunk size
    ],
    ids=["mid-body", "mid-stream", "unanswered", "bad-status", "bad-chunk"],
)
def test_a_broken_or_malformed_answer_is_broken(kind: str, answer_bytes: bytes) -> None:
    async def answer(_r: asyncio.StreamReader, writer: asyncio.StreamWriter, _n: int) -> bool:
        writer.write(answer_bytes)
        await writer.drain()
        return False

    async def main(client: Any) -> None:
        async with RawWorker(answer) as worker:
            with pytest.raises(WorkerBrokenError):
                await client.post_json(worker.url + "/v1/completions", BODY, None, timeout=5)
            with pytest.raises(WorkerBrokenError):
                async with client.stream(worker.url + "/v1/completions", BODY, None) as response:
                    async for _piece in response.chunks():
                        pass

    _run(kind, main)


def test_a_worker_that_stalls_times_out_after_the_read_timeout(kind: str) -> None:
    async def answer(_r: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        if n == 2:
            writer.write(SSE_HEAD + _chunked(b"data: 1\n\n"))  # then silence
        await asyncio.sleep(3)
        return False

    async def main(client: Any) -> None:
        async with RawWorker(answer) as worker:
            began = time.monotonic()
            with pytest.raises(WorkerTimeoutError):
                await client.post_json(worker.url + "/v1/completions", BODY, None, timeout=0.3)
            pieces = []
            with pytest.raises(WorkerTimeoutError):
                async with client.stream(worker.url + "/v1/completions", BODY, None) as response:
                    async for piece in response.chunks():
                        pieces.append(piece)
            assert pieces == [b"data: 1\n\n"] and time.monotonic() - began < 2.0

    _run(kind, main, read_timeout=0.3)


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "unary"])
def test_a_client_that_leaves_closes_the_connection_so_the_worker_sees_it(kind: str, streamed: bool) -> None:
    async def main(client: Any) -> None:
        asked = asyncio.Event()

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _n: int) -> bool:
            if streamed:
                writer.write(SSE_HEAD + _chunked(b"data: 1\n\n"))
            asked.set()
            # A worker notices a client that left by its connection's end (what uvicorn does).
            if await reader.read(1) == b"":
                left.set()
            return False

        async def ask(url: str) -> None:
            if streamed:
                async with client.stream(url, BODY, None) as response:
                    async for _piece in response.chunks():
                        pass
            else:
                await client.post_json(url, BODY, None, timeout=30)

        left = asyncio.Event()
        async with RawWorker(answer) as worker:
            task = asyncio.create_task(ask(worker.url + "/v1/completions"))
            await asyncio.wait_for(asked.wait(), 5)
            await asyncio.sleep(0.05)  # the first event is read (streamed), the answer awaited (unary)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(left.wait(), 2)

    _run(kind, main)


def test_a_long_sse_line_and_a_slow_reader_get_every_byte(kind: str) -> None:
    event = b"data: " + b"x" * (3 * 1024 * 1024) + b"\n\n"  # one event over 1 MiB: a long tool call, logprobs
    tail = b"data: [DONE]\n\n" * 4000

    async def answer(_r: asyncio.StreamReader, writer: asyncio.StreamWriter, _n: int) -> bool:
        writer.write(SSE_HEAD)
        for i in range(0, len(event), 65536):
            writer.write(_chunked(event[i : i + 65536]))
        for _ in range(100):  # more than the buffer cap behind it, for a reader that sleeps
            writer.write(_chunked(b"y" * 65536))
        writer.write(_chunked(tail) + b"0\r\n\r\n")
        await writer.drain()
        return True

    async def main(client: Any) -> list[bytes]:
        async with RawWorker(answer) as worker, client.stream(worker.url + "/v1/completions", BODY, None) as response:
            pieces = []
            async for piece in response.chunks():
                pieces.append(piece)
                await asyncio.sleep(0.1 if len(pieces) == 1 else 0.002)  # long enough for all of it to arrive
            return pieces

    pieces = _run(kind, main)
    assert b"".join(pieces) == event + b"y" * (100 * 65536) + tail
    if kind == "wire":  # reading paused at the cap: the reader never holds much more than it
        assert max(map(len, pieces)) < HIGH_WATER + 1024 * 1024
