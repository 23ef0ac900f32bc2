"""A server-sent-events response written straight through ASGI ``send``.

Starlette's `StreamingResponse` runs each stream in an anyio task group (a task for the
body, one watching for the client to leave) and encodes every item on its own. Here the
stream runs in the request's own task, each item is one ``send`` (one socket write), the
closing event rides in the same write as the end of the body, and one plain asyncio task
waits for ``http.disconnect``: when the client leaves mid-stream, the stream is cancelled
at once (an upstream request is closed, a batch row freed) even while it waits for the
next token.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class LastEvents(bytes):
    """A stream's last events: they leave with the tail, in the one write that ends the body.

    What the event iterable does after yielding them is not sent: a relay reads its
    worker's answer to the end there (so the connection is reused), after the client has
    its whole answer and ``[DONE]``.
    """


class EventStreamResponse(Response):
    """``text/event-stream`` from an async iterable of encoded events.

    Args:
        events: each item is sent to the client as it comes (one write each); text is sent as UTF-8.
            A `LastEvents` item ends the body, with the tail.
        headers: extra response headers.
        tail: sent with the end of the body (``data: [DONE]``), after ``events`` ends or fails.
    """

    media_type = "text/event-stream"

    def __init__(
        self, events: AsyncIterable[bytes] | AsyncIterable[str], *, headers: Mapping[str, str] | None = None, tail: bytes = b""
    ) -> None:
        self.events = events
        self.tail = tail
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        ending = False
        left = False

        async def watch() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            if not ending:  # uvicorn also reports a disconnect once the response is complete
                left = True
                task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            last = b""
            async for item in self.events:
                if isinstance(item, LastEvents):
                    last = item
                    break
                body = item.encode() if isinstance(item, str) else item
                await send({"type": "http.response.body", "body": body, "more_body": True})
            ending = True
            await send({"type": "http.response.body", "body": last + self.tail, "more_body": False})
            async for _ in self.events:
                pass  # after the end (see `LastEvents`): nothing more is sent
        except asyncio.CancelledError:
            if not left:
                raise
            task.uncancel()  # the client left: a normal end of this request, not a server error
        finally:
            ending = True
            watcher.cancel()
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()
