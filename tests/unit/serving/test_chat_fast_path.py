"""The chat fast path (`serving.gateway.fast_chat`) answers exactly as the FastAPI route does.

Two gateways over one fake worker (pass-through chat, as production serves a chat-capable
worker): one as `create_app` builds it, one with the fast path taken out, so the FastAPI
route answers everything. The same requests (good, refused, malformed, over quota) must
get the same status, headers, bodies, metrics and access-log fields from both, and the
refusals must come from the fast path itself, not from a fall-through to the route.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from bench.fake_upstream import create_app as fake_worker
from registry.authz import route_keys
from registry.keys import KeyStore
from serving.engine.upstream import UpstreamEngine
from serving.gateway.app import ServedModel, StaticCatalog, create_app
from serving.gateway.auth import ROUTES, http_routes
from serving.gateway.fast_chat import ChatFastPath
from tests.support.polling import wait_for

CHAT = "/v1/chat/completions"
MAX_BODY = 64 * 1024
HI = [{"role": "user", "content": "hi"}]
# Differ per gateway or per call: the worker numbers its answers, the clock moves.
_VOLATILE_HEADERS = {"date", "content-length", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"}
_RETRY_IN = re.compile(r"retry in [0-9.]+ s")  # a 429's wait, in its message
_VOLATILE_FIELDS = {"ts", "duration_ms", "client", "pid", "ttft_ms", "request_id"}


def _gateway(worker_url: str, tokenizer: Path, keys: KeyStore, *, fast: bool) -> FastAPI:
    engine = UpstreamEngine(worker_url, "fake", tokenizer=tokenizer, adapter_mode="none", upstream_api="chat", model_id="m")  # type: ignore[arg-type]
    catalog = StaticCatalog(
        [
            ServedModel(name="m", version="1", engine=engine, chat_relay=engine.chat_relay),
            ServedModel(name="theirs", version="1", engine=engine, chat_relay=engine.chat_relay, org="acme"),
        ]
    )
    app = create_app(catalog, keys=keys, key_cache_s=0, max_body_bytes=MAX_BODY)
    if not fast:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not ChatFastPath]
    return app


@pytest.fixture(scope="module")
def setup(tiny_base: Path) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    from serving.gateway.server import serve_in_background

    worker_url, stop_worker = serve_in_background(fake_worker(tokens=4))
    keys = KeyStore()
    secrets = {
        "user": keys.create("user", roles=("user",))[0],
        "pattern_miss": keys.create("miss", roles=("user",), models="other*")[0],
        "one_rpm": keys.create("one-rpm", roles=("user",), rpm=1, tpm=10_000)[0],
    }
    urls: dict[str, str] = {}
    stops = [stop_worker]
    try:
        for name in ("fast", "route"):
            url, stop = serve_in_background(_gateway(worker_url, tiny_base, keys, fast=name == "fast"))
            urls[name] = url
            stops.append(stop)
        yield urls, secrets
    finally:
        for stop in reversed(stops):
            stop()


def _requests(secrets: dict[str, str]) -> list[tuple[str, dict[str, str], bytes | list[bytes]]]:
    """(what, headers, body) of each request, in order (a list of pieces: sent chunked)."""
    def auth(who: str) -> dict[str, str]:
        return {"authorization": f"Bearer {secrets[who]}", "content-type": "application/json"}

    def body(**fields: Any) -> bytes:
        return json.dumps({"model": "m", "messages": HI, **fields}).encode()

    user = auth("user")
    return [
        ("unary", {**user, "x-request-id": "req-1"}, body(max_tokens=3)),
        ("stream", user, body(stream=True, stream_options={"include_usage": True})),
        ("charset", {**user, "content-type": "application/json; charset=utf-8"}, body()),
        ("tools pass through", user, body(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])),
        ("no key", {"content-type": "application/json"}, body()),
        ("unknown key", {**user, "authorization": "Bearer fl-nope"}, body()),
        ("outside the key's pattern", auth("pattern_miss"), body()),
        ("another org's model", user, body(model="theirs")),
        ("unknown model", user, body(model="nope")),
        ("max_tokens over the limit", user, body(max_completion_tokens=100_000)),
        ("first within quota", auth("one_rpm"), body()),
        ("over quota", auth("one_rpm"), body()),
        # StrictJSONMiddleware's refusals, made by the fast path itself (it sits above it).
        ("unpaired surrogate", user, body().replace(b'"hi"', b'"\\ud800"')),
        ("nested too deep", user, body(user=None).replace(b"null", b"[" * 70 + b"]" * 70)),
        ("over the size limit, chunked", user, [body()[:-1], b', "user": "' + b"x" * MAX_BODY + b'"}']),
        ("over the size limit, declared", user, body(user="x" * MAX_BODY)),
        # These go on to the FastAPI route (its parse and validation word the errors):
        ("missing messages", user, json.dumps({"model": "m"}).encode()),
        ("unknown field", user, body(frobnicate=1)),
        ("not JSON", user, b'{"model": "m",'),
        ("invalid body and no key", {"content-type": "application/json"}, b'{"model": 1}'),
        ("text/plain", {**user, "content-type": "text/plain"}, body()),
        ("empty body", user, b""),
    ]


def _normalised(response: httpx.Response) -> dict[str, Any]:
    headers = {k: v for k, v in response.headers.items() if k not in _VOLATILE_HEADERS}
    if "retry-after" in headers:  # seconds left in the key's window: moves with the clock
        headers["retry-after"] = "<seconds>" if headers["retry-after"].isdigit() else headers["retry-after"]
    if headers.get("x-request-id", "").startswith("req-") is False:
        headers["x-request-id"] = "<generated>" if headers.get("x-request-id") else "<missing>"
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line for line in response.text.split("\n\n") if line]
        content: Any = [e if e == "data: [DONE]" else _drop_ids(json.loads(e.removeprefix("data: "))) for e in events]
    else:
        content = _drop_ids(json.loads(_RETRY_IN.sub("retry in <seconds>", response.text)))
    return {"status": response.status_code, "headers": headers, "content": content}


def _drop_ids(payload: Any) -> Any:
    return {k: v for k, v in payload.items() if k not in ("id", "created")} if isinstance(payload, dict) else payload


def _served_metrics(url: str) -> list[str]:
    text = httpx.get(f"{url}/metrics").text
    wanted = ("forgeline_http_requests_total{", "forgeline_requests_total{", "forgeline_prompt_tokens_total{",
              "forgeline_generation_tokens_total{")  # fmt: skip
    return sorted(line for line in text.splitlines() if line.startswith(wanted))


def _access(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "forgeline.access"]


@pytest.mark.integration
def test_the_fast_path_answers_as_the_route_does(
    setup: tuple[dict[str, str], dict[str, str]], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls, secrets = setup
    fell_through: list[str] = []
    original: Callable[..., Any] = ChatFastPath.fall_through

    async def spy(self: ChatFastPath, scope: dict[str, Any], *args: Any) -> None:
        fell_through.append(current)
        await original(self, scope, *args)

    monkeypatch.setattr(ChatFastPath, "fall_through", spy)
    answers: dict[str, list[dict[str, Any]]] = {}
    logged: dict[str, list[dict[str, Any]]] = {}
    for name, url in urls.items():
        caplog.clear()
        answers[name] = []
        with caplog.at_level(logging.INFO, logger="forgeline.access"):
            for current, headers, content in _requests(secrets):
                sent = iter(content) if isinstance(content, list) else content
                response = httpx.post(f"{url}{CHAT}", headers=headers, content=sent, timeout=30)
                answers[name].append({"what": current, **_normalised(response)})
            # The access line is written once the response has gone out, so the client can
            # hold its answer before the line lands: wait for this run's last one.
            wait_for(
                f"{name}'s access lines", lambda: len(_access(caplog)) >= len(_requests(secrets)), timeout_s=10, every_s=0.01
            )
        logged[name] = [
            {k: v for k, v in json.loads(r.getMessage()).items() if k not in _VOLATILE_FIELDS}
            for r in _access(caplog)
        ]  # fmt: skip
        if name == "fast":
            fast_fell = list(fell_through)

    for fast, route in zip(answers["fast"], answers["route"], strict=True):
        assert fast == route, fast["what"]
    statuses = {a["what"]: a["status"] for a in answers["fast"]}
    assert statuses["unary"] == statuses["stream"] == statuses["tools pass through"] == 200
    assert (statuses["no key"], statuses["outside the key's pattern"], statuses["another org's model"]) == (401, 403, 404)
    assert statuses["over quota"] == 429 and answers["fast"][11]["headers"]["retry-after"]
    assert (statuses["unpaired surrogate"], statuses["nested too deep"]) == (400, 400)
    assert statuses["over the size limit, chunked"] == statuses["over the size limit, declared"] == 413
    assert answers["fast"][0]["headers"]["x-request-id"] == "req-1"
    assert answers["fast"][0]["headers"]["x-forgeline-model-version"] == "m/1"
    assert logged["fast"] == logged["route"] and len(logged["fast"]) == len(_requests(secrets))
    assert _served_metrics(urls["fast"]) == _served_metrics(urls["route"])
    # Everything the fast path can parse it answers itself, refusals included.
    assert fast_fell == ["missing messages", "unknown field", "not JSON", "invalid body and no key", "empty body"]


def test_the_fast_path_is_a_declared_route(tiny_base: Path) -> None:
    app = create_app(StaticCatalog([]))
    assert ChatFastPath in http_routes(app)
    assert ("POST", CHAT) in route_keys([ChatFastPath]) and ("POST", CHAT) in ROUTES
