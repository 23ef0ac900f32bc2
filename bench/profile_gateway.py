"""Where the forgeline gateway spends its time: py-spy samples it under the benchmark's load.

Starts the fake worker and the gateway as `bench.gateway_overhead` does, drives one cell
of load with `bench.loadgen` and records the gateway process with ``py-spy record``
(sampling, no code changes). Prints the functions with the largest share of samples,
inclusive and self, and the gateway's user and system CPU per request, and writes the raw
collapsed stacks next to the results.

Samples are taken of the thread holding the GIL, with the process paused for each sample
(py-spy's default). ``--nonblocking`` (no pause) reads stacks while they change: it tore
about a third of them in the 2026-12-01 profiles (stacks with no root), and it counts a
thread blocked in a system call as busy, which put uvloop's idle wait among the "busy"
samples. Time spent in a write() while holding the GIL still shows (``_HeldWrites.flush``,
aiohttp's ``_writelines``); on a loaded box it is mostly the wait for the core after
waking the reader, so read it next to the system CPU figure, not as CPU.

    python -m bench.profile_gateway [--stream] [--concurrency 1] [--seconds 20] [--quiet]

Needs ``py-spy`` (``pip install py-spy``; ``bench/.venv-litellm/bin/py-spy`` is used when present).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench.gateway_overhead import TOKENS
from bench.harness import RESULTS_DIR
from bench.loadgen import run_load
from bench.procs import REPO, ServerProcess, free_port, python_module

logger = logging.getLogger(__name__)


def py_spy() -> str:
    local = REPO / "bench" / ".venv-litellm" / "bin" / "py-spy"
    found = str(local) if local.is_file() else shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    return found


_LAYERS = (
    ("upstream HTTP client (worker_wire; aiohttp, httpx, httpcore, anyio, h11)",
     ("serving/engine/worker_wire", "aiohttp/", "httpx/", "httpcore/", "anyio/", "h11/")),  # fmt: skip
    ("HTTP server (uvicorn, httptools)", ("uvicorn/", "httptools")),
    ("FastAPI / Starlette", ("fastapi/", "starlette/")),
    ("forgeline (serving/, registry/)", ("serving/", "registry/")),
    ("pydantic", ("pydantic",)),
    ("chat template, tokenizer", ("jinja2/", "transformers/", "tokenizers")),
    ("prometheus_client", ("prometheus_client/",)),
    ("json", ("json/",)),
    ("logging", ("logging/",)),
    ("opentelemetry", ("opentelemetry/",)),
    ("asyncio, event loop (uvloop in C)", ("asyncio/", "uvloop", "runners.py")),
)


def _layer(frame: str) -> str:
    for layer, needles in _LAYERS:
        if any(n in frame for n in needles):
            return layer
    return "other (stdlib, interpreter)"


def _user_system_s(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid`` (the gateway runs as one process here)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _served(gateway: ServerProcess) -> int:
    """Chat requests the gateway answered so far, from its own /metrics."""
    import httpx

    text = httpx.get(f"{gateway.base_url}/metrics", timeout=10).text
    return int(sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith("forgeline_http_requests_total{") and "/v1/chat/completions" in line
    ))  # fmt: skip


def summarise(collapsed: Path, top: int = 30) -> str:
    """Inclusive and self sample shares per function from py-spy's collapsed stacks."""
    inclusive: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    layers: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        # Idle: the event loop waiting in select() is not time spent on requests.
        if any("select (selectors.py" in f for f in frames[-2:]):
            continue
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        self_[frames[-1]] += count
        layers[_layer(frames[-1])] += count
    lines = [f"busy samples: {total}", "", "self share by layer (the innermost frame's package):"]
    lines += [f"  {100 * n / total:5.1f}%  {layer}" for layer, n in layers.most_common()]
    lines += ["", "inclusive share (function and everything it calls):"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    lines += ["", "self share:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in self_.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_gateway")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--quiet", action="store_true", help="gateway without access logs")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "profile")
    parser.add_argument("--nonblocking", action="store_true", help="sample without pausing the gateway (torn stacks)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "httpx2", "openai", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        work = Path(tmp)
        os.environ["FORGELINE_HOME"] = str(work / "home")
        port = free_port()
        upstream = ServerProcess("upstream", python_module("bench.fake_upstream", "--port", str(port), "--tokens", str(TOKENS)), port=port, log_path=work / "upstream.log")
        gateway = None
        try:
            upstream.wait_healthy()
            port = free_port()
            key_file = work / "key"
            extra = ["--quiet"] if args.quiet else []
            gateway = ServerProcess(
                "forgeline",
                python_module("bench.gateway_proc", "--upstream", upstream.base_url, "--port", str(port), "--key-file", str(key_file), *extra),
                port=port,
                log_path=work / "gateway.log",
            )
            gateway.wait_healthy(timeout_s=240)
            key = key_file.read_text().strip()
            tag = f"{'stream' if args.stream else 'unary'}-c{args.concurrency}{'-quiet' if args.quiet else ''}"
            collapsed = args.out / f"gateway-{tag}.txt"
            stop = threading.Event()

            def load() -> None:
                while not stop.is_set():
                    asyncio.run(
                        run_load(gateway.base_url, model="bench", api_key=key, concurrency=args.concurrency, requests=10_000,
                                 stream=args.stream, max_tokens=TOKENS, time_limit_s=2.0, warmup=0)
                    )  # fmt: skip

            thread = threading.Thread(target=load, daemon=True)
            thread.start()
            mode = ["--nonblocking"] if args.nonblocking else ["--gil"]
            served_before, cpu_before = _served(gateway), _user_system_s(gateway.pid)
            subprocess.run(
                [py_spy(), "record", "--pid", str(gateway.pid), "--duration", str(int(args.seconds)), "--rate", "200",
                 "--format", "raw", "--output", str(collapsed), *mode],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            served = _served(gateway) - served_before
            user, system = (after - before for after, before in zip(_user_system_s(gateway.pid), cpu_before, strict=True))
            stop.set()
            thread.join(timeout=30)
            text = summarise(collapsed)
            if served > 0:
                text += (
                    f"\n\ngateway CPU per request while sampled ({served} requests): user {1000 * user / served:.2f} ms, "
                    f"system {1000 * system / served:.2f} ms (sampling itself adds some)"
                )
            (args.out / f"gateway-{tag}-summary.txt").write_text(text + "\n")
            sys.stdout.write(text + "\n")
        finally:
            if gateway is not None:
                gateway.stop()
            upstream.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
