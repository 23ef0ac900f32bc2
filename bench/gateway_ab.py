"""Interleaved A/B of two gateway versions against one fake worker, in one run.

On a shared box every process's CPU per request moves by a third from one minute to the
next, so two versions measured one after the other say little. Here both run at once and
are measured round by round, in alternating order, and each round gives a paired ratio
(this checkout ÷ the other): claim a difference only when the ratios' range says so.

* default: the whole gateway (`bench.gateway_proc`, as ``forgeline serve`` runs it) as two
  processes, plus the worker called directly; unary and streamed at each ``--concurrency``
  (default 1); gateway CPU per request, p50 added over direct, throughput ÷ direct's.
* ``--app-only``: each version's app driven in its own process through ASGI (no HTTP
  server, no client socket): the CPU of the gateway's own code per request, with much less
  noise from wake-ups. Batches alternate between the two processes.
* ``--clients``: no gateway and no ``--base``: the clients to workers alone (aiohttp's as
  "base", `WireWorkerClient` as "new") in one process, batches alternating, against the fake
  worker; CPU per request of the client's side, unary and 16-token streams, sequential.

    git worktree add /tmp/base main
    python -m bench.gateway_ab --base /tmp/base [--rounds 8] [--requests 600] [--concurrency 1,16]
    python -m bench.gateway_ab --clients [--rounds 40] [--requests 400]
    python -m bench.gateway_ab --base /tmp/base --app-only [--rounds 40] [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VERSIONS = ("base", "new")


def _paired(label: str, base: list[float], new: list[float], unit: str = "ms") -> str:
    ratios = sorted(n / b for n, b in zip(new, base, strict=True) if b > 0)
    return (
        f"{label}: base {statistics.median(base):.3f} {unit} ({min(base):.3f}-{max(base):.3f}), "
        f"new {statistics.median(new):.3f} {unit} ({min(new):.3f}-{max(new):.3f}); new/base per round: "
        f"median {statistics.median(ratios):.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f}, "
        f"{sum(r < 1 for r in ratios)}/{len(ratios)} rounds below 1"
    )


def _uptime() -> str:
    return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])


def whole_gateway(base: Path, rounds: int, requests: int, concurrencies: list[int]) -> None:
    """Both gateways as processes, the worker also called directly; unary and streamed at each concurrency."""
    from bench.gateway_overhead import TOKENS
    from bench.loadgen import run_load
    from bench.procs import ServerProcess, free_port, group_cpu_seconds, python_module

    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        work = Path(tmp)
        os.environ["FORGELINE_HOME"] = str(work / "home")
        port = free_port()
        worker = ServerProcess("upstream", python_module("bench.fake_upstream", "--port", str(port), "--tokens", str(TOKENS)), port=port, log_path=work / "worker.log")
        gateways: dict[str, ServerProcess] = {}
        try:
            worker.wait_healthy()
            for name, code in zip(VERSIONS, (base, REPO), strict=True):
                port = free_port()
                command = [sys.executable, "-P", "-m", "bench.gateway_proc", "--upstream", worker.base_url, "--port", str(port), "--key-file", str(work / f"key-{name}")]
                gateways[name] = ServerProcess(name, command, port=port, log_path=work / f"{name}.log", env={"PYTHONPATH": str(code)})
            for gateway in gateways.values():
                gateway.wait_healthy(timeout_s=240)
            keys = {name: (work / f"key-{name}").read_text().strip() for name in VERSIONS}
            print(_uptime(), flush=True)
            results: dict[tuple[bool, int, str], list[tuple[float, float, float]]] = {}
            cells = [(stream, c) for c in concurrencies for stream in (False, True)]
            for r in range(rounds):
                for stream, c in cells:
                    order = VERSIONS if r % 2 == 0 else VERSIONS[::-1]
                    targets = [("direct", worker, "fake", "none")] + [(n, gateways[n], "bench", keys[n]) for n in order]
                    for name, server, model, key in targets:
                        before = group_cpu_seconds(server.pid)
                        out = asyncio.run(run_load(server.base_url, model=model, api_key=key, concurrency=c, requests=requests,
                                                   stream=stream, max_tokens=TOKENS, warmup=5 * c, time_limit_s=60))  # fmt: skip
                        if out.errors:
                            raise SystemExit(f"{name}: {out.errors} failed requests")
                        sent = out.requests + out.warmup_requests
                        cpu_ms = (group_cpu_seconds(server.pid) - before) * 1000 / sent
                        results.setdefault((stream, c, name), []).append((out.e2e_ms["p50"], cpu_ms, out.requests_per_s))
                print(f"round {r + 1}/{rounds} done, {_uptime()}", flush=True)
            print(_uptime())
            for stream, c in cells:
                cell = f"{'streamed' if stream else 'unary'} c{c}"
                direct = [p50 for p50, _, _ in results[(stream, c, "direct")]]
                cpu = {n: [cpu for _, cpu, _ in results[(stream, c, n)]] for n in VERSIONS}
                added = {n: [p50 - d for (p50, _, _), d in zip(results[(stream, c, n)], direct, strict=True)] for n in VERSIONS}
                print(_paired(f"{cell} gateway CPU per request", cpu["base"], cpu["new"]))
                diffs = sorted(n - b for n, b in zip(added["new"], added["base"], strict=True))
                print(f"{cell} p50 added: base {statistics.median(added['base']):+.2f} ms, new {statistics.median(added['new']):+.2f} ms; "
                      f"new-base per round: median {statistics.median(diffs):+.2f} ms, range {diffs[0]:+.2f}..{diffs[-1]:+.2f}")  # fmt: skip
                rps = {n: [rps / d for (_, _, rps), (_, _, d) in zip(results[(stream, c, n)], results[(stream, c, "direct")], strict=True)] for n in VERSIONS}
                print(f"{cell} throughput / direct: base {statistics.median(rps['base']):.2f}, new {statistics.median(rps['new']):.2f}")
        finally:
            for gateway in gateways.values():
                gateway.stop()
            worker.stop()


def app_only(base: Path, rounds: int, requests: int) -> None:
    """Each version's app in its own driver process; batches alternate between them."""
    from bench.procs import ServerProcess, free_port, python_module

    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        port = free_port()
        worker = ServerProcess("upstream", python_module("bench.fake_upstream", "--port", str(port), "--tokens", "16"), port=port, log_path=Path(tmp) / "worker.log")
        drivers: dict[str, subprocess.Popen[str]] = {}
        try:
            worker.wait_healthy()
            for name, code in zip(VERSIONS, (base, REPO), strict=True):
                drivers[name] = subprocess.Popen(
                    [sys.executable, "-P", __file__, "--drive", worker.base_url], env={**os.environ, "PYTHONPATH": str(code)},
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=code,
                )  # fmt: skip
            for driver in drivers.values():
                assert driver.stdout is not None and driver.stdout.readline().strip() == "ready"
            print(_uptime(), flush=True)
            cpu: dict[tuple[str, str], list[float]] = {}
            for r in range(rounds):
                for mode in ("unary", "stream"):
                    for name in VERSIONS if r % 2 == 0 else VERSIONS[::-1]:
                        driver = drivers[name]
                        assert driver.stdin is not None and driver.stdout is not None
                        driver.stdin.write(f"{mode} {requests}\n")
                        driver.stdin.flush()
                        cpu.setdefault((mode, name), []).append(float(driver.stdout.readline()))
            print(_uptime())
            for mode in ("unary", "stream"):
                print(_paired(f"{mode} app CPU per request", cpu[(mode, "base")], cpu[(mode, "new")]))
        finally:
            for driver in drivers.values():
                if driver.stdin is not None:
                    driver.stdin.close()
                driver.wait(timeout=60)
            worker.stop()


def clients_only(rounds: int, requests: int) -> None:
    """The clients to workers alone, in this process: aiohttp's ("base") and `WireWorkerClient` ("new")."""
    import uvloop

    from bench.procs import ServerProcess, free_port, python_module

    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        port = free_port()
        worker = ServerProcess("upstream", python_module("bench.fake_upstream", "--port", str(port), "--tokens", "16"), port=port, log_path=Path(tmp) / "worker.log")
        try:
            worker.wait_healthy()
            print(_uptime(), flush=True)
            cpu = uvloop.run(_clients(worker.base_url, rounds, requests))
            print(_uptime())
            for mode in ("unary", "stream"):
                print(_paired(f"{mode} client CPU per request", cpu[(mode, "base")], cpu[(mode, "new")]))
        finally:
            worker.stop()


async def _clients(url: str, rounds: int, requests: int) -> dict[tuple[str, str], list[float]]:
    from serving.engine.worker_http import AiohttpWorkerClient
    from serving.engine.worker_wire import WireWorkerClient

    settings: dict[str, Any] = {"headers": {"Authorization": "Bearer k"}, "connect_timeout": 5.0, "read_timeout": 30.0}
    clients: dict[str, Any] = {"base": AiohttpWorkerClient(**settings), "new": WireWorkerClient(**settings)}
    body = {"model": "fake", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    target = f"{url}/v1/chat/completions"

    async def one(client: Any, mode: str) -> None:
        if mode == "unary":
            if (await client.post_json(target, body, {"x-request-id": "r"}, timeout=30)).status != 200:
                raise SystemExit("the worker did not answer 200")
            return
        async with client.stream(target, streamed, {"x-request-id": "r"}) as response:
            async for _piece in response.chunks():
                pass

    try:
        for client in clients.values():
            for mode in ("unary", "stream"):
                for _ in range(50):
                    await one(client, mode)
        cpu: dict[tuple[str, str], list[float]] = {}
        for r in range(rounds):
            for mode in ("unary", "stream"):
                for name in VERSIONS if r % 2 == 0 else VERSIONS[::-1]:
                    started = time.process_time()
                    for _ in range(requests):
                        await one(clients[name], mode)
                    cpu.setdefault((mode, name), []).append(1000 * (time.process_time() - started) / requests)
        return cpu
    finally:
        for client in clients.values():
            await client.aclose()


async def _drive(upstream: str) -> None:
    """A driver process: builds this version's app, then answers ``unary N`` / ``stream N`` on stdin
    with its CPU ms per request over N requests sent through ASGI."""
    os.environ["FORGELINE_HOME"] = tempfile.mkdtemp(prefix="bench-ab-home-")
    from bench.gateway_proc import build_app

    key_file = Path(os.environ["FORGELINE_HOME"]) / "key"
    app: Any = build_app(upstream, tokenizer=str(REPO / "assets" / "tiny-base"), key_file=key_file, max_new_tokens=256, access_log=False)
    key = key_file.read_text().strip()
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lifespan = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    assert (await outbox.get())["type"] == "lifespan.startup.complete"
    never = asyncio.get_running_loop().create_future()  # the client stays until the answer ends
    bodies = {s: json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16, "stream": s}).encode() for s in (False, True)}

    async def one(stream: bool) -> int:
        body, status, pending = bodies[stream], [0], [True]

        async def receive() -> dict[str, Any]:
            if pending.pop() if pending else False:
                return {"type": "http.request", "body": body, "more_body": False}
            return await never

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]

        headers = [(b"host", b"gateway"), (b"content-type", b"application/json"), (b"authorization", f"Bearer {key}".encode()),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
                 "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "state": {}}  # fmt: skip
        await app(scope, receive, send)
        return status[0]

    for stream in (False, True):
        for _ in range(50):
            if await one(stream) != 200:
                raise SystemExit("the gateway did not answer 200")
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
        mode, count = line.split()
        started = time.process_time()
        for _ in range(int(count)):
            await one(mode == "stream")
        print(f"{1000 * (time.process_time() - started) / int(count):.4f}", flush=True)
    await inbox.put({"type": "lifespan.shutdown"})
    await outbox.get()
    await lifespan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_ab")
    parser.add_argument("--base", type=Path, help="a checkout of the version to compare against (e.g. a worktree of main)")
    parser.add_argument("--rounds", type=int, default=None, help="default 8 (whole gateway) or 40 (--app-only)")
    parser.add_argument("--requests", type=int, default=None, help="per cell and round: default 600 or 400")
    parser.add_argument("--app-only", action="store_true", help="the apps alone, through ASGI in-process")
    parser.add_argument("--clients", action="store_true", help="the clients to workers alone: aiohttp's (base) against worker_wire's (new); no --base")
    parser.add_argument("--concurrency", default="1", help="whole gateway: comma-separated concurrencies (default 1)")
    parser.add_argument("--drive", metavar="UPSTREAM", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drive:
        import uvloop

        uvloop.run(_drive(args.drive))
        return
    if args.clients:
        clients_only(args.rounds or 40, args.requests or 400)
        return
    if args.base is None or not (args.base / "serving").is_dir():
        parser.error("--base must be a checkout of forgeline (a folder with serving/)")
    if args.app_only:
        app_only(args.base.resolve(), args.rounds or 40, args.requests or 400)
    else:
        whole_gateway(args.base.resolve(), args.rounds or 8, args.requests or 600, [int(c) for c in args.concurrency.split(",")])


if __name__ == "__main__":
    main()
