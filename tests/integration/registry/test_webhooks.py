"""Lifecycle events reach a real HTTP receiver on loopback, signed, and are retried after
the receiver fails."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from registry.client import Registry
from registry.decisions import decide
from registry.events import EVENT_HEADER, ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from registry.policy import PromotionPolicy
from registry.promotion import promote, rollback
from tests.support.backends import Backend, trained_version, unique_name

pytestmark = pytest.mark.integration

SECRET = "webhook-secret-0123456789"


class Receiver(ThreadingHTTPServer):
    """Answers 500 to the first delivery of every ``promoted`` event, 200 to everything else."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[dict[str, str], bytes, int]] = []
        self.failed_once: set[str] = set()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks/forgeline"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802  (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        headers = {key: value for key, value in self.headers.items()}
        with self.server.lock:
            delivery = headers[ID_HEADER]
            status = 200
            if headers[EVENT_HEADER] == "promoted" and delivery not in self.server.failed_once:
                self.server.failed_once.add(delivery)
                status = 500
            self.server.requests.append((headers, body, status))
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_events_are_signed_delivered_and_retried(
    backend: Backend, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORGELINE_WEBHOOK_URLS", receiver.url)
    monkeypatch.setenv("FORGELINE_WEBHOOK_SECRET", SECRET)
    registry = Registry()  # webhooks configured from the environment, as in production
    name = unique_name()
    try:
        trained_version(registry, name)
        trained_version(registry, name)
        decide(registry, name, 1, actor="ana", roles=["approver"], decision="approve", comment="good")
        promote(registry, name, 1, policy=PromotionPolicy(), actor="ana")
        promote(registry, name, 2, policy=PromotionPolicy(), actor="bo")
        rollback(registry, name, actor="oncall", reason="bad answers")
        assert registry.events.flush(timeout=60)
        deliveries = list(registry.events.deliveries)
    finally:
        registry.close()

    for headers, body, _ in receiver.requests:
        signed = {"msg_id": headers[ID_HEADER], "timestamp": headers[TIMESTAMP_HEADER], "signature": headers[SIGNATURE_HEADER]}
        assert verify_signature(SECRET, body, **signed), headers
        assert not verify_signature("not-the-secret-at-all", body, **signed)
    accepted = sorted(headers[EVENT_HEADER] for headers, _, status in receiver.requests if status == 200)
    assert accepted == sorted(
        ["registered", "registered", "evaluated", "evaluated", "approved", "promoted", "promoted", "rolled_back"]
    )
    # Each promoted event failed once and was delivered again under the same delivery id.
    promoted = [(h[ID_HEADER], status) for h, _, status in receiver.requests if h[EVENT_HEADER] == "promoted"]
    assert sorted(status for _, status in promoted) == [200, 200, 500, 500]
    assert {d for d, s in promoted if s == 500} == {d for d, s in promoted if s == 200}
    assert sorted((d.event_type, d.ok, d.attempts) for d in deliveries if d.event_type == "promoted") == [
        ("promoted", True, 2),
        ("promoted", True, 2),
    ]
    rolled_back = next(body for h, body, s in receiver.requests if h[EVENT_HEADER] == "rolled_back")
    assert b'"from_version":2' in rolled_back and b'"version":1' in rolled_back and b'"alias":"production"' in rolled_back
