"""Quotas shared through a real ``redis-server`` by two gateway processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from registry.keys import KeyStore
from tests.support.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]
MESSAGES = [{"role": "user", "content": "Hello"}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port (Debian: apt-get install redis-server)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    pytest.importorskip("redis", reason="the redis client is not installed (pip install 'forgeline[redis]')")
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def replicas(redis_url: str, tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[str], KeyStore]]:
    keys_url = f"sqlite:///{tmp_path_factory.mktemp('shared-keys') / 'control.db'}"
    store = KeyStore(keys_url)
    store.list()  # create the table before two processes race to
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    script = Path(__file__).with_name("gateway_process.py")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tiny_artifact), keys_url, redis_url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO,
        )
        for _ in range(2)
    ]
    try:
        urls = [p.stdout.readline().strip() for p in procs]  # type: ignore[union-attr]
        assert all(u.startswith("http://") for u in urls), urls
        yield urls, store
    finally:
        for p in procs:
            p.terminate()  # replicas hold nothing worth a graceful shutdown
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        store.dispose()


def test_two_replicas_share_one_requests_per_minute_budget(replicas: tuple[list[str], KeyStore]) -> None:
    urls, store = replicas
    secret, _ = store.create("shared", rpm=3)
    clients = [openai.OpenAI(base_url=f"{u}/v1", api_key=secret, max_retries=0, timeout=60) for u in urls]
    # Three requests spread over both replicas use up the key's budget...
    for client in (clients[0], clients[1], clients[0]):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    # ...so the fourth is refused by either replica, each alone having seen at most two.
    for client in clients:
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
        assert 1 <= int(info.value.response.headers["retry-after"]) <= 21
    # Another key has its own budget on the same Redis.
    other, _ = store.create("other", rpm=3)
    openai.OpenAI(base_url=f"{urls[1]}/v1", api_key=other, max_retries=0).chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=2
    )


def _wait_for_tpm_level_below(redis_url: str, key_id: str, level: float, timeout_s: float = 10.0) -> None:
    """Wait until the key's shared tokens-per-minute bucket is below ``level`` (a charge landed)."""
    import redis

    client = redis.Redis.from_url(redis_url)

    def charged() -> bool:
        stored = client.hget(f"forgeline:quota:{{{key_id}}}:tpm", "level")
        return stored is not None and float(stored) < level

    try:
        wait_for("the completion charge in Redis", charged, timeout_s=timeout_s, every_s=0.02)
    finally:
        client.close()


def test_shared_token_budget_counts_completions_from_the_other_replica(
    replicas: tuple[list[str], KeyStore], redis_url: str
) -> None:
    urls, store = replicas
    secret, record = store.create("tokens", tpm=24)
    a, b = (openai.OpenAI(base_url=f"{u}/v1", api_key=secret, max_retries=0, timeout=60) for u in urls)
    first = a.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    # 24 - prompt - 16 completion tokens are left: less than the next prompt needs.
    assert first.usage is not None and first.usage.completion_tokens == 16 and first.usage.prompt_tokens >= 4
    # The completion charge is written just after the response: wait for it (after the admit
    # the bucket holds 24 - prompt tokens; the charge takes 16 more, refill is 0.4 tokens/s).
    _wait_for_tpm_level_below(redis_url, record.id, 24 - first.usage.prompt_tokens - 8)
    with pytest.raises(openai.RateLimitError, match="tokens per minute"):
        b.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
