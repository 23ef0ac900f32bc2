"""Real training on a real Slurm, submitted with ``forgeline train --cluster slurm``.

One node on loopback: a tiny LoRA SFT completes and registers one version. Two nodes, each
in its own network namespace: a LoRA SFT with DeepSpeed ZeRO-3 (gloo on CPU) loses one
node's training process to SIGKILL after its first checkpoint; the job requeues itself,
resumes from that checkpoint in the same MLflow run, and registers exactly one version.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from forgeline.cli import app
from jobs.store import JobStore
from registry.client import Registry
from training.checkpoints import MARKER, STATE_FILE
from training.job import RESULT_FILE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]
runner = CliRunner()


def _recipe(tmp_path: Path, data: tuple[Path, Path], name: str, extra: str = "", max_steps: int = 4) -> Path:
    train, eval_ = data
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\n"
        f"model: {{base: {REPO / 'assets' / 'tiny-base'}}}\n"
        f"data: {{train: {train}, eval: {eval_}}}\n"
        "adapter: {kind: lora, r: 4, alpha: 8}\n"
        f"train: {{max_steps: {max_steps}, batch_size: 4, max_length: 64, logging_steps: 1, save_steps: 2}}\n" + extra
    )
    return path


def _logs(job_id: str) -> str:
    return runner.invoke(app, ["jobs", "logs", job_id, "--tail", "60"]).output


def test_single_node_lora_sft_registers_one_version(
    slurm_cluster, on_slurm, tmp_path: Path, small_data: tuple[Path, Path]  # type: ignore[no-untyped-def]
) -> None:
    on_slurm(slurm_cluster)
    recipe = _recipe(tmp_path, small_data, "slurm-one")
    started = time.monotonic()
    result = runner.invoke(app, ["train", str(recipe), "--cluster", "slurm", "--gpus-per-node", "0"])
    elapsed = time.monotonic() - started
    job_id = result.output.split()[1] if result.output.startswith("submitted") else "?"
    assert result.exit_code == 0, result.output + _logs(job_id)
    assert "registered slurm-one version 1" in result.output
    print(f"\nsingle-node Slurm LoRA SFT: {elapsed:.0f} s from submit to registered version")
    assert [v.version for v in Registry().list_versions("slurm-one")] == [1]
    record = JobStore().get(job_id)
    assert (record.status.phase.value, record.status.version, record.status.nodes) == ("succeeded", 1, ["fl1"])
    assert "forgeline: node fl1 (127.0.0.1) rank 0 of 1" in runner.invoke(app, ["jobs", "logs", job_id]).output


def _training_processes(job_file: str, namespace: str) -> list[int]:
    """Training processes (not torchrun agents) of this job that live in ``namespace``."""
    netns = os.stat(f"/run/netns/{namespace}").st_ino
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            in_ns = os.stat(entry / "ns" / "net").st_ino == netns
        except OSError:
            continue
        if in_ns and b"training.entry" in argv and job_file.encode() in argv and b"torch.distributed.run" not in argv:
            found.append(int(entry.name))
    return found


def test_two_node_zero3_survives_a_killed_node_and_registers_one_version(
    slurm_two_nodes, on_slurm, tmp_path: Path, small_data: tuple[Path, Path]  # type: ignore[no-untyped-def]
) -> None:
    on_slurm(slurm_two_nodes)
    recipe = _recipe(
        tmp_path, small_data, "slurm-zero3", max_steps=6,
        extra="distributed: {strategy: deepspeed, zero_stage: 3}\n"
        # gloo binds to the interface the namespaces share (slurm.sh names both ends fl0).
        "cluster: {kind: slurm, max_restarts: 1, env: {GLOO_SOCKET_IFNAME: fl0}}\n",
    )
    started = time.monotonic()
    submitted = runner.invoke(app, ["train", str(recipe), "--nodes", "2", "--gpus-per-node", "0", "--detach"])
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.output.split()[1]
    handle = JobStore().get(job_id).handle
    out = Path(handle.output_dir)

    # Wait for the first complete checkpoint, then SIGKILL the training process on the second node.
    deadline = time.monotonic() + 480
    while not glob.glob(str(out / "checkpoints" / "checkpoint-*" / MARKER)):
        assert time.monotonic() < deadline, "no checkpoint in time:\n" + _logs(job_id)
        assert JobStore().get(job_id).status.phase.value not in ("failed", "cancelled"), _logs(job_id)
        time.sleep(0.2)
    first_run = json.loads((out / STATE_FILE).read_text())["run_id"]
    victims = _training_processes(str(Path(handle.job_dir) / "job.json"), slurm_two_nodes.namespaces[1])
    assert len(victims) == 1, victims
    os.kill(victims[0], signal.SIGKILL)
    killed_at = time.monotonic() - started

    waited = runner.invoke(app, ["jobs", "wait", job_id, "--timeout", "600"])
    elapsed = time.monotonic() - started
    assert waited.exit_code == 0, waited.output + _logs(job_id)
    print(f"\ntwo-node ZeRO-3 on Slurm: killed a node's process at {killed_at:.0f} s; "
          f"requeued, resumed and registered at {elapsed:.0f} s")

    record = JobStore().get(job_id)
    assert record.status.restarts == 1  # requeued once
    assert record.status.nodes == ["fl1", "fl2"]
    result = json.loads((out / RESULT_FILE).read_text())
    assert result["resumed_from_step"] > 0
    assert record.status.resumed_from_step == result["resumed_from_step"]
    versions = Registry().list_versions("slurm-zero3")
    assert [v.version for v in versions] == [1]
    assert versions[0].run_id == first_run  # the resumed attempt continued the same MLflow run
    log = runner.invoke(app, ["jobs", "logs", job_id]).output
    assert "forgeline: node fl2 (10.251." in log  # the second node trained from its own namespace
    assert "attempt 1 failed" in log and f"resuming from checkpoint-{result['resumed_from_step']}" in log
