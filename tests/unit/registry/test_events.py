"""Webhook signing (Standard Webhooks, checked with the stock verifier), the retry policy
and the outbox worker (HTTP faked with httpx.MockTransport, a real SQLite control DB)."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import standardwebhooks

from registry.errors import ForgelineError
from registry.events import (
    EVENT_HEADER,
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Event,
    Webhook,
    WebhookDispatcher,
    WebhookOutbox,
    sign,
    verify_signature,
)

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
URL = "http://receiver.test/hook"


def hook(**overrides: object) -> Webhook:
    return Webhook.model_validate({"url": URL, "secret": SECRET, "backoff_s": 0.01, **overrides})


def dispatcher(tmp_path: Path, handler: Callable[[httpx.Request], httpx.Response], **overrides: object) -> WebhookDispatcher:
    client = httpx.Client(transport=httpx.MockTransport(handler))
    return WebhookDispatcher([hook(**overrides)], url=f"sqlite:///{tmp_path / 'control.db'}", client=client, poll_s=0.05)


def test_signature_round_trip_tamper_and_replay() -> None:
    body = Event(type="promoted", model="m", actor="ana", version=2, alias="production").body()
    ts = 1_700_000_000
    signature = sign(SECRET, "msg_1", ts, body)
    assert signature.startswith("v1,")
    assert verify_signature(SECRET, body, msg_id="msg_1", timestamp=str(ts), signature=signature, at=ts + 10)
    assert verify_signature(SECRET, body, msg_id="msg_1", timestamp=ts, signature=f"v1,old {signature}", at=ts)
    other = "whsec_" + base64.b64encode(b"another-secret-xx").decode()
    assert not verify_signature(other, body, msg_id="msg_1", timestamp=ts, signature=signature, at=ts)
    assert not verify_signature(SECRET, body + b" ", msg_id="msg_1", timestamp=ts, signature=signature, at=ts)
    assert not verify_signature(SECRET, body, msg_id="msg_2", timestamp=ts, signature=signature, at=ts)  # id is signed
    assert not verify_signature(SECRET, body, msg_id="msg_1", timestamp=ts + 1, signature=signature, at=ts)
    assert not verify_signature(SECRET, body, msg_id="msg_1", timestamp=ts, signature=signature, at=ts + 301)  # replay
    assert not verify_signature(SECRET, body, msg_id="msg_1", timestamp=None, signature=signature)


def test_deliveries_verify_with_the_stock_standard_webhooks_verifier_and_retry(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(503 if len(seen) < 3 else 204)

    events = dispatcher(tmp_path, handler)
    event = events.publish("approved", model="m", actor="ana", version=1)
    assert event is not None and events.flush(timeout=20)
    events.close()

    assert [(d.ok, d.attempts, d.status) for d in events.deliveries] == [(True, 3, 204)]
    assert {r.headers[ID_HEADER] for r in seen} == {event.id}  # one id across retries
    verifier = standardwebhooks.Webhook(SECRET)
    for request in seen:
        payload = verifier.verify(request.content, dict(request.headers))
        assert payload["type"] == "approved" and payload["id"] == event.id
        assert request.headers[EVENT_HEADER] == "approved"
    tampered = dict(seen[0].headers) | {TIMESTAMP_HEADER: str(int(seen[0].headers[TIMESTAMP_HEADER]) + 1)}
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        verifier.verify(seen[0].content, tampered)
    [row] = events.outbox.rows(event.id)
    assert (row["state"], row["attempts"], row["last_status"], row["claimed_until"]) == ("delivered", 3, 204, None)


def test_client_errors_are_final_and_network_errors_give_up_after_max_attempts(tmp_path: Path) -> None:
    refused = dispatcher(tmp_path, lambda r: httpx.Response(400, text="bad signature"))
    refused.publish("promoted", model="m", actor="a")
    assert refused.flush(timeout=20)
    refused.close()
    [delivery] = refused.deliveries
    assert (delivery.ok, delivery.attempts, delivery.status) == (False, 1, 400) and "bad signature" in (delivery.error or "")

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    failing = dispatcher(tmp_path, down, max_attempts=4, max_backoff_s=0.02)
    event = failing.publish("promoted", model="m", actor="a")
    assert event is not None and failing.flush(timeout=20)
    failing.close()
    [delivery] = failing.deliveries
    assert (delivery.ok, delivery.attempts, delivery.status) == (False, 4, None) and "ConnectError" in (delivery.error or "")
    assert [r["state"] for r in failing.outbox.rows(event.id)] == ["failed"]


def test_backoff_doubles_and_is_capped() -> None:
    assert [hook(backoff_s=0.5, max_backoff_s=3).backoff(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3, 3]


def test_pending_deliveries_survive_a_restart_and_are_sent_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'control.db'}"
    received: list[httpx.Request] = []

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    first = WebhookDispatcher([hook(max_backoff_s=0.05, max_attempts=30)], url=url,
                              client=httpx.Client(transport=httpx.MockTransport(down)), poll_s=0.05)
    ids = [first.publish(kind, model="m", actor="a").id for kind in ("registered", "promoted")]  # type: ignore[union-attr]
    assert not first.flush(timeout=0.3)  # the receiver is down
    first.close(timeout=0)
    assert first.deliveries == []
    assert {r["state"] for r in WebhookOutbox(url).rows()} == {"pending"}

    def up(request: httpx.Request) -> httpx.Response:
        received.append(request)
        return httpx.Response(200)

    second = WebhookDispatcher([hook()], url=url, client=httpx.Client(transport=httpx.MockTransport(up)), poll_s=0.05)
    assert second.flush(timeout=20)
    second.close()
    assert sorted(r.headers[ID_HEADER] for r in received) == sorted(ids)  # each event exactly once
    assert sorted(json.loads(r.content)["type"] for r in received) == ["promoted", "registered"]
    assert {r["state"] for r in second.outbox.rows()} == {"delivered"}


def test_webhook_config_validation_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="http"):
        hook(url="ftp://x")
    with pytest.raises(ValueError, match="unknown event"):
        hook(events=["exploded"])
    with pytest.raises(ValueError, match="base64"):
        hook(secret="whsec_not base64 at all!!")
    with pytest.raises(ValueError, match="16 bytes"):
        hook(secret="whsec_" + base64.b64encode(b"twelve bytes").decode())
    assert hook(events=["promoted"]).wants("promoted") and not hook(events=["promoted"]).wants("approved")

    db = f"sqlite:///{tmp_path / 'control.db'}"
    assert WebhookDispatcher.from_settings(db).hooks == ()
    assert WebhookDispatcher(url=db).publish("promoted", model="m", actor="a") is None  # nothing configured
    monkeypatch.setenv("FORGELINE_WEBHOOK_URLS", "http://a.test/x, http://b.test/y")
    with pytest.raises(ForgelineError, match="FORGELINE_WEBHOOK_SECRET"):
        WebhookDispatcher.from_settings(db)
    monkeypatch.setenv("FORGELINE_WEBHOOK_SECRET", SECRET)
    configured = WebhookDispatcher.from_settings(db)
    assert [h.url for h in configured.hooks] == ["http://a.test/x", "http://b.test/y"]
    configured.close(timeout=0)
    assert (ID_HEADER, SIGNATURE_HEADER) == ("webhook-id", "webhook-signature")
