"""The production gateway over real sockets with the stock ``openai`` SDK: keys, quotas,
multi-LoRA routing, metrics, access logs and bad requests."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from registry.keys import KeyStore
from serving.engine.torch_engine import BASE_ADAPTER, TorchEngine
from serving.gateway.app import ServedModel, StaticCatalog, create_app
from serving.gateway.server import serve_in_background
from tests.support.polling import wait_for

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Hello, world!"}]
MAX_BODY = 32 * 1024


@dataclass
class Prod:
    base_url: str
    keys: KeyStore
    engine: TorchEngine
    key: str  # an unlimited key for every model

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=key or self.key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def prod(tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prod]:
    keys = KeyStore(f"sqlite:///{tmp_path_factory.mktemp('keys') / 'control.db'}")
    engine = TorchEngine(
        tiny_base, device="cpu", model_id="tiny", batch_window_ms=150, adapters=tiny_adapters, max_loaded_adapters=4
    )
    served = ServedModel(name="tiny", version="1", engine=engine, aliases=("tiny@production",), artifact=str(tiny_base))
    owned = ServedModel(name="ft-acme-tiny", version="1", engine=engine, org="acme")  # a fine-tuned version of org acme
    app = create_app(StaticCatalog([served, owned]), max_new_tokens=64, keys=keys, key_cache_s=0.2, max_body_bytes=MAX_BODY)
    base_url, stop = serve_in_background(app)
    secret, _ = keys.create("tests")
    try:
        yield Prod(base_url, keys, engine, secret)
    finally:
        stop()
        keys.dispose()


def _metrics(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{base_url}/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, v2) in ls for k, v2 in labels.items()))


def test_probes_need_no_key(prod: Prod) -> None:
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{prod.base_url}{path}").status_code == 200, path


def test_missing_and_wrong_keys_are_401(prod: Prod) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2}
    missing = httpx.post(f"{prod.base_url}/v1/chat/completions", json=body)
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{prod.base_url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError) as info:
        prod.client("fl-not-a-real-key-at-all-000000000000000000").chat.completions.create(**body)
    assert info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        prod.client("sk-something-else").models.list()


def test_revoked_key_stops_working(prod: Prod) -> None:
    secret, record = prod.keys.create("short-lived")
    client = prod.client(secret)
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices
    prod.keys.revoke(record.id)
    time.sleep(0.3)  # the gateway trusts a verified key for key_cache_s=0.2
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)


def test_key_sees_and_uses_only_its_models(prod: Prod) -> None:
    secret, _ = prod.keys.create("prod-only", models="tiny@production")
    client = prod.client(secret)
    assert [m.id for m in client.models.list()] == ["tiny@production"]
    assert client.chat.completions.create(model="tiny@production", messages=MESSAGES, max_tokens=2).choices
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert info.value.code == "permission_denied" and info.value.param == "model"
    with pytest.raises(openai.PermissionDeniedError):
        client.models.retrieve("tiny")
    everything = [m.id for m in prod.client().models.list()]
    assert everything == ["tiny", "tiny@production"]


def test_an_organisations_versions_exist_only_for_its_keys(prod: Prod) -> None:
    acme = prod.client(prod.keys.create("acme-app", org="acme")[0])
    assert "ft-acme-tiny" in [m.id for m in acme.models.list()]
    assert acme.chat.completions.create(model="ft-acme-tiny", messages=MESSAGES, max_tokens=2).choices
    globex = prod.client(prod.keys.create("globex-app", org="globex")[0])
    assert "ft-acme-tiny" not in [m.id for m in globex.models.list()]
    with pytest.raises(openai.NotFoundError) as info:  # 404, not 403: another org's model is not even named
        globex.chat.completions.create(model="ft-acme-tiny", messages=MESSAGES, max_tokens=2)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        globex.models.retrieve("ft-acme-tiny")
    assert globex.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices  # shared bases stay open


def test_rpm_quota_gives_429_with_retry_after(prod: Prod) -> None:
    secret, _ = prod.keys.create("rpm-2", rpm=2)
    client = prod.client(secret)
    remaining = []
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(model="tiny", messages=MESSAGES, max_tokens=2)
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        remaining.append(raw.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["1", "0"]
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert info.value.code == "rate_limit_exceeded"
    assert 25 <= int(info.value.response.headers["retry-after"]) <= 31
    assert info.value.body["type"] == "rate_limit_error"  # type: ignore[index]
    # Another key is not affected.
    assert prod.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices


def test_tpm_quota_counts_prompt_and_completion_tokens(prod: Prod) -> None:
    secret, _ = prod.keys.create("tpm", tpm=60)
    client = prod.client(secret)
    first = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=40, temperature=0)
    assert first.usage is not None and first.usage.total_tokens > 40
    # The first call spent more than the bucket holds; the debt makes the next one wait.
    with pytest.raises(openai.RateLimitError, match="tokens per minute") as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert int(info.value.response.headers["retry-after"]) >= 1


def test_two_adapters_answer_differently_in_one_batch(prod: Prod, tiny_base: Path, tiny_adapters: dict[str, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "The quick brown fox"
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    enc = tokenizer(prompt, return_tensors="pt")
    expected = {}
    for name, path in tiny_adapters.items():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(path)).eval()
        ids = model.generate(**enc, do_sample=False, max_new_tokens=6)
        expected[f"tiny:{name}"] = tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert expected["tiny:a"] != expected["tiny:b"]

    rows: list[list[str]] = []
    forward = prod.engine._forward

    def record(*args: object) -> object:
        rows.append(list(args[4]))  # type: ignore[arg-type]
        return forward(*args)  # type: ignore[arg-type]

    prod.engine._forward = record  # type: ignore[method-assign]
    answers: dict[str, tuple[str, str]] = {}
    models = ("tiny:a", "tiny:b", "tiny")
    clients = {m: prod.client() for m in models}
    for m in models:  # warm: adapters loaded, connections open, so the three calls arrive together
        clients[m].completions.create(model=m, prompt=prompt, max_tokens=1)
    rows.clear()
    start = threading.Barrier(len(models))

    def ask(model: str) -> None:
        start.wait()
        raw = clients[model].completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
        answers[model] = (raw.parse().choices[0].text, raw.headers.get("x-forgeline-adapter", ""))

    try:
        threads = [threading.Thread(target=ask, args=(m,)) for m in models]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        del prod.engine._forward
    assert answers["tiny:a"] == (expected["tiny:a"], "a")
    assert answers["tiny:b"] == (expected["tiny:b"], "b")
    assert answers["tiny"][0] not in (expected["tiny:a"], expected["tiny:b"])
    assert any(len(set(r)) == 3 and BASE_ADAPTER in r for r in rows), f"no mixed batch in {rows[:3]}"
    with pytest.raises(openai.NotFoundError) as info:
        prod.client().completions.create(model="tiny:nope", prompt=prompt, max_tokens=2)
    assert info.value.code == "model_not_found"


def test_metrics_are_present_and_move(prod: Prod) -> None:
    before = _metrics(prod.base_url)
    stream = prod.client().chat.completions.create(
        model="tiny:a", messages=MESSAGES, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    usage = [c.usage for c in stream if c.usage][-1]
    after = _metrics(prod.base_url)
    for name in (
        "forgeline_time_to_first_token_seconds_count",
        "forgeline_inter_token_latency_seconds_count",
        "forgeline_e2e_request_latency_seconds_count",
        "forgeline_batch_size_count",
    ):
        assert _total(after, name) > _total(before, name), name
    grew = _total(after, "forgeline_requests_total", adapter="a", status="200") - _total(
        before, "forgeline_requests_total", adapter="a", status="200"
    )
    assert grew == 1
    assert _total(after, "forgeline_prompt_tokens_total", adapter="a") - _total(
        before, "forgeline_prompt_tokens_total", adapter="a"
    ) == usage.prompt_tokens
    assert _total(after, "forgeline_generation_tokens_total", adapter="a") - _total(
        before, "forgeline_generation_tokens_total", adapter="a"
    ) == usage.completion_tokens
    assert _total(after, "forgeline_loaded_adapters") >= 1
    assert ("forgeline_num_requests_waiting", (("model", "tiny"), ("version", "1"))) in after
    # Failures are counted by status too.
    with pytest.raises(openai.NotFoundError):
        prod.client().chat.completions.create(model="tiny:nope", messages=MESSAGES, max_tokens=2)
    assert _total(_metrics(prod.base_url), "forgeline_requests_total", status="404") >= 1


def test_access_log_is_structured_and_has_no_prompt(prod: Prod, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="forgeline.access")
    secret_prompt = "my-secret-prompt-text-42"
    prod.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": secret_prompt}], max_tokens=3)
    # The access line is written once the response has gone out: wait for it, not a fixed time.
    def chat_lines() -> list[dict]:
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "forgeline.access"]
        return [e for e in lines if e["path"] == "/v1/chat/completions"]

    wait_for("the chat completion's access line", chat_lines, timeout_s=10, every_s=0.01)
    entry = chat_lines()[0]
    assert entry["status"] == 200 and entry["model"] == "tiny" and entry["served"] == "tiny/1"
    assert entry["key_id"] and entry["prompt_tokens"] > 0 and entry["completion_tokens"] == 3
    assert secret_prompt not in caplog.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "messages": "not a list"}, "messages"),
        ({"model": "tiny", "messages": MESSAGES, "max_tokens": "many"}, "max_tokens"),
        ({"model": "tiny", "messages": MESSAGES, "max_tokens": -5}, "max_tokens"),
        ({"model": "tiny", "messages": MESSAGES, "temperature": "hot"}, "temperature"),
        ({"model": 7, "messages": MESSAGES}, "model"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"model": "tiny", "messages": MESSAGES, "frobnicate": True}, "frobnicate"),
        ({"model": "tiny", "prompt": "x", "messages": MESSAGES}, "prompt"),
    ],
)
def test_bad_requests_are_400_openai_errors(prod: Prod, body: dict, param: str) -> None:
    response = httpx.post(
        f"{prod.base_url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {prod.key}"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_oversize_prompts_are_413_or_400_never_500(prod: Prod) -> None:
    headers = {"authorization": f"Bearer {prod.key}"}
    huge = {"model": "tiny", "messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]}
    response = httpx.post(f"{prod.base_url}/v1/chat/completions", json=huge, headers=headers)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    # Fits the body limit but not the 512-token context: OpenAI's context-length 400.
    long = {"model": "tiny", "prompt": "fox " * 2000, "max_tokens": 4}
    response = httpx.post(f"{prod.base_url}/v1/completions", json=long, headers=headers)
    assert response.status_code == 400
    assert "maximum context length" in response.json()["error"]["message"]
    # Chunked upload without Content-Length is limited too.
    chunks = iter([b'{"model": "tiny", "prompt": "', b"y" * (MAX_BODY + 1), b'"}'])
    response = httpx.post(
        f"{prod.base_url}/v1/completions", content=chunks, headers={**headers, "content-type": "application/json"}
    )
    assert response.status_code == 413
