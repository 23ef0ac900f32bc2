"""Lifecycle events delivered to webhooks, signed with HMAC-SHA256 and retried with backoff.

Events: ``registered``, ``evaluated``, ``approved``, ``rejected``, ``promoted``,
``rolled_back``. Each is POSTed as JSON to every configured webhook that wants its type,
with these headers:

- ``X-Forgeline-Event``: the event type;
- ``X-Forgeline-Delivery``: the event id (the same on every retry, so receivers can
  drop duplicates);
- ``X-Forgeline-Timestamp``: Unix seconds when this attempt was signed;
- ``X-Forgeline-Signature``: ``sha256=`` + hex HMAC-SHA256 of ``"<timestamp>.<body>"``
  with the webhook's secret. Receivers check it with :func:`verify_signature`, which
  also refuses stale timestamps (replays).

Delivery runs on background threads after the change is committed, so a slow receiver
never delays a promotion. Connection errors, timeouts, 408, 429 and 5xx are retried
with exponential backoff; other 4xx answers are final (the receiver refused the event).
Delivery is at-least-once while the process lives; events still queued when a process
is killed are lost, which is why serving also polls aliases as a fallback.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from registry.db import now
from registry.errors import ErrorCode, ForgelineError

logger = logging.getLogger(__name__)

EventType = Literal["registered", "evaluated", "approved", "rejected", "promoted", "rolled_back"]
EVENT_TYPES: tuple[str, ...] = ("registered", "evaluated", "approved", "rejected", "promoted", "rolled_back")

EVENT_HEADER = "X-Forgeline-Event"
DELIVERY_HEADER = "X-Forgeline-Delivery"
TIMESTAMP_HEADER = "X-Forgeline-Timestamp"
SIGNATURE_HEADER = "X-Forgeline-Signature"

_RETRYABLE_STATUS = frozenset({408, 425, 429})


class Webhook(BaseModel):
    """One receiver of lifecycle events."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="http(s) URL the events are POSTed to.")
    secret: str = Field(min_length=16, description="Shared HMAC secret (at least 16 characters).", repr=False)
    events: list[str] | None = Field(default=None, description="Event types to send; all when unset.")
    max_attempts: int = Field(default=5, ge=1, le=20, description="Attempts per event, the first included.")
    backoff_s: float = Field(default=0.5, gt=0, description="Wait before the first retry; doubles each time.")
    max_backoff_s: float = Field(default=30.0, gt=0, description="Longest wait between two attempts.")
    timeout_s: float = Field(default=10.0, gt=0, description="Per-attempt HTTP timeout.")

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"webhook URL must start with http:// or https:// (got {value!r})")
        return value

    @field_validator("events")
    @classmethod
    def _known_events(cls, value: list[str] | None) -> list[str] | None:
        unknown = [event for event in value or [] if event not in EVENT_TYPES]
        if unknown:
            raise ValueError(f"unknown event type(s) {unknown}; use {', '.join(EVENT_TYPES)}")
        return value

    def wants(self, event_type: str) -> bool:
        """Whether this webhook subscribes to ``event_type``."""
        return self.events is None or event_type in self.events


@dataclass(frozen=True)
class Event:
    """One lifecycle event."""

    type: str
    model: str
    actor: str
    version: int | None = None
    alias: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: datetime = field(default_factory=now)

    def to_dict(self) -> dict[str, Any]:
        """The JSON body receivers get."""
        return {
            "id": self.id,
            "type": self.type,
            "created_at": self.created_at.isoformat(),
            "model": self.model,
            "version": self.version,
            "alias": self.alias,
            "actor": self.actor,
            "data": self.data,
        }

    def body(self) -> bytes:
        """The exact bytes that are signed and sent."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Forgeline-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: str,
    body: bytes,
    *,
    timestamp: str | int | None,
    signature: str | None,
    tolerance_s: float = 300.0,
    at: float | None = None,
) -> bool:
    """Whether a delivery is authentic: the signature matches and the timestamp is fresh.

    Args:
        secret: the webhook's shared secret.
        body: the raw request body, exactly as received.
        timestamp: the ``X-Forgeline-Timestamp`` header.
        signature: the ``X-Forgeline-Signature`` header.
        tolerance_s: how old (or far in the future) a timestamp may be.
        at: the current Unix time (tests).
    """
    if timestamp is None or signature is None:
        return False
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if at is None else at) - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


@dataclass(frozen=True)
class Delivery:
    """The outcome of delivering one event to one webhook."""

    event_id: str
    event_type: str
    url: str
    ok: bool
    attempts: int
    status: int | None
    error: str | None


def deliver(
    hook: Webhook,
    event: Event,
    *,
    client: Any | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Delivery:
    """POST ``event`` to ``hook`` until it answers 2xx, retrying with exponential backoff.

    Args:
        hook: the receiver.
        event: what to send.
        client: an ``httpx.Client`` to reuse (one is created otherwise).
        sleep: how to wait between attempts (tests pass a recorder).

    Returns:
        The outcome; it never raises for HTTP or network errors (they are logged).
    """
    import httpx

    body = event.body()
    owned = client is None
    http = client or httpx.Client(timeout=hook.timeout_s)
    status: int | None = None
    error: str | None = None
    attempt = 0
    try:
        for attempt in range(1, hook.max_attempts + 1):
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "forgeline-webhooks",
                EVENT_HEADER: event.type,
                DELIVERY_HEADER: event.id,
                TIMESTAMP_HEADER: str(timestamp),
                SIGNATURE_HEADER: sign(hook.secret, timestamp, body),
            }
            try:
                response = http.post(hook.url, content=body, headers=headers, timeout=hook.timeout_s)
                status, error = response.status_code, None
                if 200 <= status < 300:
                    logger.info("delivered %s %s to %s (attempt %d)", event.type, event.id, hook.url, attempt)
                    return Delivery(event.id, event.type, hook.url, True, attempt, status, None)
                error = f"HTTP {status}: {response.text[:200]}"
                if status < 500 and status not in _RETRYABLE_STATUS:
                    break  # the receiver refused this event; sending it again will not help
            except httpx.HTTPError as exc:
                status, error = None, f"{type(exc).__name__}: {exc}"
            if attempt < hook.max_attempts:
                wait_s = min(hook.backoff_s * 2 ** (attempt - 1), hook.max_backoff_s)
                logger.info("webhook %s failed (%s); retry %d in %.1fs", hook.url, error, attempt + 1, wait_s)
                sleep(wait_s)
    finally:
        if owned:
            http.close()
    logger.warning("gave up delivering %s %s to %s after %d attempt(s): %s", event.type, event.id, hook.url, attempt, error)
    return Delivery(event.id, event.type, hook.url, False, attempt, status, error)


class WebhookDispatcher:
    """Publishes events to webhooks on background threads.

    Args:
        hooks: the receivers; with none, :meth:`publish` does nothing.
        max_workers: deliveries in flight at once.
    """

    def __init__(self, hooks: Sequence[Webhook] = (), *, max_workers: int = 4) -> None:
        self.hooks = tuple(hooks)
        self._max_workers = max_workers
        self._executor: ThreadPoolExecutor | None = None
        self._pending: set[Future[Delivery]] = set()
        self._lock = threading.Lock()
        self.deliveries: list[Delivery] = []
        """Outcomes of finished deliveries, oldest first (kept for the last 1,000)."""

    @classmethod
    def from_settings(cls) -> WebhookDispatcher:
        """Webhooks from the environment: ``FORGELINE_WEBHOOK_URLS`` (comma-separated)
        signed with ``FORGELINE_WEBHOOK_SECRET``.

        Raises:
            ForgelineError: URLs are set without a secret, or a URL is invalid.
        """
        urls = [url.strip() for url in os.environ.get("FORGELINE_WEBHOOK_URLS", "").split(",") if url.strip()]
        if not urls:
            return cls()
        secret = os.environ.get("FORGELINE_WEBHOOK_SECRET", "")
        if len(secret) < 16:
            raise ForgelineError(
                "FORGELINE_WEBHOOK_URLS is set but FORGELINE_WEBHOOK_SECRET is missing or shorter than 16 "
                "characters; fix: export FORGELINE_WEBHOOK_SECRET=$(openssl rand -hex 32)",
                code=ErrorCode.INVALID_CONFIG,
                param="FORGELINE_WEBHOOK_SECRET",
            )
        try:
            return cls([Webhook(url=url, secret=secret) for url in urls])
        except ValueError as exc:
            raise ForgelineError(
                f"FORGELINE_WEBHOOK_URLS: {exc}", code=ErrorCode.INVALID_CONFIG, param="FORGELINE_WEBHOOK_URLS"
            ) from exc

    def publish(
        self,
        event_type: EventType,
        *,
        model: str,
        actor: str,
        version: int | None = None,
        alias: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> Event | None:
        """Queue an event for every webhook that wants it; returns it (``None`` with no webhook)."""
        hooks = [hook for hook in self.hooks if hook.wants(event_type)]
        if not hooks:
            return None
        event = Event(type=event_type, model=model, actor=actor, version=version, alias=alias, data=data or {})
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._max_workers, thread_name_prefix="forgeline-webhook")
                atexit.register(self.flush, 30.0)
            for hook in hooks:
                future = self._executor.submit(deliver, hook, event)
                self._pending.add(future)
                future.add_done_callback(self._done)
        return event

    def _done(self, future: Future[Delivery]) -> None:
        with self._lock:
            self._pending.discard(future)
            if not future.cancelled() and future.exception() is None:
                self.deliveries.append(future.result())
                del self.deliveries[:-1000]
            elif not future.cancelled():
                logger.error("webhook delivery crashed", exc_info=future.exception())

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for queued deliveries; ``True`` when none is left."""
        with self._lock:
            pending = set(self._pending)
        if pending:
            wait(pending, timeout=timeout)
        with self._lock:
            return not self._pending

    def close(self, timeout: float | None = 30.0) -> None:
        """Flush, then stop the worker threads."""
        self.flush(timeout)
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            atexit.unregister(self.flush)
            executor.shutdown(wait=False, cancel_futures=True)
