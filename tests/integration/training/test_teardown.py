"""Distributed teardown: every rank waits for rank 0 to finish, then the process group is
closed before the interpreter exits, so no rank aborts at exit (two gloo processes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.integration

WORKER = textwrap.dedent(
    """
    import sys, time
    import torch
    import torch.distributed as dist
    from training.distributed import teardown

    dist.init_process_group("gloo")
    value = torch.ones(1)
    dist.all_reduce(value)
    assert value.item() == 2
    if dist.get_rank() == 0:
        time.sleep(1.5)  # rank 0 registering the version
    teardown()
    assert not dist.is_initialized()
    print(f"done {time.monotonic():.3f}", flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ranks_wait_for_rank_zero_then_exit_cleanly() -> None:
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    started = time.monotonic()
    results = [proc.communicate(timeout=120) for proc in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-2000:]
        assert "terminate called" not in err
    finished = [float(out.split()[-1]) for out, _ in results]
    assert min(finished) - started >= 1.5  # rank 1 left only after rank 0 reached teardown
