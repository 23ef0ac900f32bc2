"""Run the benchmark suite: ``python -m bench`` (``make bench``).

Each benchmark runs as its own process with a time limit (a stuck one is stopped and
reported, the others still run), writes ``<results>/<name>.json``, and then the generated
sections of BENCHMARKS.md and the plots in ``bench/plots/`` are updated from the results.

    python -m bench                      # the full suite (~10 minutes on 2 idle cores, ~20 on a busy box)
    python -m bench --setting smoke      # tiny counts: checks every benchmark runs (results/smoke/, no report)
    python -m bench --only lead_time     # one benchmark (repeatable); --skip NAME leaves one out
    python -m bench --report-only        # re-render BENCHMARKS.md from existing results
    BENCH_TIME_SCALE=2 python -m bench   # twice the time budgets: on a busy machine, to finish every round
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench import report
from bench.harness import RESULTS_DIR, SETTINGS, time_scale
from bench.procs import REPO

logger = logging.getLogger("bench")


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of the suite and its time limits (seconds) per setting."""

    name: str
    limit_s: dict[str, float]
    argv: tuple[str, ...] = ()  # default: python -m bench.<name> --setting S --results DIR

    def command(self, setting: str, results: Path) -> list[str]:
        if self.argv:
            args = [a.format(results=results, setting=setting) for a in self.argv]
            if setting == "smoke" and "--smoke" not in args:
                args.append("--smoke")
            return [sys.executable, *args]
        return [sys.executable, "-m", f"bench.{self.name}", "--setting", setting, "--results", str(results)]


def suite() -> list[Benchmark]:
    """The benchmarks, in the order they run (training overhead only when its script exists)."""
    benches = [
        Benchmark("gateway_overhead", {"smoke": 240, "full": 330}),
        Benchmark("engine_batching", {"smoke": 180, "full": 240}),
        Benchmark("open_loop", {"smoke": 420, "full": 900}),
        Benchmark("multi_lora", {"smoke": 180, "full": 240}),
    ]
    script = REPO / "bench" / "train_overhead.py"
    if script.is_file():
        text = script.read_text()
        if "bench.harness import" in text or "harness.main" in text:  # follows bench.harness: --setting/--results
            benches.append(Benchmark("train_overhead", {"smoke": 240, "full": 420}))
        else:  # a script with --out DIR [--smoke], like bench/gpu_bench.py
            benches.append(Benchmark("train_overhead", {"smoke": 240, "full": 420}, ("bench/train_overhead.py", "--out", "{results}")))
    benches.append(Benchmark("lead_time", {"smoke": 300, "full": 600}))
    return benches


def run_one(bench: Benchmark, setting: str, results: Path, logs: Path) -> tuple[str, str, float]:
    """Run one benchmark process; (name, outcome, seconds)."""
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{bench.name}.log"
    cmd = bench.command(setting, results)
    limit = bench.limit_s[setting] * time_scale()
    logger.info("%s: starting (limit %.0f s, log %s)", bench.name, limit, log_path)
    began = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            return bench.name, f"stopped after its {limit:.0f} s limit", time.perf_counter() - began
    seconds = time.perf_counter() - began
    if code != 0:
        tail = log_path.read_text(errors="replace")[-1500:]
        logger.error("%s failed (exit %d); end of its log:\n%s", bench.name, code, tail)
        return bench.name, f"failed (exit {code})", seconds
    return bench.name, "ok", seconds


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    import os
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=40)  # time to stop the servers it started
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=SETTINGS, default="full")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this benchmark (repeatable)")
    parser.add_argument("--skip", action="append", default=[], metavar="NAME", help="leave this benchmark out (repeatable)")
    parser.add_argument("--results", type=Path, default=None, help="JSON folder (default bench/results, or bench/results/smoke)")
    parser.add_argument("--report", type=Path, default=None, help="markdown to update (default BENCHMARKS.md for full runs; none for smoke)")
    parser.add_argument("--plots", type=Path, default=None, help="PNG folder (default bench/plots, next to the default report)")
    parser.add_argument("--jobs", type=int, default=1, help="benchmarks run at once (>1 only for smoke: they would disturb each other's timings)")
    parser.add_argument("--report-only", action="store_true", help="only re-render the report from existing results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    results = args.results or (RESULTS_DIR / "smoke" if args.setting == "smoke" else RESULTS_DIR)
    report_path = args.report or (report.REPORT if args.setting == "full" else None)
    plots = args.plots or (report.PLOTS if args.report is None else args.report.parent / "plots")
    if args.jobs > 1 and args.setting == "full":
        parser.error("--jobs > 1 is for smoke runs: concurrent benchmarks disturb each other's timings")

    outcomes: list[tuple[str, str, float]] = []
    if not args.report_only:
        benches = suite()
        known = {b.name for b in benches}
        unknown = [n for n in args.only + args.skip if n not in known]
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
        chosen = [b for b in benches if (not args.only or b.name in args.only) and b.name not in args.skip]
        results.mkdir(parents=True, exist_ok=True)
        logs = results / "logs"
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            outcomes = list(pool.map(lambda b: run_one(b, args.setting, results, logs), chosen))
        for name, outcome, seconds in outcomes:
            logger.info("%-18s %-30s %6.1f s", name, outcome, seconds)
    if report_path is not None:
        report.render(results, report_path, plots)
    failed = [name for name, outcome, _ in outcomes if outcome != "ok"]
    if failed:
        logger.error("did not finish: %s (logs in %s)", ", ".join(failed), results / "logs")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
