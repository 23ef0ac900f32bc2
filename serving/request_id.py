"""The request id: taken from the client's ``x-request-id`` (or made), sent back, logged and passed to workers.

It lives in a context variable so the gateway's access log and the upstream engine's calls
to a worker share it without every function in between carrying it (vLLM and SGLang take
``X-Request-Id`` as their own request id, so one id finds a request in every log).
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar

HEADER = "x-request-id"

current: ContextVar[str | None] = ContextVar("forgeline_request_id", default=None)
"""The id of the request being handled, or None outside one."""

_ACCEPTED = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")

# A random UUID's version (4) and variant (RFC 4122) bits, as `uuid.uuid4` sets them.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def from_header(value: str | None) -> str:
    """The client's id when it is a sane token (<= 128 URL-safe characters), else a new one."""
    if value and _ACCEPTED.fullmatch(value):
        return value
    return new()


def new() -> str:
    """A new id: a random UUID (version 4) as 32 hex digits, as ``uuid.uuid4().hex`` gives it
    (made here in three C calls; `uuid.UUID` costs a dozen Python calls per request)."""
    return f"{int.from_bytes(os.urandom(16)) & _UUID4_CLEAR | _UUID4_SET:032x}"
