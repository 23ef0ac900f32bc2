"""``forgeline serve --config ... --workers 2``: two gateway processes on one port share each
key's quota through a real ``redis-server``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from bench.fake_upstream import create_app as fake_worker
from registry.keys import KeyStore
from serving.gateway.server import serve_in_background
from tests.integration.serving.test_redis_quota import redis_url  # noqa: F401 - the fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def worker() -> Iterator[str]:
    url, stop = serve_in_background(fake_worker(tokens=2, name="w0"))
    yield url
    stop()


def test_two_processes_share_the_port_and_one_quota_through_redis(tmp_path: Path, worker: str, redis_url: str) -> None:  # noqa: F811
    keys_url = f"sqlite:///{tmp_path / 'control.db'}"
    store = KeyStore(keys_url)
    secret, _ = store.create("shared", rpm=6)
    port = _free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"port": port, "workers": 2},
        "models": [{"name": "m", "pool": "p", "upstream_model": "fake", "tokenizer": str(REPO / "assets" / "tiny-base")}],
        "pools": {"p": {"urls": [worker], "api": "chat"}},
        "keys": {"db_url": keys_url, "cache_s": 0},
        "quotas": {"redis_url": redis_url},
    }))  # fmt: skip
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "FORGELINE_HOME": str(tmp_path / "home")}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "forgeline", "serve", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        time.sleep(3)  # both processes listening (each answers /ready once its own lifespan ran)
        statuses: list[int] = []
        began = time.monotonic()
        # A new connection each: the kernel hands them to either process. Go on until both
        # processes have answered (the access log names the process), within 60 requests.
        while len(statuses) < 14 or (len(_pids(log)) < 2 and len(statuses) < 60):
            response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                                  headers={"Authorization": f"Bearer {secret}"},
                                  json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
            statuses.append(response.status_code)
        refilled = int((time.monotonic() - began) * 6 / 60)  # the bucket refills 6 a minute
        # /metrics sums both processes' counters, whichever process answers the scrape.
        scrapes = [httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text for _ in range(6)]
    finally:
        proc.terminate()
        proc.wait(30)
    assert len(_pids(log)) == 2, "every request went to one process"
    # One budget of 6 across both processes: the 7th request onwards is refused by either
    # (each process alone would have allowed 6).
    counted = [_summed(text, "forgeline_requests_total{") for text in scrapes]
    assert counted == [len(statuses)] * len(scrapes), (counted, len(statuses))
    # The vLLM names are derived from the summed series too.
    assert {_summed(text, 'vllm:request_success_total{model_name="m"}') for text in scrapes} == {statuses.count(200)}
    assert 6 <= statuses.count(200) <= 6 + refilled and statuses.count(200) + statuses.count(429) == len(statuses), statuses


def _summed(metrics: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(prefix))


def _pids(log: Path) -> set[int]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"ts"')]
    return {line["pid"] for line in lines if line["path"] == "/v1/chat/completions"}
