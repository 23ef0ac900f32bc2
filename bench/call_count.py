"""Python calls per request in the real gateway server: a deterministic measure of its work.

On a shared 2-core VM, the gateway's CPU per request moves by a third from minute to
minute, and changes of tens of µs are lost in it. The number of Python calls it makes per
request barely moves at all, so it is the measure to cut first (then confirm the time
with `bench.gateway_ab`).

Starts the fake worker and the gateway as `bench.gateway_overhead` does (the gateway as
`bench.gateway_proc` runs it: uvicorn, uvloop, httptools, keys, quotas, access log), warms
it up, then for each cell (unary, streamed; c1) turns cProfile on inside the gateway
(SIGUSR1), sends ``--requests`` requests, turns it off (SIGUSR2: the stats are written to a
file) and prints the calls per request by layer. cProfile counts every call of a Python
function (a coroutine's or generator's resumption counts as a call) and every call of a
builtin or C method; builtins are charged to the layer of the Python function that called
them. Only the event loop's thread is profiled (the key lookups' executor thread runs once
per cache period, not per request).

    python -m bench.call_count [--requests 1000] [--top 25] [--base /path/to/other/checkout] [--token-delay-ms 1]

With ``--base`` the same is measured for another checkout and both are printed side by side.

A streamed answer costs calls per block of events the gateway reads from the worker, and
how many events one read brings depends on timing (a busier machine batches more): two
runs of the same code differed by a third in blocks per stream. ``--token-delay-ms``
spaces the worker's tokens so that each comes in a read of its own (17 blocks a stream at
c1), which makes streamed counts comparable between versions and runs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STATS_ENV = "BENCH_CALL_COUNT_STATS"

# First match wins: (layer, substrings of a code object's file name).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("uvicorn + httptools (HTTP server protocol)", ("/uvicorn/", "httptools", "serving/gateway/connections")),
    ("starlette / fastapi", ("/starlette/", "/fastapi/")),
    ("metrics + access log (ours, prometheus_client)", ("serving/gateway/metrics", "/prometheus_client/")),
    ("upstream client (worker_wire, upstream, sse_relay)", ("serving/engine/",)),
    ("telemetry, request id (ours, opentelemetry)", ("serving/telemetry", "serving/request_id", "/opentelemetry/")),
    ("gateway app (serving/gateway, the rest)", ("serving/gateway/", "serving/", "registry/")),
    ("pydantic", ("pydantic",)),
    ("logging", ("/logging/",)),
    ("json", ("/json/",)),
    ("asyncio (uvloop in C)", ("/asyncio/", "uvloop")),
)
OTHER = "other (stdlib: contextlib, weakref, enum, ...)"


def layer_of(filename: str) -> str:
    for layer, needles in LAYERS:
        if any(n in filename for n in needles):
            return layer
    return OTHER


def _install_profiler_signals(out_dir: Path) -> None:
    """In the gateway process: SIGUSR1 starts counting, SIGUSR2 stops and writes ``<n>.prof``."""
    import cProfile

    state: dict[str, object] = {"profiler": None, "n": 0}

    def start(_sig: int, _frame: object) -> None:
        profiler = cProfile.Profile()
        state["profiler"] = profiler
        profiler.enable()

    def stop(_sig: int, _frame: object) -> None:
        profiler = state["profiler"]
        if isinstance(profiler, cProfile.Profile):
            profiler.disable()
            n = int(state["n"])  # type: ignore[call-overload]
            tmp = out_dir / f"{n}.tmp"
            profiler.dump_stats(tmp)
            tmp.rename(out_dir / f"{n}.prof")  # whole, or not there yet
            state["n"] = n + 1
            state["profiler"] = None

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


def by_layer(prof: Path) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """(calls per layer, calls per function, all calls) from a cProfile dump."""
    import pstats

    stats = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
    layers: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    total = 0
    for (filename, line, name), (_cc, calls, _tt, _ct, callers) in stats.items():
        total += calls
        if filename == "~":  # a builtin: charged to its callers' layers
            functions[name] += calls
            charged = 0
            for (caller_file, _l, _n), caller_stats in callers.items():
                n = caller_stats[1] if isinstance(caller_stats, tuple) else caller_stats
                layers[layer_of(caller_file)] += n
                charged += n
            layers[OTHER] += max(0, calls - charged)
        else:
            layers[layer_of(filename)] += calls
            short = filename.split("site-packages/")[-1].replace(str(REPO) + "/", "")
            functions[f"{short}:{line}({name})"] += calls
    return layers, functions, total


def measure(
    code: Path, requests: int, warmup: int, save: Path | None = None, token_delay_ms: float = 0.0
) -> dict[str, tuple[collections.Counter[str], collections.Counter[str], int]]:
    """Calls per cell (``unary``, ``stream``) for the gateway in checkout ``code``."""
    import time

    from bench.gateway_overhead import TOKENS
    from bench.loadgen import run_load
    from bench.procs import ServerProcess, free_port, python_module

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-calls-") as tmp:
        work = Path(tmp)
        os.environ["FORGELINE_HOME"] = str(work / "home")
        port = free_port()
        worker = ServerProcess(
            "upstream",
            python_module("bench.fake_upstream", "--port", str(port), "--tokens", str(TOKENS), "--token-delay-ms", str(token_delay_ms)),
            port=port,
            log_path=work / "worker.log",
        )
        gateway = None
        try:
            worker.wait_healthy()
            port = free_port()
            stats_dir = work / "stats"
            stats_dir.mkdir()
            command = [sys.executable, "-P", str(REPO / "bench" / "call_count.py"), "--serve", "--upstream", worker.base_url,
                       "--port", str(port), "--key-file", str(work / "key")]  # fmt: skip
            gateway = ServerProcess(
                "gateway",
                command,
                port=port,
                log_path=work / "gateway.log",
                env={"PYTHONPATH": str(code), STATS_ENV: str(stats_dir)},
            )
            gateway.wait_healthy(timeout_s=240)
            key = (work / "key").read_text().strip()
            for n, stream in enumerate((False, True)):
                load = {
                    "model": "bench",
                    "api_key": key,
                    "concurrency": 1,
                    "stream": stream,
                    "max_tokens": TOKENS,
                    "time_limit_s": 600,
                }
                asyncio.run(run_load(gateway.base_url, requests=warmup, warmup=0, **load))
                os.kill(gateway.pid, signal.SIGUSR1)
                time.sleep(0.5)  # the handler runs when the loop next wakes; it is idle now
                out = asyncio.run(run_load(gateway.base_url, requests=requests, warmup=0, **load))
                if out.errors:
                    raise SystemExit(f"{out.errors} failed requests")
                time.sleep(0.2)
                os.kill(gateway.pid, signal.SIGUSR2)
                prof = stats_dir / f"{n}.prof"
                for _ in range(300):
                    if prof.exists():
                        break
                    time.sleep(0.1)
                results["stream" if stream else "unary"] = by_layer(prof)
                if save is not None:
                    save.mkdir(parents=True, exist_ok=True)
                    (save / f"{'stream' if stream else 'unary'}.prof").write_bytes(prof.read_bytes())
        finally:
            if gateway is not None:
                gateway.stop()
            worker.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.call_count")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--top", type=int, default=25, help="functions with the most calls to list per cell")
    parser.add_argument("--base", type=Path, default=None, help="another checkout, counted the same way")
    parser.add_argument("--token-delay-ms", type=float, default=0.0, help="the worker's pause before each streamed token")
    parser.add_argument("--save", type=Path, default=None, help="keep the cProfile dumps here (<version>/<cell>.prof)")
    args = parser.parse_args(argv)
    versions = {"new": REPO} if args.base is None else {"base": args.base, "new": REPO}
    counted = {
        name: measure(code, args.requests, args.warmup, args.save and args.save / name, args.token_delay_ms)
        for name, code in versions.items()
    }
    n = args.requests
    for cell in ("unary", "stream"):
        print(f"\n## {cell}, c1: Python calls per request ({n} requests)\n")
        print("| layer | " + " | ".join(versions) + " |")
        print("|---|" + "---|" * len(versions))
        layers = [layer for layer, _ in LAYERS] + [OTHER]
        for layer in layers:
            print(f"| {layer} | " + " | ".join(f"{counted[v][cell][0][layer] / n:.0f}" for v in versions) + " |")
        print("| **all** | " + " | ".join(f"**{counted[v][cell][2] / n:.0f}**" for v in versions) + " |")
        for v in versions:
            print(f"\n{v}, {cell}: the {args.top} functions with the most calls per request")
            for function, calls in counted[v][cell][1].most_common(args.top):
                print(f"  {calls / n:7.1f}  {function}")
    return 0


def serve(argv: list[str]) -> None:
    """The gateway process: `bench.gateway_proc` with the profiler's signals installed."""
    _install_profiler_signals(Path(os.environ[STATS_ENV]))
    from bench.gateway_proc import main as gateway_main

    gateway_main(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2:])
    else:
        raise SystemExit(main())
