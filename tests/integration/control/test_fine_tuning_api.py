"""The fine-tuning jobs API end to end with the stock ``openai`` SDK against a control plane
on loopback: upload → job → events → succeeded → registered version → approval →
promotion → answered by the gateway; cancel stops the training process; a control plane
killed mid-job and started again loses nothing and runs nothing twice."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from openai.types.fine_tuning import FineTuningJob

from forgeline.control import create_control_app
from forgeline.finetune.base_models import BaseModelStore
from forgeline.finetune.service import FineTuningSettings
from jobs.local import PROCESS_FILE, ProcessRecord, process_alive
from jobs.store import JobStore
from registry.client import Registry
from registry.keys import KeyStore
from serving.gateway.server import serve_in_background
from tests.conftest import REPO, SUPPORT_DATA
from tests.support.finetune_client import Org, all_events, chat_file
from tests.support.polling import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "Route this ticket: Hello, my parcel never arrived and tracking shows nothing."}]


@pytest.fixture
def plane(org: Org) -> Iterator[str]:
    app = create_control_app(fine_tuning=FineTuningSettings(poll_interval_s=0.5))
    url, stop = serve_in_background(app)
    try:
        yield url
    finally:
        stop()


def test_upload_train_approve_promote_and_serve_through_the_openai_sdk(plane: str, org: Org, tmp_path: Path) -> None:
    tess = org.client(plane, "tess")
    train = tess.files.create(file=chat_file(tmp_path / "train.jsonl", SUPPORT_DATA / "train.jsonl", 480).open("rb"),
                              purpose="fine-tune")
    valid = tess.files.create(file=chat_file(tmp_path / "valid.jsonl", SUPPORT_DATA / "eval.jsonl", 40).open("rb"),
                              purpose="fine-tune")

    job = tess.fine_tuning.jobs.create(
        model="tiny", training_file=train.id, validation_file=valid.id, suffix="support", seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 16}}},
        metadata={"team": "support"},
    )
    assert job.status == "queued" and job.model == "tiny" and job.seed == 7
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 16
    assert job.hyperparameters.learning_rate_multiplier == 1.0  # "auto" is resolved and reported
    assert job.fine_tuned_model is None

    # Another organisation sees neither the job nor the files.
    otto = org.client(plane, "otto")
    with pytest.raises(openai.NotFoundError):
        otto.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        otto.fine_tuning.jobs.create(model="tiny", training_file=train.id)
    assert [j.id for j in otto.fine_tuning.jobs.list()] == []

    done = wait_for("the job to finish", lambda: (j := tess.fine_tuning.jobs.retrieve(job.id)).finished_at and j)
    assert done.status == "succeeded", done.error
    name = done.fine_tuned_model
    assert name == "ft-acme-tiny-support"
    assert done.trained_tokens and 2 * 480 * 10 < done.trained_tokens < 2 * 480 * 128  # 2 epochs, rows of 10-128 tokens

    messages = [e.message for e in all_events(tess, job.id)]
    assert messages[0] == f"Created fine-tuning job: {job.id}"
    assert messages[-1] == "The job has successfully completed"
    steps = [e for e in all_events(tess, job.id) if e.type == "metrics" and e.data and "train_loss" in e.data]
    assert [e.data["step"] for e in steps] == sorted({e.data["step"] for e in steps})  # each step once, in order
    assert steps[-1].data["total_steps"] == 60 and steps[0].data["train_loss"] > steps[-1].data["train_loss"]
    assert any(m.startswith(f"New fine-tuned model created: {name} version 1") for m in messages)
    assert any(m.startswith("Evaluated on the validation file: accuracy=") for m in messages)
    assert f"{name} version 1 is now {name}@candidate" in messages  # the default policy lets candidate through

    checkpoints = tess.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].step_number == 60 and checkpoints[0].metrics.train_loss is not None
    assert [j.id for j in tess.fine_tuning.jobs.list(metadata={"team": "support"})] == [job.id]

    # The version in MLflow: lineage, the job's tag on its run, evaluation against the base.
    registry = Registry()
    info = registry.get_version(name, 1)
    assert info.tags["forgeline.trained_by"] == "tess"
    assert registry.client.get_run(info.run_id).data.tags["forgeline.fine_tuning_job"] == job.id
    assert info.metrics()["accuracy"] >= 0.8 > info.base_metrics()["accuracy"]

    from serving.config import ServeSpec
    from serving.registry_models import BaseSource
    from serving.service import build_gateway

    # The owner tries the candidate at once; production waits for an approval.
    gateway, stop = serve_in_background(build_gateway(registry, [f"{name}@candidate"], ServeSpec(port=0, poll_interval_s=0)))
    try:
        reply = org.client(gateway, "tess").chat.completions.create(
            model=f"{name}@candidate", messages=QUESTION, max_tokens=8, temperature=0
        )
        assert reply.choices[0].message.content.strip() == "shipping"
        with pytest.raises(openai.NotFoundError):  # acme's model does not exist for globex's keys
            org.client(gateway, "otto").chat.completions.create(model=f"{name}@candidate", messages=QUESTION)
    finally:
        stop()
    headers = {"Authorization": f"Bearer {org.secrets['tess']}"}
    refused = httpx.post(f"{plane}/v1/models/{name}/versions/1/promote", json={"alias": "production"}, headers=headers)
    assert refused.status_code == 409, refused.text
    approve = httpx.post(f"{plane}/v1/models/{name}/versions/1/approvals", json={"comment": "ok"},
                         headers={"Authorization": f"Bearer {org.secrets['ana']}"})
    assert approve.status_code == 201, approve.text
    promoted = httpx.post(f"{plane}/v1/models/{name}/versions/1/promote", json={"alias": "production"}, headers=headers)
    assert promoted.status_code == 200, promoted.text

    gateway, stop = serve_in_background(build_gateway(registry, [name], ServeSpec(port=0, poll_interval_s=0)))
    try:
        reply = org.client(gateway, "tess").chat.completions.create(
            model=done.fine_tuned_model, messages=QUESTION, max_tokens=8, temperature=0
        )
        assert reply.choices[0].message.content.strip() == "shipping"
    finally:
        stop()

    # The many-models path: a gateway holding only the shared base answers the adapter by its name.
    tiny = BaseModelStore().get("tiny")
    bases = [BaseSource(name="tiny", source=tiny.source, chat_template=tiny.chat_template)]
    gateway, stop = serve_in_background(build_gateway(registry, [], ServeSpec(port=0), bases=bases))
    try:
        reply = org.client(gateway, "tess").chat.completions.with_raw_response.create(
            model=done.fine_tuned_model, messages=QUESTION, max_tokens=8, temperature=0
        )
        assert reply.headers["x-forgeline-adapter"] == f"{name}@1"
        assert reply.parse().choices[0].message.content.strip() == "shipping"
    finally:
        stop()
        registry.close()


def test_bad_requests_name_the_field(plane: str, org: Org, tmp_path: Path) -> None:
    tess = org.client(plane, "tess")
    train = tess.files.create(file=chat_file(tmp_path / "t.jsonl", SUPPORT_DATA / "train.jsonl", 20).open("rb"),
                              purpose="fine-tune")
    with pytest.raises(openai.NotFoundError, match="forgeline models add-base"):
        tess.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=train.id)
    with pytest.raises(openai.BadRequestError, match="preference"):
        tess.fine_tuning.jobs.create(model="tiny", training_file=train.id, method={"type": "dpo"})
    with pytest.raises(openai.BadRequestError, match="n_epochs"):
        tess.fine_tuning.jobs.create(model="tiny", training_file=train.id, hyperparameters={"n_epochs": 500})
    with pytest.raises(openai.BadRequestError, match="suffix"):
        tess.fine_tuning.jobs.create(model="tiny", training_file=train.id, suffix="Not/Allowed")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i}+1?"}], "answer": str(i + 1)})
                               + "\n" for i in range(20)))
    prompt_file = tess.files.create(file=prompts.open("rb"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="python") as refused:
        tess.fine_tuning.jobs.create(model="tiny", training_file=prompt_file.id, method={
            "type": "reinforcement", "reinforcement": {"grader": {"type": "python", "source": "def grade(s, i): ..."}}})
    assert refused.value.param == "method.reinforcement.grader.type"
    with pytest.raises(openai.BadRequestError, match="'reference_answer'.*fields on every row: answer"):
        tess.fine_tuning.jobs.create(model="tiny", training_file=prompt_file.id, method={
            "type": "reinforcement", "reinforcement": {"grader": {
                "type": "string_check", "name": "match", "input": "{{sample.output_text}}",
                "reference": "{{item.reference_answer}}", "operation": "eq"}}})
    with pytest.raises(openai.PermissionDeniedError):
        org.client(plane, "ana").fine_tuning.jobs.create(model="tiny", training_file=train.id)
    keys = KeyStore()
    scoped = keys.create("lena", roles=("trainer",), org="acme", models="ft-acme-tiny-legal*")[0]
    keys.dispose()
    scoped_client = openai.OpenAI(base_url=f"{plane}/v1", api_key=scoped, max_retries=0)
    lena_file = scoped_client.files.create(file=chat_file(tmp_path / "l.jsonl", SUPPORT_DATA / "train.jsonl", 20).open("rb"),
                                           purpose="fine-tune")
    with pytest.raises(openai.PermissionDeniedError, match="ft-acme-tiny-support") as denied:
        scoped_client.fine_tuning.jobs.create(model="tiny", training_file=lena_file.id, suffix="support")
    assert denied.value.param == "suffix"
    assert tess.fine_tuning.jobs.list().data == []  # nothing was queued by a refused request


# -- a control plane in its own process: cancel, restart ----------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ControlProcess:
    """``forgeline control serve`` as a child process, so the test can kill it."""

    def __init__(self, home: Path, settings: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home, self.settings = home, settings
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "FORGELINE_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        log = (self.home / "control.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "forgeline", "control", "serve", "--port", str(self.port),
             "--fine-tuning", str(self.settings)], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )
        wait_for("the control plane", self._up, timeout_s=120)

    def _up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


@pytest.fixture
def control(org: Org, isolated_home: Path, tmp_path: Path) -> Iterator[ControlProcess]:
    settings = tmp_path / "fine-tuning.yaml"
    settings.write_text(yaml.safe_dump({"poll_interval_s": 0.5, "evaluate": False, "build": False}))
    process = ControlProcess(isolated_home, settings)
    process.start()
    try:
        yield process
    finally:
        if process.proc and process.proc.poll() is None:
            process.proc.terminate()
            process.proc.wait(30)


def start_job(client: openai.OpenAI, tmp_path: Path, rows: int, **create: object) -> FineTuningJob:
    """Upload ``rows`` support-ticket chats and start a supervised job on the tiny base."""
    train = client.files.create(file=chat_file(tmp_path / "t.jsonl", SUPPORT_DATA / "train.jsonl", rows).open("rb"),
                                purpose="fine-tune")
    return client.fine_tuning.jobs.create(model="tiny", training_file=train.id, **create)  # type: ignore[arg-type]


def wait_for_steps(client: openai.OpenAI, job_id: str) -> None:
    wait_for("a training step", lambda: any(e.type == "metrics" for e in all_events(client, job_id)))


def _training_process(job_id: str) -> ProcessRecord:
    record = JobStore().get(f"{job_id}-1")
    return ProcessRecord.model_validate_json((Path(record.handle.job_dir) / PROCESS_FILE).read_text())


def test_cancel_stops_the_training_process(control: ControlProcess, org: Org, tmp_path: Path) -> None:
    tess = org.client(control.url, "tess")
    job = start_job(tess, tmp_path, 400, hyperparameters={"n_epochs": 50})
    wait_for_steps(tess, job.id)
    process = _training_process(job.id)
    assert process_alive(process)

    cancelled = tess.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert not process_alive(process)  # cancel returns once the process group is gone
    time.sleep(2)  # a supervisor pass later the job is still cancelled, not failed or restarted
    assert tess.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert all_events(tess, job.id)[-1].message == "Job cancelled by tess"
    with pytest.raises(openai.ConflictError):
        tess.fine_tuning.jobs.cancel(job.id)


def test_a_restarted_control_plane_loses_nothing(control: ControlProcess, org: Org, tmp_path: Path) -> None:
    tess = org.client(control.url, "tess")
    job = start_job(tess, tmp_path, 320, suffix="restart", hyperparameters={"n_epochs": 2, "batch_size": 16})
    wait_for_steps(tess, job.id)
    process = _training_process(job.id)

    control.kill()  # SIGKILL: no shutdown hook runs
    assert process_alive(process)  # training does not depend on the control plane
    control.start()

    done = wait_for("the job to finish", lambda: (j := tess.fine_tuning.jobs.retrieve(job.id)).finished_at and j)
    assert done.status == "succeeded", done.error
    events = all_events(tess, job.id)
    keys = [(e.message, e.type) for e in events]
    assert len(keys) == len(set(keys)), "an event was reported twice"
    assert [e.message for e in events].count("Fine-tuning job started") == 1
    assert len(JobStore().list_jobs(name=done.fine_tuned_model)) == 1  # submitted once
    registry = Registry()
    try:
        assert [v.version for v in registry.list_versions(done.fine_tuned_model)] == [1]
    finally:
        registry.close()


def test_pause_keeps_checkpoints_and_resume_continues_from_them(control: ControlProcess, org: Org, tmp_path: Path) -> None:
    tess = org.client(control.url, "tess")
    job = start_job(tess, tmp_path, 320, suffix="paused", hyperparameters={"n_epochs": 2, "batch_size": 16})
    wait_for("a checkpoint", lambda: any(e.message.startswith("Checkpoint created") for e in all_events(tess, job.id)))
    first = _training_process(job.id)

    paused = tess.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused" and not process_alive(first)
    time.sleep(2)  # the supervisor leaves a paused job alone
    assert tess.fine_tuning.jobs.retrieve(job.id).status == "paused"

    assert tess.fine_tuning.jobs.resume(job.id).status == "queued"
    done = wait_for("the job to finish", lambda: (j := tess.fine_tuning.jobs.retrieve(job.id)).finished_at and j)
    assert done.status == "succeeded", done.error
    assert JobStore().get(f"{job.id}-2").status.resumed_from_step >= 10  # attempt 2 started from a checkpoint
    registry = Registry()
    try:
        (version,) = registry.list_versions(done.fine_tuned_model)
        run = registry.client.get_run(version.run_id)  # one run across both attempts
        assert int(run.data.tags["forgeline.resumed_from_step"]) >= 10
        steps = [m.step for m in registry.client.get_metric_history(version.run_id, "loss")]
        assert steps and max(steps) >= 35
    finally:
        registry.close()
