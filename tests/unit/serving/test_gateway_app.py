"""Gateway behaviour that needs no model: readiness, catalog, error shapes, stream errors.

Drives the ASGI app in-process through httpx; a scripted engine stands behind the Engine seam.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from registry.errors import ConflictError, ErrorCode, ForgelineError, ModelNotFoundError
from serving.engine.base import Chunk, EngineStats, SamplingDefaults, SamplingParams
from serving.engine.torch_engine import TorchEngine
from serving.gateway.app import ServedModel, StaticCatalog, create_app
from serving.gateway.generation import resolve_model


class ScriptedEngine:
    """Streams fixed chunks, then optionally fails; records what it was asked."""

    def __init__(self, chunks: list[Chunk], fail_with: Exception | None = None) -> None:
        self.model_id = "scripted"
        self.reports_logprobs = False
        self.serves_adapters = True
        self.step_listener = None
        self.ready = True
        self.chunks = chunks
        self.fail_with = fail_with
        self.calls: list[tuple[str, SamplingParams, str | None]] = []

    async def start(self) -> None:
        self.ready = True

    async def stop(self) -> None:
        self.ready = False

    def render_chat(self, messages: list[dict[str, str]], *, adapter: str | None = None) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stats(self) -> EngineStats:
        return EngineStats(waiting=0, running=len(self.calls), loaded_adapters=())

    async def generate(
        self, prompt: str, params: SamplingParams, *, adapter: str | None = None
    ) -> AsyncIterator[Chunk]:
        self.calls.append((prompt, params, adapter))
        for chunk in self.chunks:
            yield chunk
        if self.fail_with is not None:
            raise self.fail_with


def _post(app: object, path: str, body: dict) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            return await client.post(path, json=body)

    return asyncio.run(main())


def _get(app: object, path: str) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            return await client.get(path)

    return asyncio.run(main())


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 5}


def test_ready_is_503_until_engines_start(tiny_artifact: Path) -> None:
    engine = TorchEngine(tiny_artifact, device="cpu")
    app = create_app(StaticCatalog([ServedModel(name="tiny", version="1", engine=engine)]))
    # httpx's ASGI transport does not run the lifespan, so the engine is never started.
    assert _get(app, "/health").status_code == 200
    ready = _get(app, "/ready")
    assert ready.status_code == 503
    assert ready.json() == {"status": "not_ready", "models": {"tiny": False}}


def test_catalog_names_aliases_and_adapters() -> None:
    engine = ScriptedEngine([])
    served = ServedModel(name="m", version="3", engine=engine, aliases=("m@production", "m@3"))
    catalog = StaticCatalog([served])
    assert catalog.resolve("m@production") is served
    assert resolve_model(catalog, "m@3:support") == (served, "support")
    with pytest.raises(ModelNotFoundError):
        resolve_model(catalog, "other:support")
    with pytest.raises(ConflictError, match="m@3"):
        catalog.add(ServedModel(name="n", version="1", engine=engine, aliases=("m@3",)))


def test_request_fields_reach_the_engine() -> None:
    engine = ScriptedEngine([Chunk("Hel", [1, 2]), Chunk("lo", [3], "stop")])
    app = create_app(StaticCatalog([ServedModel(name="m", version="1", engine=engine)]))
    body = {**CHAT, "model": "m:support", "temperature": 0, "stop": "END", "seed": 5}
    response = _post(app, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello"
    assert response.json()["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    prompt, params, adapter = engine.calls[0]
    assert prompt == "user: hi there\nassistant: "
    assert (params.max_tokens, params.temperature, params.stop, params.seed) == (5, 0, ["END"], 5)
    assert adapter == "support"


def test_logprobs_are_refused_by_name_when_the_engine_cannot_report_them() -> None:
    engine = ScriptedEngine([Chunk("Hello", [1], "stop")])
    app = create_app(StaticCatalog([ServedModel(name="m", version="1", engine=engine)]))
    response = _post(app, "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 2})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "logprobs" and "`logprobs`, `top_logprobs` are not supported" in error["message"]
    assert engine.calls == []
    # n needs nothing of the engine: each choice is one more generation.
    response = _post(app, "/v1/chat/completions", {**CHAT, "n": 2})
    assert response.status_code == 200, response.text
    assert [c["index"] for c in response.json()["choices"]] == [0, 1]
    assert response.json()["usage"]["completion_tokens"] == 2


def test_the_models_generation_config_supplies_unset_sampling_defaults(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.6, "top_p": 0.9}')
    defaults = SamplingDefaults.from_model_dir(tmp_path)
    assert defaults == SamplingDefaults(temperature=0.6, top_p=0.9)
    assert SamplingDefaults.from_model_dir(tmp_path / "missing") == SamplingDefaults()
    engine = ScriptedEngine([Chunk("Hi", [1], "stop")])
    app = create_app(StaticCatalog([ServedModel(name="m", version="1", engine=engine, sampling_defaults=defaults)]))
    assert _post(app, "/v1/chat/completions", CHAT).status_code == 200
    assert _post(app, "/v1/completions", {"model": "m", "prompt": "x", "temperature": 0}).status_code == 200
    (_, unset, _), (_, chosen, _) = engine.calls
    assert (unset.temperature, unset.top_p) == (0.6, 0.9)
    assert (chosen.temperature, chosen.top_p) == (0.0, 0.9)


def test_request_id_comes_back_and_a_bad_one_is_replaced() -> None:
    app = create_app(StaticCatalog([ServedModel(name="m", version="1", engine=ScriptedEngine([Chunk("Hi", [1], "stop")]))]))

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            return [
                await client.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": rid})
                for rid in ("req-1", "two words\n", "x" * 200)
            ]

    kept, spaced, long = asyncio.run(main())
    assert kept.headers["x-request-id"] == "req-1"
    for replaced in (spaced, long):
        assert len(replaced.headers["x-request-id"]) == 32 and replaced.headers["x-request-id"].isalnum()


def test_error_during_a_stream_is_sent_as_an_event_before_done() -> None:
    failure = ForgelineError("the engine went away", code=ErrorCode.UNAVAILABLE)
    engine = ScriptedEngine([Chunk("Hi", [1])], fail_with=failure)
    app = create_app(StaticCatalog([ServedModel(name="m", version="1", engine=engine)]))
    response = _post(app, "/v1/chat/completions", {**CHAT, "stream": True})
    assert response.status_code == 200
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "unavailable"
    assert json.loads(events[1])["choices"][0]["delta"]["content"] == "Hi"


def test_engine_error_before_the_first_token_is_a_proper_http_error() -> None:
    failure = ForgelineError("prompt too long", code=ErrorCode.INVALID_REQUEST, param="max_tokens")
    engine = ScriptedEngine([], fail_with=failure)
    app = create_app(StaticCatalog([ServedModel(name="m", version="1", engine=engine)]))
    response = _post(app, "/v1/completions", {"model": "m", "prompt": "x", "stream": True})
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "prompt too long",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "invalid_request",
    }


def test_a_bug_is_a_logged_openai_shaped_500(caplog: pytest.LogCaptureFixture) -> None:
    engine = ScriptedEngine([], fail_with=RuntimeError("boom"))
    app = create_app(StaticCatalog([ServedModel(name="m", version="1", engine=engine)]))
    response = _post(app, "/v1/chat/completions", CHAT)
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "boom" not in error["message"]
    assert any("boom" in (r.exc_text or "") for r in caplog.records)


def test_no_dependency_on_the_request_path_runs_in_the_thread_pool() -> None:
    """FastAPI runs a plain ``def`` dependency (or endpoint) in its thread pool: a hand-off
    and two wake-ups per request. Every gateway route's dependencies are ``async def``."""
    import inspect

    from fastapi.routing import APIRoute

    from serving.gateway.auth import http_routes

    app = create_app(StaticCatalog([ServedModel(name="m", version="1", engine=ScriptedEngine([]))]))

    def calls(dependant: object) -> list[object]:
        found = [getattr(dependant, "call", None)]
        for sub in getattr(dependant, "dependencies", []):
            found += calls(sub)
        return [c for c in found if c is not None]

    routes = [r for r in http_routes(app) if isinstance(getattr(r, "route", r), APIRoute)]
    sync = {
        f"{sorted(route.methods)[0]} {route.path}: {getattr(call, '__name__', call)}"
        for route in (getattr(r, "route", r) for r in routes)
        for call in calls(route.dependant)
        if not inspect.iscoroutinefunction(call) and route.include_in_schema
    }
    assert len(routes) >= 4 and not sync, sync
