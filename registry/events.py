"""Lifecycle events delivered to webhooks through a durable outbox, signed the Standard
Webhooks way (https://www.standardwebhooks.com) and retried with backoff.

Events: ``registered``, ``evaluated``, ``approved``, ``rejected``, ``promoted``,
``rolled_back``. Publishing one writes a row per interested webhook to the
``webhook_deliveries`` table of the control database; a worker thread POSTs due rows as
JSON and records each outcome there. Deliveries queued when a process stops (or is
killed) stay in the table and are sent by the next process that runs a dispatcher with
that webhook configured (the control plane, the gateway or the next CLI command).

Headers (Standard Webhooks, so receivers can use stock verifiers such as the
``standardwebhooks`` package):

- ``webhook-id``: the event id, the same on every retry (receivers drop duplicates:
  delivery is at-least-once — a process killed between the POST and recording it sends
  the event again);
- ``webhook-timestamp``: Unix seconds when this attempt was signed;
- ``webhook-signature``: ``v1,`` + base64 HMAC-SHA256 of ``"<id>.<timestamp>.<body>"``.
  The key is the secret's bytes: a ``whsec_<base64>`` secret is base64-decoded (what
  stock verifiers expect); any other secret is used as UTF-8, which stock verifiers
  accept as ``whsec_`` + base64 of it;
- ``X-Forgeline-Event``: the event type.

Connection errors, timeouts, 408, 425, 429 and 5xx are retried with exponential backoff;
other 4xx answers are final (the receiver refused the event).
"""

from __future__ import annotations

import atexit
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Column, Index, Integer, String, Table, Text, UniqueConstraint, and_, func, or_, select, update

from registry.db import READ_ONLY, ControlStore, UTCDateTime, metadata, now
from registry.errors import ErrorCode, ForgelineError

logger = logging.getLogger(__name__)

EventType = Literal["registered", "evaluated", "approved", "rejected", "promoted", "rolled_back"]
EVENT_TYPES: tuple[str, ...] = ("registered", "evaluated", "approved", "rejected", "promoted", "rolled_back")

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
EVENT_HEADER = "X-Forgeline-Event"
SECRET_PREFIX = "whsec_"

_RETRYABLE_STATUS = frozenset({408, 425, 429})

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False),
    Column("event_type", String(32), nullable=False),
    Column("url", String(2048), nullable=False),
    Column("body", Text, nullable=False),  # the exact bytes that are signed and sent
    Column("state", String(16), nullable=False),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("claimed_until", UTCDateTime, nullable=True),  # a worker is sending it; others wait
    Column("last_status", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=True),
    UniqueConstraint("event_id", "url", name="uq_webhook_deliveries_event_url"),
    Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
)


def _signing_key(secret: str) -> bytes:
    if secret.startswith(SECRET_PREFIX):
        return base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    return secret.encode()


class Webhook(BaseModel):
    """One receiver of lifecycle events."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="http(s) URL the events are POSTed to.")
    secret: str = Field(
        min_length=16,
        description="Signing secret: `whsec_<base64>` (Standard Webhooks; at least 16 bytes) or any string "
        "of at least 16 characters.",
        repr=False,
    )
    events: list[str] | None = Field(default=None, description="Event types to send; all when unset.")
    max_attempts: int = Field(default=8, ge=1, le=30, description="Attempts per event, the first included.")
    backoff_s: float = Field(default=0.5, gt=0, description="Wait before the first retry; doubles each time.")
    max_backoff_s: float = Field(default=300.0, gt=0, description="Longest wait between two attempts.")
    timeout_s: float = Field(default=10.0, gt=0, description="Per-attempt HTTP timeout.")

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"webhook URL must start with http:// or https:// (got {value!r})")
        if len(value) > 2048:
            raise ValueError("webhook URL is longer than 2048 characters")
        return value

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str) -> str:
        if value.startswith(SECRET_PREFIX):
            try:
                key = _signing_key(value)
            except (binascii.Error, ValueError):
                raise ValueError("a whsec_ secret must be base64 after the prefix; fix: "
                                 "python -c 'import base64,os; print(\"whsec_\"+base64.b64encode(os.urandom(32)).decode())'") from None
            if len(key) < 16:
                raise ValueError(f"a whsec_ secret must decode to at least 16 bytes (got {len(key)})")
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

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt."""
        return min(self.backoff_s * 2 ** (attempts - 1), self.max_backoff_s)


@dataclass(frozen=True)
class Event:
    """One lifecycle event."""

    type: str
    model: str
    actor: str
    version: int | None = None
    alias: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
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


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for ``body`` sent as ``msg_id`` at ``timestamp``."""
    mac = hmac.new(_signing_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def verify_signature(
    secret: str,
    body: bytes,
    *,
    msg_id: str | None,
    timestamp: str | int | None,
    signature: str | None,
    tolerance_s: float = 300.0,
    at: float | None = None,
) -> bool:
    """Whether a delivery is authentic: a ``v1`` signature matches and the timestamp is fresh.

    Args:
        secret: the webhook's secret.
        body: the raw request body, exactly as received.
        msg_id: the ``webhook-id`` header.
        timestamp: the ``webhook-timestamp`` header.
        signature: the ``webhook-signature`` header (space-separated ``v1,<base64>`` values).
        tolerance_s: how old (or far in the future) a timestamp may be.
        at: the current Unix time (tests).
    """
    if msg_id is None or timestamp is None or signature is None:
        return False
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if at is None else at) - ts) > tolerance_s:
        return False
    expected = sign(secret, msg_id, ts, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in signature.split())


@dataclass(frozen=True)
class Delivery:
    """The outcome of delivering one event to one webhook (final, or one attempt)."""

    event_id: str
    event_type: str
    url: str
    ok: bool
    attempts: int
    status: int | None
    error: str | None


@dataclass(frozen=True)
class _Attempt:
    ok: bool
    retry: bool
    status: int | None
    error: str | None


def send(hook: Webhook, event_id: str, event_type: str, body: bytes, client: Any) -> _Attempt:
    """POST one signed attempt; never raises for HTTP or network errors."""
    import httpx

    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "forgeline-webhooks",
        ID_HEADER: event_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(hook.secret, event_id, timestamp, body),
        EVENT_HEADER: event_type,
    }
    try:
        response = client.post(hook.url, content=body, headers=headers, timeout=hook.timeout_s)
    except httpx.HTTPError as exc:
        return _Attempt(False, True, None, f"{type(exc).__name__}: {exc}")
    status = response.status_code
    if 200 <= status < 300:
        return _Attempt(True, False, status, None)
    # Other 4xx: the receiver refused this event; sending it again will not help.
    retry = status >= 500 or status in _RETRYABLE_STATUS
    return _Attempt(False, retry, status, f"HTTP {status}: {response.text[:200]}")


@dataclass(frozen=True)
class OutboxRow:
    """One queued delivery."""

    id: int
    event_id: str
    event_type: str
    url: str
    body: bytes
    attempts: int


class WebhookOutbox(ControlStore):
    """The ``webhook_deliveries`` table: what is queued, claimed, delivered or given up."""

    def enqueue(self, event: Event, urls: Sequence[str]) -> None:
        """Queue ``event`` for each of ``urls`` (one row each, due now)."""
        at, body = now(), event.body().decode()
        rows = [
            {"event_id": event.id, "event_type": event.type, "url": url, "body": body, "state": PENDING,
             "attempts": 0, "next_attempt_at": at, "created_at": at}
            for url in urls
        ]
        with self.engine.begin() as conn:
            conn.execute(webhook_deliveries.insert(), rows)

    def claim_due(self, urls: Sequence[str], *, lease_s: float, limit: int = 32) -> list[OutboxRow]:
        """Claim up to ``limit`` due rows for ``urls`` for ``lease_s`` seconds.

        A row claimed by another worker (another process) is skipped until its lease runs
        out, so two processes do not send the same row at once.
        """
        t = webhook_deliveries.c
        at = now()
        claimable = and_(t.state == PENDING, t.url.in_(urls), t.next_attempt_at <= at,
                         or_(t.claimed_until.is_(None), t.claimed_until < at))
        claimed: list[OutboxRow] = []
        with self.engine.begin() as conn:
            for row in conn.execute(select(webhook_deliveries).where(claimable).order_by(t.id).limit(limit)).all():
                won = conn.execute(update(webhook_deliveries).where(and_(t.id == row.id, claimable))
                                   .values(claimed_until=at + timedelta(seconds=lease_s))).rowcount
                if won:
                    claimed.append(OutboxRow(row.id, row.event_id, row.event_type, row.url, row.body.encode(), row.attempts))
        return claimed

    def record(self, row: OutboxRow, outcome: _Attempt, hook: Webhook) -> Delivery:
        """Store one attempt's outcome: delivered, given up, or due again after the backoff."""
        attempts = row.attempts + 1
        at = now()
        if outcome.ok:
            state = DELIVERED
        elif outcome.retry and attempts < hook.max_attempts:
            state = PENDING
        else:
            state = FAILED
        values: dict[str, Any] = {"state": state, "attempts": attempts, "claimed_until": None,
                                  "last_status": outcome.status, "last_error": outcome.error}
        if state == PENDING:
            values["next_attempt_at"] = at + timedelta(seconds=hook.backoff(attempts))
        else:
            values["finished_at"] = at
        with self.engine.begin() as conn:
            conn.execute(update(webhook_deliveries).where(webhook_deliveries.c.id == row.id).values(**values))
        return Delivery(row.event_id, row.event_type, row.url, outcome.ok, attempts, outcome.status, outcome.error)

    def pending(self, urls: Sequence[str]) -> tuple[int, datetime | None]:
        """How many rows for ``urls`` are still to send, and when the earliest is due."""
        t = webhook_deliveries.c
        query = select(func.count(), func.min(t.next_attempt_at)).where(t.state == PENDING, t.url.in_(urls))
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn, conn.begin():
            count, due = conn.execute(query).one()
        if isinstance(due, str):  # a driver that hands back the stored text
            due = datetime.fromisoformat(due)
        if due is not None and due.tzinfo is None:
            due = due.replace(tzinfo=UTC)
        return int(count), due

    def rows(self, event_id: str | None = None) -> list[dict[str, Any]]:
        """Every row (of one event), oldest first: for operators and tests."""
        query = select(webhook_deliveries).order_by(webhook_deliveries.c.id)
        if event_id is not None:
            query = query.where(webhook_deliveries.c.event_id == event_id)
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn, conn.begin():
            return [dict(row._mapping) for row in conn.execute(query)]


class WebhookDispatcher:
    """Publishes events to webhooks through the outbox and delivers them on a worker thread.

    With webhooks configured, the worker starts at once, so deliveries left by an earlier
    process are sent too.

    Args:
        hooks: the receivers; with none, :meth:`publish` does nothing and no worker runs.
        outbox: the delivery table; defaults to one on ``url``.
        url: the control database (default ``registry.settings.control_db_url()``).
        client: an ``httpx.Client`` to send with (tests pass one with a mock transport).
        poll_s: how often the worker looks for rows queued by other processes.
    """

    def __init__(
        self,
        hooks: Sequence[Webhook] = (),
        *,
        outbox: WebhookOutbox | None = None,
        url: str | None = None,
        client: Any | None = None,
        poll_s: float = 5.0,
    ) -> None:
        self.hooks = tuple(hooks)
        self._by_url = {hook.url: hook for hook in self.hooks}
        self._owns_outbox = outbox is None
        self.outbox = outbox or WebhookOutbox(url)
        self._client = client
        self._poll_s = poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self.deliveries: list[Delivery] = []
        """Final outcomes this process recorded, oldest first (the last 1,000)."""
        if self.hooks:
            self._thread = threading.Thread(target=self._run, name="forgeline-webhooks", daemon=True)
            self._thread.start()
            atexit.register(self.close, 5.0)

    @classmethod
    def from_settings(cls, url: str | None = None) -> WebhookDispatcher:
        """Webhooks from the environment: ``FORGELINE_WEBHOOK_URLS`` (comma-separated)
        signed with ``FORGELINE_WEBHOOK_SECRET``; the outbox lives in the control database ``url``.

        Raises:
            ForgelineError: URLs are set without a secret, or a URL or the secret is invalid.
        """
        urls = [u.strip() for u in os.environ.get("FORGELINE_WEBHOOK_URLS", "").split(",") if u.strip()]
        if not urls:
            return cls(url=url)
        secret = os.environ.get("FORGELINE_WEBHOOK_SECRET", "")
        if len(secret) < 16:
            raise ForgelineError(
                "FORGELINE_WEBHOOK_URLS is set but FORGELINE_WEBHOOK_SECRET is missing or shorter than 16 "
                "characters; fix: export FORGELINE_WEBHOOK_SECRET=whsec_$(openssl rand -base64 32)",
                code=ErrorCode.INVALID_CONFIG,
                param="FORGELINE_WEBHOOK_SECRET",
            )
        try:
            hooks = [Webhook(url=u, secret=secret) for u in urls]
        except ValueError as exc:
            raise ForgelineError(
                f"FORGELINE_WEBHOOK_URLS / FORGELINE_WEBHOOK_SECRET: {exc}",
                code=ErrorCode.INVALID_CONFIG,
                param="FORGELINE_WEBHOOK_URLS",
            ) from exc
        return cls(hooks, url=url)

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
        urls = [hook.url for hook in self.hooks if hook.wants(event_type)]
        if not urls:
            return None
        event = Event(type=event_type, model=model, actor=actor, version=version, alias=alias, data=data or {})
        self.outbox.enqueue(event, urls)
        self._wake.set()
        return event

    def _run(self) -> None:
        import httpx

        client = self._client or httpx.Client()
        lease_s = max(hook.timeout_s for hook in self.hooks) + 30.0
        try:
            while not self._stop.is_set():
                try:
                    rows = self.outbox.claim_due(list(self._by_url), lease_s=lease_s)
                    for row in rows:
                        self._deliver(row, client)
                    if rows:
                        continue
                    count, due = self.outbox.pending(list(self._by_url))
                except Exception:  # the database is away for a moment: keep the worker alive, try again
                    logger.warning("webhook outbox unavailable; retrying in %.1fs", self._poll_s, exc_info=True)
                    count, due = 1, None
                if count == 0:
                    with self._idle:
                        self._idle.notify_all()
                wait_s = self._poll_s if due is None else min(self._poll_s, max((due - now()).total_seconds(), 0.0))
                self._wake.wait(wait_s)
                self._wake.clear()
        finally:
            if self._client is None:
                client.close()

    def _deliver(self, row: OutboxRow, client: Any) -> None:
        hook = self._by_url[row.url]
        outcome = send(hook, row.event_id, row.event_type, row.body, client)
        delivery = self.outbox.record(row, outcome, hook)
        if outcome.ok:
            logger.info("delivered %s %s to %s (attempt %d)", row.event_type, row.event_id, row.url, delivery.attempts)
        elif outcome.retry and delivery.attempts < hook.max_attempts:
            logger.info("webhook %s failed (%s); attempt %d in %.1fs", row.url, outcome.error,
                        delivery.attempts + 1, hook.backoff(delivery.attempts))
            return
        else:
            logger.warning("gave up delivering %s %s to %s after %d attempt(s): %s",
                           row.event_type, row.event_id, row.url, delivery.attempts, outcome.error)
        self.deliveries.append(delivery)
        del self.deliveries[:-1000]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until no delivery to our webhooks is pending; ``True`` when none is left."""
        if not self.hooks:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.outbox.pending(list(self._by_url))[0] == 0:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if (left is not None and left <= 0) or self._thread is None or not self._thread.is_alive():
                return False
            self._wake.set()
            with self._idle:
                self._idle.wait(0.25 if left is None else min(0.25, left))

    def close(self, timeout: float | None = 30.0) -> None:
        """Wait up to ``timeout`` for pending deliveries, then stop the worker.

        Deliveries still pending stay in the outbox for the next process.
        """
        self.flush(timeout)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            atexit.unregister(self.close)
        if self._owns_outbox:
            self.outbox.dispose()
