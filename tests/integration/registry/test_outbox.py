"""The webhook outbox on SQLite and PostgreSQL: two dispatchers on one database (two
processes of a deployment) deliver each queued event once, including events queued
before either started."""

from __future__ import annotations

import base64
import threading

import httpx
import pytest

from registry.events import ID_HEADER, Webhook, WebhookDispatcher, WebhookOutbox

pytestmark = pytest.mark.integration

HOOK = Webhook(url="http://receiver.test/hook", secret="whsec_" + base64.b64encode(b"0123456789abcdef0123").decode(),
               backoff_s=0.01, max_backoff_s=0.05)


def test_events_queued_before_start_are_delivered_once_by_two_workers(empty_db: str) -> None:
    received: list[str] = []
    lock = threading.Lock()

    def receiver(request: httpx.Request) -> httpx.Response:
        with lock:
            received.append(request.headers[ID_HEADER])
        return httpx.Response(200)

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    before = WebhookDispatcher([HOOK], url=empty_db, client=httpx.Client(transport=httpx.MockTransport(down)), poll_s=0.05)
    queued = [before.publish("promoted", model="m", actor="a", version=v) for v in range(1, 6)]
    before.close(timeout=0.2)  # the receiver was down: everything is still pending

    workers = [WebhookDispatcher([HOOK], url=empty_db, client=httpx.Client(transport=httpx.MockTransport(receiver)),
                                 poll_s=0.05) for _ in range(2)]
    more = [workers[i % 2].publish("approved", model="m", actor="b", version=i) for i in range(6)]
    try:
        assert all(w.flush(timeout=60) for w in workers)
    finally:
        for w in workers:
            w.close()
    ids = [e.id for e in queued + more if e is not None]
    assert sorted(received) == sorted(ids)  # each event exactly once, none lost
    outbox = WebhookOutbox(empty_db)
    assert {row["state"] for row in outbox.rows()} == {"delivered"}
    outbox.dispose()
