"""``POST /v1/chat/completions`` answered below FastAPI's request machinery.

Nearly every request a gateway serves is a chat completion, and for a pass-through model
FastAPI's per-request work around the endpoint (routing through the included routers, the
body read and parsed, dependencies solved, exit stacks, exception wrappers) cost more CPU
than the relay itself (BENCHMARKS.md §1, third pass). `ChatFastPath` takes the request
straight from the ASGI scope and runs the same pieces the FastAPI route runs, in the same
order: the body validated by the same pydantic model (from the raw bytes: one parse, no
``json.loads``), the key checked by the same `get_principal` under the same route rule,
the same endpoint function, its response sent as is, and errors rendered by the app's own
exception handlers. What it does not take (another content type, a body that does not
validate, a disconnect mid-body) goes on, body replayed, to the FastAPI route, whose
answer is then the answer: the same 400s, word for word.

It is a route like the others: `serving.gateway.auth.http_routes` lists it, so the
route-table authorization check (`check_declared`) covers it, and ``/openapi.json``
documents it through the FastAPI route it mirrors.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.gateway import chat
from serving.gateway.auth import get_principal
from serving.gateway.json_body import read_checked_body
from serving.gateway.protocol import ChatCompletionRequest

logger = logging.getLogger(__name__)

PATH = "/v1/chat/completions"

# The FastAPI route this path mirrors: requests answered here carry it as their scope's
# ``route``, so its rule applies (`get_principal`) and metrics label them with its path.
_ROUTE = next(r for r in chat.router.routes if isinstance(r, APIRoute) and r.path == PATH)


class ChatFastPath:
    """ASGI middleware (below the access log, above `StrictJSONMiddleware`) that answers chat
    completions itself.

    Args:
        app: the rest of the app (`StrictJSONMiddleware`, FastAPI's exception middleware and router).
    """

    path = PATH
    methods = frozenset({"POST"})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != PATH
            or scope["method"] != "POST"
            or scope.get("root_path")
            or not _is_plain_json(scope)
        ):
            await self.app(scope, receive, send)
            return
        # StrictJSONMiddleware's read and checks, made here: the request does not pass through
        # it (nor does its body get replayed to us) unless it falls through to the route.
        raw = await read_checked_body(scope, receive, send, self.app)
        if raw is None:  # answered (413, JSON that cannot be processed), or the client left
            return
        try:
            body = ChatCompletionRequest.model_validate_json(raw)
        except ValidationError:
            # The route's parse and its validation error handler word the 400 (and a missing
            # key still gets its 401 first, as there).
            await self.fall_through(scope, raw, receive, send)
            return
        scope["route"] = _ROUTE
        request = Request(scope, receive, send)
        try:
            principal = await get_principal(request)
            response = await chat.create_chat_completion(request, body, principal)
        except Exception as exc:
            handler = _exception_handler(scope, exc)
            if handler is None:
                raise  # as from the route: the app's catch-all (500, OpenAI-shaped) answers it
            response = await handler(request, exc)
        await response(scope, receive, send)

    async def fall_through(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        """Hand the request on to the FastAPI route (through `StrictJSONMiddleware`), its body replayed."""
        pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


def _is_plain_json(scope: Scope) -> bool:
    """``Content-Type: application/json`` (parameters such as a charset allowed); FastAPI
    decides every other type (``+json`` types, none at all) itself."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


def _exception_handler(scope: Scope, exc: Exception) -> Any:
    """The handler the app's exception middleware would pick for ``exc`` (Starlette's lookup:
    by status for HTTP exceptions, then along the class's MRO), or None for the catch-all's."""
    handlers = scope["app"].exception_handlers
    if isinstance(exc, StarletteHTTPException) and exc.status_code != 500 and exc.status_code in handlers:
        return handlers[exc.status_code]
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None  # the catch-all is the server-error middleware's, outside us
        if cls in handlers:
            return handlers[cls]
    return None
