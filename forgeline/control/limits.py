"""Refuse oversize uploads before they are read.

Starlette spools a whole multipart body to disk before the endpoint runs, so the file
store's own limit (which stops reading a stream) would only apply after the disk was
filled. This middleware answers 413 from the ``Content-Length`` header alone; the
``openai`` SDK and every common HTTP client send it with a multipart upload. A chunked
upload without one is still bounded by the store's limit, after spooling.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from registry.errors import ErrorCode
from serving.gateway.errors import error_response

MULTIPART_SLACK = 64 * 1024
"""Room for the multipart boundaries and the form's other fields around the file."""


class UploadLimitMiddleware:
    """413 for a ``POST`` to ``path`` whose declared body exceeds ``max_bytes`` (plus multipart slack)."""

    def __init__(self, app: ASGIApp, *, path: str, max_bytes: int) -> None:
        self.app = app
        self.path = path
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/") == self.path:
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes + MULTIPART_SLACK:
                response = error_response(
                    f"upload of {int(declared)} bytes is over the limit of {self.max_bytes} bytes per file; fix: split "
                    "the data into smaller files, or ask the operator to raise FORGELINE_MAX_FILE_BYTES",
                    413, param="file", code=ErrorCode.PAYLOAD_TOO_LARGE,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
