"""What every benchmark shares: its command line, the run's metadata and its JSON result.

A benchmark module defines ``NAME``, ``SETTINGS`` (``smoke`` and ``full``: the counts it
runs) and ``run(setting, work) -> dict``; ``main(module)`` gives it the command line
``python -m bench.<module> [--setting smoke|full] [--results DIR]`` and writes
``DIR/<NAME>.json`` with the metadata of the run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.procs import REPO

logger = logging.getLogger(__name__)

RESULTS_DIR = REPO / "bench" / "results"
SETTINGS = ("smoke", "full")


def time_scale() -> float:
    """``BENCH_TIME_SCALE`` (default 1): multiplies every time budget and limit.

    Budgets are sized for an idle machine; on a busy one a benchmark runs fewer rounds
    than planned (it says so in its JSON) unless given more time, e.g. ``BENCH_TIME_SCALE=2``.
    """
    try:
        return max(0.1, float(os.environ.get("BENCH_TIME_SCALE", "1")))
    except ValueError:
        return 1.0


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """Where and under what load the numbers were taken."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (None, None, None)
    return {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "load_avg_1_5_15": [round(x, 2) if x is not None else None for x in load],
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_result(name: str, setting: str, result: dict[str, Any], results_dir: Path, *, began: float, load_before: dict[str, Any]) -> Path:
    """Write ``results_dir/<name>.json`` with the run's metadata around ``result``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "setting": setting,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - began, 1),
        "git_commit": _git_commit(),
        "machine_before": load_before,
        "machine_after": machine(),
        **result,
    }
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    logger.info("wrote %s", path)
    return path


def show_result(result: dict[str, Any], out: Path | None) -> None:
    """Print a standalone benchmark's figures as JSON, and write them to ``out`` when given (its ``--out``)."""
    print(json.dumps(result, indent=2))
    if out:
        out.write_text(json.dumps(result))


def main(name: str, run: Callable[[str, Path], dict[str, Any]], argv: list[str] | None = None) -> int:
    """Command line of one benchmark: run it on a setting and write its JSON."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}")
    parser.add_argument("--setting", choices=SETTINGS, default="full", help="smoke: tiny counts (checks it runs); full: the report's")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="where <name>.json goes")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed after)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpx2", "openai", "httpcore", "urllib3", "LiteLLM", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # The suite stops an overrunning benchmark with SIGTERM: exit through `finally` blocks
    # (which stop the servers it started) instead of dying on the spot.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    began = time.perf_counter()
    before = machine()
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        # Registry, keys and audit of a benchmark live in its scratch folder, never ~/.forgeline.
        os.environ["FORGELINE_HOME"] = str(work / "forgeline-home")
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "FORGELINE_DB_URL", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
            os.environ.pop(var, None)
        result = run(args.setting, work)
    write_result(name, args.setting, result, args.results, began=began, load_before=before)
    return 0
