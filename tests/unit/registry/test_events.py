"""Webhook signing, verification and the retry policy (HTTP faked with httpx.MockTransport)."""

from __future__ import annotations

import json

import httpx
import pytest

from registry.errors import ForgelineError
from registry.events import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Event,
    Webhook,
    WebhookDispatcher,
    deliver,
    sign,
    verify_signature,
)

SECRET = "s3cret-s3cret-s3cret"


def hook(**overrides: object) -> Webhook:
    return Webhook.model_validate({"url": "http://receiver.test/hook", "secret": SECRET, **overrides})


def test_signature_round_trip_tamper_and_replay() -> None:
    body = Event(type="promoted", model="m", actor="ana", version=2, alias="production").body()
    ts = 1_700_000_000
    signature = sign(SECRET, ts, body)
    assert signature.startswith("sha256=")
    assert verify_signature(SECRET, body, timestamp=str(ts), signature=signature, at=ts + 10)
    assert not verify_signature("another-secret-xx", body, timestamp=ts, signature=signature, at=ts)
    assert not verify_signature(SECRET, body + b" ", timestamp=ts, signature=signature, at=ts)
    assert not verify_signature(SECRET, body, timestamp=ts + 1, signature=signature, at=ts)  # ts is signed too
    assert not verify_signature(SECRET, body, timestamp=ts, signature=signature, at=ts + 301)  # replay
    assert not verify_signature(SECRET, body, timestamp=None, signature=signature)


def test_retries_server_errors_with_exponential_backoff_then_succeeds() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(503 if len(seen) < 3 else 204)

    waits: list[float] = []
    event = Event(type="approved", model="m", actor="ana", version=1)
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        result = deliver(hook(backoff_s=0.5), event, client=client, sleep=waits.append)
    assert (result.ok, result.attempts, result.status) == (True, 3, 204)
    assert waits == [0.5, 1.0]
    assert {r.headers[DELIVERY_HEADER] for r in seen} == {event.id}  # one id across retries
    for request in seen:
        assert verify_signature(
            SECRET,
            request.content,
            timestamp=request.headers[TIMESTAMP_HEADER],
            signature=request.headers[SIGNATURE_HEADER],
        )
    assert json.loads(seen[-1].content)["type"] == "approved"


def test_client_errors_are_final_and_network_errors_are_retried() -> None:
    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(400, text="bad signature"))) as client:
        refused = deliver(hook(), Event(type="promoted", model="m", actor="a"), client=client, sleep=lambda s: None)
    assert (refused.ok, refused.attempts, refused.status) == (False, 1, 400) and "bad signature" in (refused.error or "")

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    waits: list[float] = []
    with httpx.Client(transport=httpx.MockTransport(down)) as client:
        failed = deliver(hook(max_attempts=4, max_backoff_s=1.0), Event(type="promoted", model="m", actor="a"), client=client, sleep=waits.append)
    assert (failed.ok, failed.attempts, failed.status) == (False, 4, None) and "ConnectError" in (failed.error or "")
    assert waits == [0.5, 1.0, 1.0]  # capped


def test_webhook_config_validation_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="http"):
        hook(url="ftp://x")
    with pytest.raises(ValueError, match="unknown event"):
        hook(events=["exploded"])
    assert hook(events=["promoted"]).wants("promoted") and not hook(events=["promoted"]).wants("approved")

    assert WebhookDispatcher.from_settings().hooks == ()
    assert WebhookDispatcher().publish("promoted", model="m", actor="a") is None  # nothing configured
    monkeypatch.setenv("FORGELINE_WEBHOOK_URLS", "http://a.test/x, http://b.test/y")
    with pytest.raises(ForgelineError, match="FORGELINE_WEBHOOK_SECRET"):
        WebhookDispatcher.from_settings()
    monkeypatch.setenv("FORGELINE_WEBHOOK_SECRET", SECRET)
    assert [h.url for h in WebhookDispatcher.from_settings().hooks] == ["http://a.test/x", "http://b.test/y"]
