"""Server processes for the benchmarks: start on a free loopback port, wait until healthy, stop.

Every server a benchmark starts is its own process group, so stopping it also stops any
worker it forked; nothing else is ever signalled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the benchmark process dies (Linux), so a
    benchmark that is killed never leaves its servers running."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class ServerProcess:
    """A server started as its own process group, with its output in ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], *, port: int, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.log_path = log_path
        self.base_url = f"http://{HOST}:{port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        full_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(env or {})}
        logger.info("starting %s: %s", name, " ".join(self.argv))
        self.proc = subprocess.Popen(
            self.argv, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent,
        )  # fmt: skip

    def wait_healthy(self, path: str = "/health", *, timeout_s: float = 120.0, headers: dict[str, str] | None = None) -> float:
        """Poll ``path`` until it answers 200; returns the seconds it took.

        Raises:
            RuntimeError: the process exited or did not become healthy in time (with its log tail).
        """
        began = time.perf_counter()
        deadline = began + timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + path, timeout=2.0, headers=headers).status_code == 200:
                    return time.perf_counter() - began
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} was not healthy at {self.base_url}{path} within {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it lingers."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout_s)
        self._log.close()


@contextlib.contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    """Stop ``server`` however the block ends."""
    try:
        yield server
    finally:
        server.stop()


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) used so far by every live process in process group ``pgid``.

    CPU time per request is a steadier measure of a server's cost than latency on a
    shared machine: it does not count the time the server waited for a core.
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # the name may contain spaces
        if int(fields[2]) == pgid:  # field 5, pgrp
            total += int(fields[11]) + int(fields[12])  # fields 14 and 15: utime, stime
    return total / tick


def python_module(module: str, *args: str, python: str | None = None) -> list[str]:
    """argv that runs ``python -m module args`` with this interpreter (or ``python``)."""
    return [python or sys.executable, "-m", module, *args]
