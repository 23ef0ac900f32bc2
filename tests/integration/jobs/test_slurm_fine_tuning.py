"""The fine-tuning jobs API training on a real Slurm (one node on loopback).

A control plane on loopback whose operator settings send jobs to Slurm; the stock
``openai`` SDK uploads a chat file and creates a supervised job, which the supervisor
submits with ``sbatch``, follows with ``squeue``/``scontrol`` and turns into events until
the version is registered. With a cluster folder of its own (``shared``), the supervisor then
evaluates and builds the version as Slurm jobs too (``forgeline evaluate`` / ``forgeline build``
in sbatch scripts, seen by ``squeue`` and ``forgeline jobs list``). Cancelling a running job
``scancel``s it: Slurm stops running it and its training processes are gone.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from typer.testing import CliRunner

from forgeline.cli import app
from forgeline.control import create_control_app
from forgeline.finetune.service import FineTuningSettings
from jobs.config import ClusterSpec
from jobs.store import JobStore
from registry.client import Registry
from registry.keys import KeyStore
from serving.gateway.server import serve_in_background
from tests.conftest import SUPPORT_DATA
from tests.support.finetune_client import add_tiny_base, all_events, chat_file
from tests.support.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _squeue_state(slurm_id: str) -> str:
    """The job's state as ``squeue`` lists it ("" once Slurm lists it no more)."""
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", slurm_id, "-o", "%T"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    return out.strip()


def _training_pids(job_file: str) -> list[int]:
    """Processes whose command line names this launcher job's job.json (torchrun and its workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if job_file.encode() in argv:
            found.append(int(entry.name))
    return found


@pytest.fixture
def trainer(  # type: ignore[no-untyped-def]
    request, slurm_cluster, on_slurm, isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[openai.OpenAI, Path]]:
    """A control plane that trains on Slurm, an OpenAI client with a trainer's key, and the jobs' root folder.

    ``request.param`` ``"shared"``: the cluster's ``shared_dir`` is a folder of its own (as on a real
    cluster, where the control plane's home is not on the nodes' shared file system); the nodes
    reach the control plane's tracking store through the forwarded ``MLFLOW_TRACKING_URI``; and the
    finished job is evaluated and built, as Slurm jobs.
    """
    on_slurm(slurm_cluster)
    shared = tmp_path / "shared" if getattr(request, "param", None) == "shared" else None
    if shared is not None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{isolated_home / 'mlflow.db'}")
    add_tiny_base(logging_steps=2, save_steps=4)
    keys = KeyStore()
    secret = keys.create("tess", roles=("trainer", "user"), org="acme")[0]
    keys.dispose()
    settings = FineTuningSettings(
        cluster=ClusterSpec(kind="slurm", gpus_per_node=0, max_restarts=0, shared_dir=str(shared) if shared else None),
        poll_interval_s=1,
        evaluate=shared is not None,
        build=shared is not None,
    )
    url, stop = serve_in_background(create_control_app(fine_tuning=settings))
    try:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0, timeout=60), shared or isolated_home
    finally:
        stop()


@pytest.mark.parametrize("trainer", ["home", "shared"], indirect=True)
def test_a_supervised_job_trains_on_slurm_and_registers_a_version(trainer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, root = trainer
    stages = root != Path(os.environ["FORGELINE_HOME"])  # the "shared" layout evaluates and builds too
    upload = client.files.create(file=chat_file(tmp_path / "train.jsonl", SUPPORT_DATA / "train.jsonl", 160).open("rb"), purpose="fine-tune")
    valid = client.files.create(file=chat_file(tmp_path / "valid.jsonl", SUPPORT_DATA / "eval.jsonl", 8).open("rb"),
                                purpose="fine-tune") if stages else None
    started = time.monotonic()
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=upload.id,
        validation_file=valid.id if valid else None,
        suffix="slurm",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 16}}},
    )
    done = wait_for("the job to finish", lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).finished_at and j)
    elapsed = time.monotonic() - started
    record = JobStore().get(f"{job.id}-1")
    assert done.status == "succeeded", f"{done.error}\n{Path(record.handle.job_dir, 'train.log').read_text()[-3000:]}"
    print(f"\nfine-tuning job on Slurm: {elapsed:.0f} s from create to succeeded")

    # The launcher ran it as a Slurm job, whose files and checkpoints are under the job's folder.
    assert record.handle.kind == "slurm" and record.handle.backend_id.isdigit(), record.handle
    assert record.status.phase.value == "succeeded" and record.status.nodes == ["fl1"], record.status
    folder = root / "fine_tuning" / job.id
    assert record.handle.output_dir == str(folder / "output") and (folder / "data" / "train.jsonl").is_file()
    assert Path(record.handle.job_dir).is_relative_to(root)
    assert f"slurm {record.handle.backend_id}" in Path(record.handle.job_dir, "train.log").read_text()

    events = all_events(client, job.id)
    messages = [e.message for e in events]
    assert f"Training submitted to slurm as {job.id}-1" in messages
    assert "Fine-tuning job started" in messages and messages[-1] == "The job has successfully completed"
    losses = [e for e in events if e.type == "metrics" and e.data and "train_loss" in e.data]
    assert losses and [e.data["step"] for e in losses] == sorted({e.data["step"] for e in losses})
    assert any(m.startswith("Checkpoint created at step") for m in messages)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].step_number >= max(e.data["step"] for e in losses) - 2

    assert done.fine_tuned_model == "ft-acme-tiny-slurm"
    registry = Registry()
    try:
        assert [v.version for v in registry.list_versions(done.fine_tuned_model)] == [1]
        info = registry.get_version(done.fine_tuned_model, 1)
        assert registry.client.get_run(info.run_id).data.tags["forgeline.fine_tuning_job"] == job.id
        if stages:
            _evaluated_and_built_on_slurm(job.id, done.fine_tuned_model, messages, registry)
    finally:
        registry.close()


def _evaluated_and_built_on_slurm(job_id: str, name: str, messages: list[str], registry: Registry) -> None:
    """The version's evaluation and build ran as Slurm jobs: in squeue, in `forgeline jobs list`, on the version."""
    store = JobStore()
    for stage, what in (("evaluate", "Evaluation"), ("build", "Serving artifact build")):
        record = store.get(f"{job_id}-1-{stage}")
        assert f"{what} runs as job {record.id} on slurm" in messages
        assert (record.handle.kind, record.handle.stage, record.status.phase.value) == ("slurm", stage, "succeeded")
        assert record.handle.backend_id.isdigit() and _squeue_state(record.handle.backend_id) == "COMPLETED"
        script = Path(record.handle.job_dir, f"{stage}.sbatch").read_text()
        assert f"-m forgeline {stage} " in script and "torch.distributed.run" not in script
        assert f"slurm {record.handle.backend_id}" in Path(record.handle.job_dir, f"{stage}.log").read_text()
    assert any(m.startswith("Evaluated on the validation file: accuracy=") for m in messages), messages
    assert any(m.startswith("Serving artifact built (torch engine)") for m in messages), messages
    info = registry.get_version(name, 1)
    assert "accuracy" in info.metrics() and info.tags.get("forgeline.engine.torch")
    for stage in ("evaluate", "build"):
        listing = CliRunner().invoke(app, ["jobs", "list", "--model", name, "--stage", stage])
        assert listing.exit_code == 0, listing.output
        assert f"{job_id}-1-{stage}" in listing.output and f"{job_id}-1 " not in listing.output, listing.output


def test_cancel_stops_the_slurm_job(trainer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, _ = trainer
    upload = client.files.create(file=chat_file(tmp_path / "train.jsonl", SUPPORT_DATA / "train.jsonl", 320).open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=upload.id, hyperparameters={"n_epochs": 50})
    wait_for("a training step", lambda: any(e.type == "metrics" for e in all_events(client, job.id)), timeout_s=300)
    record = JobStore().get(f"{job.id}-1")
    slurm_id = record.handle.backend_id
    job_file = str(Path(record.handle.job_dir) / "job.json")
    assert _squeue_state(slurm_id) == "RUNNING"
    assert _training_pids(job_file), "no training process runs this job"

    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    wait_for("Slurm to stop the job", lambda: _squeue_state(slurm_id) in ("", "CANCELLED"), timeout_s=30)
    wait_for("the training processes to end", lambda: not _training_pids(job_file), timeout_s=30)
    time.sleep(3)  # a few supervisor passes later the job is still cancelled, not failed or requeued
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert _squeue_state(slurm_id) in ("", "CANCELLED")
    assert all_events(client, job.id)[-1].message == "Job cancelled by tess"
