"""What no input can break and no client can hog: the hardening numbers (``python -m bench.hardening``).

Against real ``forgeline serve`` / ``forgeline control serve`` processes on loopback:

- **big prompt**: another client's p99 latency, idle vs while 4 MB prompts arrive (goal: +50 ms at most);
- **name flood**: another client's median, idle vs during a flood of 600 random model names (goal: within 2x);
- **trickle**: 40 connections that trickle headers a byte at a time: when each was closed (goal: within the header timeout);
- **SIGTERM mid-upload**: seconds from SIGTERM to exit while an upload hangs (goal: within the grace period);
- **starts**: ``serve --base a --base b --model m`` started N times (goal: every time).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench import harness
from bench.procs import REPO, ServerProcess, free_port, running
from bench.stats import percentiles

logger = logging.getLogger("bench.hardening")

NAME = "hardening"
SETTINGS = {
    "smoke": {"victim_requests": 15, "big_prompts": 1, "big_mb": 1.0, "flood": 100, "trickle": 10, "starts": 1},
    "full": {"victim_requests": 80, "big_prompts": 3, "big_mb": 4.0, "flood": 600, "trickle": 40, "starts": 10},
}
HEADER_TIMEOUT_S = 2.0
GRACE_S = 3
TINY_BASE = REPO / "assets" / "tiny-base"
CHAT = "/v1/chat/completions"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "forgeline", *args]


def setup_registry(work: Path) -> None:
    """Two operator bases (`a`, `b`) and a registered model `m` with a torch engine artifact."""
    from forgeline.finetune.base_models import BaseModelStore
    from registry import lineage
    from registry.client import Registry
    from serving.artifacts.torch_build import build_torch_artifact

    store = BaseModelStore()
    for name in ("a", "b"):
        store.add(name, str(TINY_BASE), actor="bench", replace=True)
    store.dispose()
    artifact = work / "m-torch"
    build_torch_artifact(str(TINY_BASE), None, artifact)
    registry = Registry()
    version = registry.create_version(
        "m", source=str(artifact), run_id=None,
        tags={lineage.engine_tag("torch"): str(artifact), lineage.ADAPTER: "none", lineage.BASE_MODEL: str(TINY_BASE)},
    )  # fmt: skip
    registry.move_alias("m", "production", version.version, actor="bench", reason="bench")
    registry.close()


def _gateway(work: Path, *extra: str) -> ServerProcess:
    port = free_port()
    argv = _cli("serve", "--base", "a", "--base", "b", "--model", "m", "--no-auth", "--device", "cpu", "--port", str(port),
                "--header-timeout", str(HEADER_TIMEOUT_S), *extra)  # fmt: skip
    return ServerProcess("gateway", argv, port=port, log_path=work / f"gateway-{port}.log", env={"OMP_NUM_THREADS": "1"})


async def _victim(client: httpx.AsyncClient, n: int) -> list[float]:
    """Latencies (ms) of ``n`` small chat requests, one after another."""
    body = {"model": "a", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        response = await client.post(CHAT, json=body)
        out.append((time.perf_counter() - t0) * 1000)
        response.raise_for_status()
    return out


async def _with_load(client: httpx.AsyncClient, n: int, load: Any) -> tuple[list[float], Any]:
    task = asyncio.create_task(load)
    await asyncio.sleep(0.2)
    latencies = await _victim(client, n)
    return latencies, await task


def _big_prompt_and_flood(server: ServerProcess, work: dict[str, Any]) -> dict[str, Any]:
    n = work["victim_requests"]
    prompt = ("forgeline serves tiny models " * 200_000)[: int(work["big_mb"] * 1_000_000)]

    async def main() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as victim, \
                httpx.AsyncClient(base_url=server.base_url, timeout=300) as attacker:  # fmt: skip
            await _victim(victim, 3)  # warm up
            idle = await _victim(victim, n)

            async def big() -> list[int]:
                codes = []
                for _ in range(work["big_prompts"]):
                    r = await attacker.post(CHAT, json={"model": "a", "messages": [{"role": "user", "content": prompt}]})
                    codes.append(r.status_code)
                return codes

            loaded, codes = await _with_load(victim, n, big())

            async def flood() -> list[int]:
                sem = asyncio.Semaphore(20)

                async def one() -> int:
                    async with sem:
                        body = {"model": f"random-{uuid.uuid4().hex}", "messages": [{"role": "user", "content": "x"}]}
                        return (await attacker.post(CHAT, json=body)).status_code

                return list(await asyncio.gather(*(one() for _ in range(work["flood"]))))

            idle2 = await _victim(victim, n)
            flooded, flood_codes = await _with_load(victim, n, flood())
        p_idle, p_loaded = percentiles(idle), percentiles(loaded)
        return {
            "big_prompt": {
                "prompt_mb": work["big_mb"], "statuses": codes,
                "victim_ms_idle": p_idle, "victim_ms_during": p_loaded,
                "p99_delta_ms": round(p_loaded["p99"] - p_idle["p99"], 1),
                "goal": "p99_delta_ms <= 50",
            },
            "name_flood": {
                "names": work["flood"], "statuses": sorted(set(flood_codes)),
                "victim_median_ms_idle": round(statistics.median(idle2), 1),
                "victim_median_ms_during": round(statistics.median(flooded), 1),
                "ratio": round(statistics.median(flooded) / statistics.median(idle2), 2),
                "goal": "ratio <= 2",
            },
        }  # fmt: skip

    return asyncio.run(main())


def _trickle(server: ServerProcess, count: int) -> dict[str, Any]:
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(count)]
    for s in socks:
        s.setblocking(False)
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    start = time.monotonic()
    closed: dict[int, float] = {}
    sent = 0
    while len(closed) < count and time.monotonic() - start < HEADER_TIMEOUT_S * 10:
        for i, s in enumerate(socks):
            if i in closed:
                continue
            try:
                s.send(request[sent : sent + 1])
                if s.recv(4096) == b"":
                    closed[i] = time.monotonic() - start
            except BlockingIOError:
                pass
            except OSError:
                closed[i] = time.monotonic() - start
        sent += 1
        time.sleep(0.1)
    for s in socks:
        s.close()
    times = sorted(closed.values())
    return {
        "connections": count, "closed": len(closed), "header_timeout_s": HEADER_TIMEOUT_S,
        "closed_after_s": {"min": round(times[0], 2) if times else None, "max": round(times[-1], 2) if times else None},
        "goal": "all closed, max <= header timeout (+ one poll interval)",
    }  # fmt: skip


def _sigterm_mid_upload(work: Path) -> dict[str, Any]:
    from registry.keys import KeyStore

    keys = KeyStore()
    secret = keys.create("uploader", roles=("trainer",))[0]
    keys.dispose()
    port = free_port()
    argv = _cli("control", "serve", "--port", str(port), "--no-supervise", "--graceful-shutdown", str(GRACE_S))
    server = ServerProcess("control", argv, port=port, log_path=work / "control.log")
    with running(server):
        server.wait_healthy("/health", timeout_s=180)
        upload = socket.create_connection(("127.0.0.1", port))
        upload.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + secret.encode() + b"\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000\r\n\r\n"
            + b'--b\r\nContent-Disposition: form-data; name="file"; filename="d.jsonl"\r\n\r\n' + b'{"messages": []}\n' * 500
        )
        time.sleep(1.0)  # the upload is being read (a running request); the client sends nothing more
        start = time.monotonic()
        os.killpg(server.pid, signal.SIGTERM)
        server.proc.wait(timeout=GRACE_S + 60)
        took = time.monotonic() - start
        upload.close()
    return {"grace_s": GRACE_S, "exit_after_s": round(took, 2), "exit_code": server.proc.returncode,
            "goal": "exit_after_s <= grace_s + 2"}  # fmt: skip


def serve_starts(work: Path, n: int) -> dict[str, Any]:
    ok, seconds, failures = 0, [], []
    for i in range(n):
        server = _gateway(work)
        with running(server):
            try:
                seconds.append(round(server.wait_healthy("/ready", timeout_s=300), 1))
                names = {m["id"] for m in httpx.get(server.base_url + "/v1/models", timeout=10).json()["data"]}
                assert {"a", "b", "m"} <= names, names
                ok += 1
            except (RuntimeError, AssertionError, httpx.HTTPError) as exc:
                failures.append(f"start {i + 1}: {str(exc)[-500:]}")
    return {"command": "forgeline serve --base a --base b --model m", "starts": n, "ok": ok, "ready_s": seconds,
            "failures": failures, "goal": "ok == starts"}  # fmt: skip


def run(setting: str, work: Path) -> dict[str, Any]:
    counts = SETTINGS[setting]
    setup_registry(work)
    result: dict[str, Any] = {"starts": serve_starts(work, counts["starts"])}
    server = _gateway(work)
    with running(server):
        server.wait_healthy("/ready", timeout_s=300)
        result.update(_big_prompt_and_flood(server, counts))
        result["trickle"] = _trickle(server, counts["trickle"])
    result["sigterm_mid_upload"] = _sigterm_mid_upload(work)
    logger.info("%s", result)
    return result


if __name__ == "__main__":
    raise SystemExit(harness.main(NAME, run))
