"""Benchmark 1: what a gateway adds in front of a fast OpenAI-compatible worker.

Three targets in front of one fake worker (`bench.fake_upstream`: fixed tokens, no
model, its own process), driven by the same load generator (`bench.loadgen`, the stock
``openai`` async client) at each concurrency, streamed and not:

* ``direct``: the client calls the worker itself (the baseline);
* ``forgeline``: the forgeline gateway (`bench.gateway_proc`: API keys on, quotas,
  metrics, access log, `UpstreamEngine` passing chat through whole to the worker's
  ``/v1/chat/completions``, as production does for a chat-capable worker);
* ``forgeline-2p``: the same gateway as two processes on one port (``--workers 2``; the
  ``full`` setting only), to see how throughput scales with processes;
* ``litellm``: the LiteLLM proxy (``litellm[proxy]``, master key on) relaying to the
  worker's ``/v1/chat/completions``; run from ``bench/.venv-litellm`` (its pins conflict
  with ours), skipped with a note when that venv is missing (``make bench`` creates it).

Each round measures every (mode, concurrency) cell on every target, targets in a rotating
order, so drifting load on a shared machine hits all of them alike. Per round the added
latency is the target's percentile minus direct's, and the throughput ratio is the
target's requests/s over direct's; the result reports their median and range over rounds.
The CPU time each server process used per request is recorded too: unlike latency it does
not grow while a process waits for a core, so it compares the gateways' own cost even on
a busy machine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import harness
from bench.loadgen import run_load
from bench.procs import REPO, ServerProcess, free_port, group_cpu_seconds, python_module
from bench.stats import spread

logger = logging.getLogger(__name__)

NAME = "gateway_overhead"
LITELLM_VENV = REPO / "bench" / ".venv-litellm"
LITELLM_KEY = "sk-bench-master-key"
TOKENS = 16

SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": {"rounds": 1, "concurrency": [1, 4], "requests": {1: 10, 4: 20}, "cell_time_s": 5.0, "modes": [False, True], "budget_s": 120.0, "gateway_workers": [1]},
    "full": {
        "rounds": 3,
        "concurrency": [1, 16, 64],
        "requests": {1: 120, 16: 240, 64: 480},
        "cell_time_s": 3.0,
        "modes": [False, True],
        "gateway_workers": [1, 2],
        # Measuring stops after the round that would overrun this (startup not counted).
        "budget_s": 150.0,
    },
}
WARMUP_MAX = 16  # warm-up requests per cell at most (a slow proxy at concurrency 64 would take long)

GOALS = {"p50_added_ms": 1.0, "p99_added_ms": 5.0, "throughput_ratio": 0.9}


@dataclass
class Target:
    """A server under test and how the load generator addresses it."""

    server: ServerProcess
    model: str
    api_key: str


def litellm_bin() -> Path | None:
    """The LiteLLM proxy's entry point, if its venv is installed."""
    exe = LITELLM_VENV / "bin" / "litellm"
    return exe if exe.is_file() else None


def _litellm_version() -> str | None:
    meta = sorted((LITELLM_VENV / "lib").glob("python*/site-packages/litellm-*.dist-info"))
    return meta[0].name.removeprefix("litellm-").removesuffix(".dist-info") if meta else None


def _start_servers(work: Path, *, with_litellm: bool, gateway_workers: list[int]) -> dict[str, Target]:
    """The worker first, then the gateways in parallel (each takes tens of seconds to import)."""
    logs = work / "logs"
    port = free_port()
    upstream = ServerProcess("upstream", python_module("bench.fake_upstream", "--port", str(port), "--tokens", str(TOKENS)), port=port, log_path=logs / "upstream.log")
    servers = {"direct": upstream}
    try:
        upstream.wait_healthy()
        key_files: dict[str, Path] = {}
        for n in gateway_workers:
            name = "forgeline" if n == 1 else f"forgeline-{n}p"
            port = free_port()
            key_files[name] = work / f"{name}-key.txt"
            servers[name] = ServerProcess(
                name,
                python_module("bench.gateway_proc", "--upstream", upstream.base_url, "--port", str(port),
                              "--key-file", str(key_files[name]), "--workers", str(n)),
                port=port,
                log_path=logs / f"{name}.log",
            )
        exe = litellm_bin()
        if with_litellm and exe is not None:
            config = work / "litellm.yaml"
            config.write_text(
                "model_list:\n"
                "  - model_name: bench\n"
                "    litellm_params:\n"
                "      model: openai/fake\n"
                f"      api_base: {upstream.base_url}/v1\n"
                "      api_key: none\n"
                "general_settings:\n"
                f"  master_key: {LITELLM_KEY}\n"
            )
            port = free_port()
            servers["litellm"] = ServerProcess(
                "litellm",
                [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--telemetry", "False"],
                port=port,
                log_path=logs / "litellm.log",
                # No network here: use the cost map shipped in the package instead of fetching it.
                env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "PYTHONPATH": ""},
            )
        waits: dict[str, Callable[[], float]] = {
            name: (lambda name=name: servers[name].wait_healthy("/health", timeout_s=240)) for name in key_files  # type: ignore[misc]
        }
        if "litellm" in servers:
            waits["litellm"] = lambda: servers["litellm"].wait_healthy("/health/liveliness", timeout_s=240)
        with ThreadPoolExecutor(len(waits)) as pool:
            futures = {name: pool.submit(fn) for name, fn in waits.items()}
            for name, future in futures.items():
                logger.info("%s healthy after %.1f s", name, future.result())
        targets = {
            "direct": Target(upstream, "fake", "none"),
            **{name: Target(servers[name], "bench", path.read_text().strip()) for name, path in key_files.items()},
        }
        if "litellm" in servers:
            targets["litellm"] = Target(servers["litellm"], "bench", LITELLM_KEY)
        return targets
    except BaseException:
        for server in servers.values():
            server.stop()
        raise


def _cell_key(stream: bool, concurrency: int) -> str:
    return f"{'stream' if stream else 'unary'}-c{concurrency}"


def run(setting: str, work: Path) -> dict[str, Any]:
    cfg = SETTINGS[setting]
    budget = cfg["budget_s"] * harness.time_scale()
    exe = litellm_bin()
    notes: list[str] = []
    if exe is None:
        notes.append("LiteLLM skipped: bench/.venv-litellm is missing (`make bench` installs litellm[proxy] there).")
    servers = _start_servers(work, with_litellm=exe is not None, gateway_workers=cfg.get("gateway_workers", [1]))
    targets = list(servers)  # direct first
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {t: {} for t in targets}
    measuring = time.perf_counter()
    rounds_done = 0
    try:
        for round_no in range(cfg["rounds"]):
            round_began = time.perf_counter()
            for stream in cfg["modes"]:
                for c in cfg["concurrency"]:
                    key = _cell_key(stream, c)
                    order = targets[round_no % len(targets) :] + targets[: round_no % len(targets)]
                    for target in order:
                        t = servers[target]
                        began = time.perf_counter()
                        cpu_before = group_cpu_seconds(t.server.pid)
                        result = asyncio.run(
                            run_load(
                                t.server.base_url,
                                model=t.model,
                                api_key=t.api_key,
                                concurrency=c,
                                requests=cfg["requests"][c],
                                stream=stream,
                                max_tokens=TOKENS,
                                warmup=min(c, WARMUP_MAX),
                                time_limit_s=cfg["cell_time_s"],
                            )
                        )
                        sent = result.requests + result.errors + result.warmup_requests
                        cpu_ms = (group_cpu_seconds(t.server.pid) - cpu_before) * 1000 / sent if sent else None
                        raw[target].setdefault(key, []).append(result.to_dict() | {"server_cpu_ms_per_request": cpu_ms})
                        logger.info(
                            "round %d %-9s %-10s p50 %.2f ms p99 %.2f ms %.0f req/s cpu %.2f ms/req errors %d (%.1f s)",
                            round_no, target, key, result.e2e_ms["p50"] or -1, result.e2e_ms["p99"] or -1,
                            result.requests_per_s, cpu_ms or -1, result.errors, time.perf_counter() - began,
                        )  # fmt: skip
            rounds_done += 1
            spent = time.perf_counter() - measuring
            if round_no + 1 < cfg["rounds"] and spent + (time.perf_counter() - round_began) > budget:
                notes.append(f"stopped after {rounds_done} of {cfg['rounds']} rounds: the next would overrun the {budget:.0f} s budget")
                logger.warning(notes[-1])
                break
    finally:
        for t in servers.values():
            t.server.stop()
    return {
        "goals": GOALS,
        "rounds_done": rounds_done,
        "tokens_per_answer": TOKENS,
        "settings": {k: v for k, v in cfg.items() if k != "requests"} | {"requests": {str(k): v for k, v in cfg["requests"].items()}},
        "targets": {
            "direct": "fake worker (Starlette on uvicorn, asyncio loop, h11)",
            "forgeline": "forgeline gateway: auth on, quotas, metrics, one JSON access log; UpstreamEngine, chat passed through "
                         "to the worker's /v1/chat/completions; uvicorn on uvloop + httptools",
            **{t: f"the forgeline gateway as {t.split('-')[1][:-1]} processes (--workers)" for t in targets if t.startswith("forgeline-")},
            **({"litellm": f"LiteLLM proxy {_litellm_version()}: master key, no database; uvicorn uvloop, h11"} if "litellm" in servers else {}),
        },
        "load_generator": "openai AsyncOpenAI (closed loop), chat.completions, max_tokens=16",
        "cpus": os.cpu_count(),
        "notes": notes,
        "raw": raw,
        "summary": summarise(raw, [t for t in targets if t != "direct"]),
    }


def summarise(raw: dict[str, dict[str, list[dict[str, Any]]]], targets: list[str]) -> dict[str, Any]:
    """Per cell and target: added p50/p99 (e2e, and TTFT when streamed) and the throughput ratio, over rounds."""
    out: dict[str, Any] = {}
    for key, direct_rounds in raw["direct"].items():
        cell: dict[str, Any] = {"direct": _absolute(direct_rounds)}
        for target in targets:
            rounds = raw.get(target, {}).get(key, [])
            pairs = list(zip(direct_rounds, rounds, strict=False))
            cell[target] = {
                **_absolute(rounds),
                "p50_added_ms": spread([_diff(t["e2e_ms"]["p50"], d["e2e_ms"]["p50"]) for d, t in pairs]),
                "p99_added_ms": spread([_diff(t["e2e_ms"]["p99"], d["e2e_ms"]["p99"]) for d, t in pairs]),
                "ttft_p50_added_ms": spread([_diff(t["ttft_ms"]["p50"], d["ttft_ms"]["p50"]) for d, t in pairs]),
                "throughput_ratio": spread(
                    [t["requests_per_s"] / d["requests_per_s"] if d["requests_per_s"] else None for d, t in pairs]
                ),
                "errors": sum(r["errors"] for r in rounds),
            }
        out[key] = cell
    return out


def _absolute(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "p50_ms": spread([r["e2e_ms"]["p50"] for r in rounds]),
        "p99_ms": spread([r["e2e_ms"]["p99"] for r in rounds]),
        "ttft_p50_ms": spread([r["ttft_ms"]["p50"] for r in rounds]),
        "requests_per_s": spread([r["requests_per_s"] for r in rounds]),
        # CPU the server process itself spent per request (direct: the fake worker's).
        "server_cpu_ms_per_request": spread([r.get("server_cpu_ms_per_request") for r in rounds]),
    }


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


if __name__ == "__main__":
    raise SystemExit(harness.main(NAME, run))
