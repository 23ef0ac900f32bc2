"""DeepSpeed's own multi-node launcher (``deepspeed --hostfile``), with stand-ins for pdsh and ssh.

The real DeepSpeed runner builds the per-host command; ``pdsh`` and ``ssh`` on PATH are
stubs that record what they were asked to run, so no host is contacted.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import stat
import time
from pathlib import Path

import pytest

from jobs.base import JobPhase
from jobs.config import ClusterSpec
from jobs.hostfile import HOSTFILE, DeepSpeedHostfileLauncher
from training.cluster_job import train_spec
from training.job import TrainJob

pytest.importorskip("deepspeed", reason="the [deepspeed] extra is not installed")
pytestmark = pytest.mark.integration


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def stub_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pdsh and ssh that only record their arguments (one per line) and environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "calls"
    record.mkdir()
    _stub(bin_dir, "pdsh", f'printf "%s\\n" "$@" > {record}/pdsh.args\nenv > {record}/pdsh.env\n')
    _stub(bin_dir, "ssh", f'printf "%s\\n" "$@" >> {record}/ssh.args\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return record


def test_hostfile_launch_runs_the_entry_point_on_every_host(
    train_job: TrainJob, stub_hosts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    cluster = ClusterSpec(kind="hostfile", nodes=2, gpus_per_node=4, hosts=["gpu-a", "gpu-b"], rdzv_port=29600,
                          shared_dir=str(tmp_path / "shared"), setup=["source /shared/venv/bin/activate"],
                          env={"NCCL_SOCKET_IFNAME": "ib0"})
    launcher = DeepSpeedHostfileLauncher()
    handle = launcher.submit(train_spec(train_job, cluster, job_id="fl-ds-1"))
    deadline = time.monotonic() + 120
    while (status := launcher.status(handle)).phase is JobPhase.RUNNING and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status.phase is JobPhase.SUCCEEDED, launcher.logs(handle)

    job_dir = Path(handle.job_dir)
    assert (job_dir / HOSTFILE).read_text() == "gpu-a slots=4\ngpu-b slots=4\n"
    # DeepSpeed checked passwordless ssh to the first host before launching.
    assert "gpu-a" in (stub_hosts / "ssh.args").read_text().split()

    args = (stub_hosts / "pdsh.args").read_text().splitlines()
    assert args[:5] == ["-S", "-f", "1024", "-w", "gpu-a,gpu-b"]
    remote = " ".join(args[5:])
    assert "source " + str(job_dir / "node-setup.sh") + ";" in remote
    assert f"cd {tmp_path / 'shared'};" in remote
    assert "-m deepspeed.launcher.launch" in remote
    for flag in ("--node_rank=%n", "--master_addr=gpu-a", "--master_port=29600", "--module", "--no_local_rank"):
        assert flag in args, flag
    assert args[-2:] == ["training.entry", str(job_dir / "job.json")]
    world = next(a for a in args if a.startswith("--world_info="))
    assert json.loads(base64.urlsafe_b64decode(world.split("=", 1)[1])) == {"gpu-a": [0, 1, 2, 3], "gpu-b": [0, 1, 2, 3]}
    # Every host gets forgeline's settings and the cluster's env (DeepSpeed's env file, exported by pdsh).
    exports = dict(part.removeprefix("export ").split("=", 1) for part in remote.split("; ") if part.startswith("export "))
    assert exports["FORGELINE_HOME"] == str(tmp_path / "shared")
    assert exports["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    assert exports["NCCL_SOCKET_IFNAME"] == "ib0"
    assert (stub_hosts / "pdsh.env").read_text().count("PDSH_RCMD_TYPE=ssh") == 1
    assert TrainJob.model_validate_json((job_dir / "job.json").read_text()).output_dir == handle.output_dir
    assert shlex.split((job_dir / "node-setup.sh").read_text()) == ["source", "/shared/venv/bin/activate"]
