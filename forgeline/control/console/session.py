"""Console sessions: an API key once at login, then a signed, expiring cookie.

The cookie holds the key's id, an expiry and a random nonce, signed with HMAC-SHA256; the key's
secret never leaves the login form. Every request re-reads the key, so revoking or expiring a
key ends its sessions at once. The CSRF token of a session is derived from its nonce, so forms
carry a value the browser's cookie jar alone cannot forge (double defence with SameSite=Strict).

Logout forgets the nonce in this process; a cookie copied before logout stays valid elsewhere
until it expires (default 8 h, ``FORGELINE_CONSOLE_SESSION_S``). Set ``FORGELINE_CONSOLE_SECRET``
on every replica behind a load balancer so their cookies agree; without it each process signs
with a random secret of its own and sessions end when it restarts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass

from registry.errors import ForgelineError
from registry.keys import KeyRecord, KeyStore

COOKIE = "forgeline_console"
DEFAULT_TTL_S = 8 * 3600


@dataclass(frozen=True)
class Session:
    """A logged-in console user: the verified key and the session's CSRF token."""

    key: KeyRecord
    nonce: str
    csrf: str
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sessions:
    """Issue, read and end console sessions for keys of one key store."""

    def __init__(self, keys: KeyStore, *, secret: bytes | None = None, ttl_s: int | None = None) -> None:
        env_secret = os.environ.get("FORGELINE_CONSOLE_SECRET")
        self._secret = secret or (env_secret.encode() if env_secret else secrets.token_bytes(32))
        self.ttl_s = ttl_s or int(os.environ.get("FORGELINE_CONSOLE_SESSION_S", DEFAULT_TTL_S))
        self._keys = keys
        self._ended: dict[str, int] = {}  # nonce -> expiry, so logout holds until the cookie would expire
        self._lock = threading.Lock()

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())

    def _csrf(self, nonce: str) -> str:
        return self._sign("csrf:" + nonce)

    def issue(self, key: KeyRecord) -> str:
        """A cookie value for ``key`` (already verified by the caller)."""
        body = {"kid": key.id, "exp": int(time.time()) + self.ttl_s, "n": secrets.token_urlsafe(16)}
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        return f"{payload}.{self._sign(payload)}"

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie stands for, or None when it is missing, forged, expired,
        logged out, or its key is no longer active."""
        if not cookie or cookie.count(".") != 1:
            return None
        payload, signature = cookie.split(".")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            body = json.loads(_unb64(payload))
            key_id, expires_at, nonce = str(body["kid"]), int(body["exp"]), str(body["n"])
        except (ValueError, KeyError, TypeError):
            return None
        if expires_at <= time.time():
            return None
        with self._lock:
            if nonce in self._ended:
                return None
        try:
            key = self._keys.get(key_id)
        except ForgelineError:
            return None
        if not key.active():
            return None
        return Session(key=key, nonce=nonce, csrf=self._csrf(nonce), expires_at=expires_at)

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        """Whether a form's token belongs to this session (constant-time)."""
        return bool(token) and hmac.compare_digest(str(token), session.csrf)

    def end(self, session: Session) -> None:
        """Log out: this session's cookie is refused from now on (in this process)."""
        now = int(time.time())
        with self._lock:
            self._ended = {n: exp for n, exp in self._ended.items() if exp > now}
            self._ended[session.nonce] = session.expires_at
