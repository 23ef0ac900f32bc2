"""The request id: taken from the client's ``x-request-id`` (or made), sent back, logged and passed to workers.

It lives in a context variable so the gateway's access log and the upstream engine's calls
to a worker share it without every function in between carrying it (vLLM and SGLang take
``X-Request-Id`` as their own request id, so one id finds a request in every log).
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

HEADER = "x-request-id"

current: ContextVar[str | None] = ContextVar("forgeline_request_id", default=None)
"""The id of the request being handled, or None outside one."""

_ACCEPTED = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


def from_header(value: str | None) -> str:
    """The client's id when it is a sane token (<= 128 URL-safe characters), else a new one."""
    if value and _ACCEPTED.fullmatch(value):
        return value
    return uuid.uuid4().hex
