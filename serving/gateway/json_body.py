"""Untrusted JSON: parse it so that no input can make a server answer 500.

Python's ``json`` accepts things nothing downstream can handle: ``\\ud800`` escapes become
unpaired UTF-16 surrogates, which fail the moment the text is encoded (tokenizer, SQLite,
the JSON response echoing it back); and arrays nested thousands deep raise
``RecursionError``. `loads_untrusted` refuses both with a `ForgelineError` (400) that names
the field, the value (escaped) and the fix. `StrictJSONMiddleware` applies it to every JSON
request body of an app before the endpoint parses it; the fine-tuning file checks and the
``metadata`` query filter call it directly on the JSON they read.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from registry.errors import ErrorCode, ForgelineError
from serving.cpu_pool import run_cpu
from serving.gateway.errors import error_response, forgeline_error_response

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays/objects accepted; real OpenAI requests and data rows use < 10."""

# A surrogate can only enter through a \uXXXX escape once the bytes decoded as strict UTF-8,
# so a scan of the raw text for one decides whether the strings need checking at all.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_METHODS = frozenset({"POST", "PUT", "PATCH"})


class UntrustedJSONError(ForgelineError):
    """JSON that parses but cannot be processed safely (HTTP 400)."""

    code = ErrorCode.INVALID_REQUEST


def _join(path: str, key: object) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))


def _check_tree(value: Any, *, surrogates: bool, what: str, root: str) -> None:
    # Iterative, so checking depth cannot itself overflow the stack.
    stack: list[tuple[Any, str, int]] = [(value, root, 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.items()
        elif isinstance(item, list):
            children = enumerate(item)
        else:
            if surrogates and isinstance(item, str) and _SURROGATE.search(item):
                _refuse_surrogate(item, path or what, what)
            continue
        if depth >= MAX_JSON_DEPTH:
            raise UntrustedJSONError(
                f"{path or what}: JSON nested more than {MAX_JSON_DEPTH} levels deep; fix: send flatter data",
                param=path or None,
            )
        for key, child in children:
            if surrogates and isinstance(key, str) and _SURROGATE.search(key):
                _refuse_surrogate(key, _join(path, "<key>"), what)
            stack.append((child, _join(path, key), depth + 1))


def _refuse_surrogate(text: str, path: str, what: str) -> None:
    found = _SURROGATE.search(text)
    assert found is not None
    start = max(0, found.start() - 20)
    excerpt = ascii(text[start : found.end() + 20])
    raise UntrustedJSONError(
        f"{path}: contains an unpaired UTF-16 surrogate \\u{ord(found.group()):04x} (near {excerpt}), which is not "
        f"valid Unicode text; fix: send valid UTF-8 (escape characters outside the BMP as a surrogate pair, "
        f"e.g. \\ud83d\\ude00)",
        param=path if path != what else None,
    )


def loads_untrusted(data: str | bytes, *, what: str = "body", root: str = "") -> Any:
    """Parse JSON from a client, refusing what would break later processing.

    Args:
        data: the JSON text; bytes must be UTF-8.
        what: how to name the input as a whole in messages (``body``, ``row``).
        root: the field the JSON is the value of (``metadata``), prefixed to paths in messages.

    Returns:
        The parsed value.

    Raises:
        json.JSONDecodeError: not JSON (callers keep their own syntax-error messages).
        UntrustedJSONError: not UTF-8, nested deeper than `MAX_JSON_DEPTH`, or a string
            (value or key) holding an unpaired surrogate.
    """
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UntrustedJSONError(
                f"{what}: not valid UTF-8 (byte {exc.start}: {data[exc.start : exc.start + 1]!r}); fix: encode the text as UTF-8"
            ) from None
    else:
        text = data
    try:
        value = json.loads(text)
    except RecursionError:
        raise UntrustedJSONError(
            f"{what}: JSON nested more than {MAX_JSON_DEPTH} levels deep; fix: send flatter data"
        ) from None
    _check_tree(value, surrogates=_SURROGATE_ESCAPE.search(text) is not None, what=what, root=root)
    return value


def _is_json(scope: Scope) -> bool:
    if scope["method"] not in _JSON_METHODS:
        return False
    for name, value in scope["headers"]:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return False  # FastAPI (strict_content_type, the default) does not parse a body without one as JSON


class StrictJSONMiddleware:
    """Check every JSON request body with `loads_untrusted` before the app sees it.

    The body is read whole (FastAPI reads it whole anyway) and replayed unchanged to the
    app; a body that is not JSON at all is left to the app's own parse error.

    Args:
        app: the ASGI app.
        max_bytes: a larger JSON body gets 413 (None: an outer middleware bounds it).
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        body = await read_checked_body(scope, receive, send, self.app, max_bytes=self.max_bytes)
        if body is not None:
            await self.app(scope, _replay([body], None, receive), send)


async def read_checked_body(
    scope: Scope, receive: Receive, send: Send, app: ASGIApp, *, max_bytes: int | None = None
) -> bytes | None:
    """Read a JSON request body whole and check it with `loads_untrusted`, as
    `StrictJSONMiddleware` does for every JSON request (the chat fast path, in front of it,
    calls this itself).

    Args:
        scope, receive, send: the request.
        app: where a request whose client left mid-body goes on (it sees the disconnect).
        max_bytes: a larger body gets 413 (None: an outer middleware bounds it).

    Returns:
        The body; or None when the request has been answered here (413, or a 400 for JSON
        that cannot be processed) or handed to ``app``.
    """
    chunks: list[bytes] = []
    size = 0
    message: Message = {"type": "http.request", "body": b"", "more_body": True}
    while message.get("more_body", False):
        try:
            message = await receive()
        except StarletteHTTPException as exc:
            # An outer size limit stopped a chunked body (metrics._limited); outside the
            # app's handlers here, so answer it as they would.
            await _http_error(scope, exc)(scope, receive, send)
            return None
        if message["type"] != "http.request":
            # The client left (http.disconnect): let the app see that as it would have.
            await app(scope, _replay([], message, receive), send)
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if max_bytes is not None and size > max_bytes:
            too_large = UntrustedJSONError(
                f"the JSON body is over the limit of {max_bytes} bytes; fix: send less data per request",
                code=ErrorCode.PAYLOAD_TOO_LARGE,
            )
            await forgeline_error_response(too_large)(scope, receive, send)
            return None
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if body and not _plainly_safe(body):
        try:
            await run_cpu(len(body), loads_untrusted, body)
        except json.JSONDecodeError:
            pass  # the app answers syntax errors itself, with the position
        except UntrustedJSONError as exc:
            await forgeline_error_response(exc)(scope, _replay([body], None, receive), send)
            return None
    return body


def _plainly_safe(body: bytes) -> bool:
    """True when ``body`` cannot fail `loads_untrusted` but for its syntax, by scans in C: strict
    UTF-8, no surrogate escape, and too few brackets to nest past `MAX_JSON_DEPTH`. Most
    requests are, and then the app's own parse is the only one."""
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH:
        return False
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return _SURROGATE_ESCAPE.search(text) is None


def _http_error(scope: Scope, exc: StarletteHTTPException) -> Response:
    if exc.status_code == 413:
        from serving.gateway.metrics import too_large_message

        limit = getattr(getattr(scope.get("app"), "state", None), "max_body_bytes", 0)
        return error_response(too_large_message(limit), 413, code=ErrorCode.PAYLOAD_TOO_LARGE)
    return error_response(str(exc.detail), exc.status_code)


def _replay(chunks: list[bytes], last: Message | None, receive: Receive) -> Receive:
    pending = [{"type": "http.request", "body": b, "more_body": False} for b in chunks]
    if last is not None:
        pending.append(last)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()  # after the body: disconnect notices, as from the server

    return replay
