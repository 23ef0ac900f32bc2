"""Fixtures for the launcher tests: a small dataset, and real Slurm clusters on this machine.

The clusters come from ``.ci/services/slurm.sh`` (munged, slurmctld, slurmd without systemd):
one node on loopback, and two nodes in network namespaces of their own. When CI has already
started one, its folder is given in ``FORGELINE_SLURM_DIR`` / ``FORGELINE_SLURM2_DIR`` and it is
left running; otherwise the fixture starts one for the session (installing ``slurm-wlm`` and
``munge`` with apt-get when they are missing and we are root) and stops every daemon it
started, by PID, at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.train_jobs import train_job  # noqa: F401 - a fixture, found by pytest through this import

REPO = Path(__file__).resolve().parents[3]
SLURM_SH = REPO / ".ci" / "services" / "slurm.sh"
SUPPORT = REPO / "recipes" / "data" / "support-tickets"


@pytest.fixture
def small_data(tmp_path: Path) -> tuple[Path, Path]:
    """64 training and 16 held-out support tickets: enough for a few steps, quick to tokenise."""
    out = []
    for name, rows in (("train.jsonl", 64), ("eval.jsonl", 16)):
        lines = (SUPPORT / name).read_text().splitlines()[:rows]
        path = tmp_path / f"small-{name}"
        path.write_text("\n".join(lines) + "\n")
        out.append(path)
    return out[0], out[1]


class SlurmCluster:
    """A running test cluster: its client wrappers (sbatch, squeue, ...) and, for two nodes, its namespaces."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.bin = folder / "bin"
        netns = folder / "netns"
        self.namespaces = netns.read_text().split() if netns.exists() else []

    def env_path(self) -> str:
        return f"{self.bin}:{os.environ['PATH']}"


def _can_install() -> str | None:
    """Why Slurm cannot be installed here, or None when it can."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root (apt-get install -y slurm-wlm munge)"
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it (Debian's slurm-wlm and munge)"
    return None


def _start(nodes: int, env_var: str) -> Iterator[SlurmCluster]:
    given = os.environ.get(env_var)
    if given:
        yield SlurmCluster(Path(given))
        return
    reason = _can_install()
    if reason:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("slurmd runs jobs as their users and needs root to start")
    # Not pytest's tmp_path: the munge user must be able to traverse the folder.
    folder = Path(tempfile.mkdtemp(prefix=f"forgeline-slurm{nodes}-", dir="/tmp"))
    os.rmdir(folder)
    proc = subprocess.run([str(SLURM_SH), "start", str(folder), "--nodes", str(nodes)],
                          capture_output=True, text=True, env={**os.environ, "SLURM_INSTALL": "1"}, timeout=300)
    if proc.returncode != 0:
        if (folder / "run").exists():  # stop what started before the failure (munged, namespaces)
            subprocess.run([str(SLURM_SH), "stop", str(folder)], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"
        if nodes == 2 and "network namespace" in proc.stderr:
            pytest.skip(f"network namespaces are not permitted here, so no two-node cluster ({last})")
        if "apt-get install" in proc.stderr and not shutil.which("slurmctld"):
            pytest.skip(f"Slurm could not be installed here ({last})")
        pytest.fail(f"could not start a {nodes}-node Slurm cluster:\n{proc.stderr}")
    try:
        yield SlurmCluster(folder)
    finally:
        subprocess.run([str(SLURM_SH), "stop", str(folder)], capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """One Slurm node on loopback."""
    yield from _start(1, "FORGELINE_SLURM_DIR")


@pytest.fixture(scope="session")
def slurm_two_nodes() -> Iterator[SlurmCluster]:
    """Two Slurm nodes, each in its own network namespace, joined by a veth pair (interface fl0)."""
    yield from _start(2, "FORGELINE_SLURM2_DIR")


@pytest.fixture
def on_slurm(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Put a cluster's client commands first on PATH (and the compiled DeepSpeed ops where CI keeps them)."""

    def use(cluster: SlurmCluster) -> None:
        monkeypatch.setenv("PATH", cluster.env_path())
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch-extensions")))

    return use
