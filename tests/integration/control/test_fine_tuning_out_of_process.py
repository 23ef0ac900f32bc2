"""The control plane never loads a model: a fine-tuning job's training, evaluation and build all
run as jobs in processes of their own, and the control-plane process ends the job without having
imported a model class (``transformers.models.*``) or PEFT.

The control plane runs in a fresh interpreter (``sys.modules`` of this pytest process holds
whatever earlier tests imported), with the local launcher, and reports what it imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.store import JobStore
from registry.client import Registry
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONTROL_PLANE = r"""
import json
import sys
from pathlib import Path

from forgeline.control import create_control_app
from forgeline.finetune.service import FineTuningSettings
from serving.gateway.server import serve_in_background
from tests.conftest import SUPPORT_DATA
from tests.support.finetune_client import add_tiny_base, all_events, chat_file, make_org
from tests.support.polling import wait_for

tmp = Path(sys.argv[1])
add_tiny_base()
org = make_org()
url, stop = serve_in_background(create_control_app(fine_tuning=FineTuningSettings(poll_interval_s=0.5)))
try:
    tess = org.client(url, "tess")
    train = tess.files.create(file=chat_file(tmp / "train.jsonl", SUPPORT_DATA / "train.jsonl", 96).open("rb"),
                              purpose="fine-tune")
    valid = tess.files.create(file=chat_file(tmp / "valid.jsonl", SUPPORT_DATA / "eval.jsonl", 8).open("rb"),
                              purpose="fine-tune")
    job = tess.fine_tuning.jobs.create(
        model="tiny", training_file=train.id, validation_file=valid.id, suffix="oop",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 16}}},
    )
    done = wait_for("the job to finish", lambda: (j := tess.fine_tuning.jobs.retrieve(job.id)).finished_at and j,
                    timeout_s=900)
    events = [{"message": e.message, "data": e.data} for e in all_events(tess, job.id)]
finally:
    stop()
models = sorted(m for m in sys.modules if m.startswith("transformers.models.") or m.split(".")[0] == "peft")
print(json.dumps({"job": done.model_dump(mode="json"), "events": events, "models": models,
                  "transformers": "transformers" in sys.modules, "torch": "torch" in sys.modules}))
"""


def test_a_fine_tuning_job_ends_without_the_control_plane_loading_a_model(tmp_path: Path, isolated_home: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", CONTROL_PLANE, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    job = report["job"]
    messages = [e["message"] for e in report["events"]]
    assert job["status"] == "succeeded", (job["error"], messages)
    assert report["models"] == [], "the control plane imported model code: " + ", ".join(report["models"])
    assert not report["torch"], "the control plane imported torch"

    # Training, evaluation and build each ran as a job of the local launcher, recorded in the one job store.
    records = {r.handle.stage: r for r in JobStore().list_jobs(name=job["fine_tuned_model"])}
    assert set(records) == {"train", "evaluate", "build"}
    assert {r.id for r in records.values()} == {f"{job['id']}-1", f"{job['id']}-1-evaluate", f"{job['id']}-1-build"}
    assert all(r.handle.kind == "local" and r.status.phase.value == "succeeded" for r in records.values())
    assert f"Evaluation runs as job {job['id']}-1-evaluate on local" in messages
    evaluated = next(e for e in report["events"] if e["message"].startswith("Evaluated on the validation file: accuracy="))
    assert evaluated["data"]["launcher_job_id"] == f"{job['id']}-1-evaluate"
    built = next(e for e in report["events"] if e["message"].startswith("Serving artifact built (torch engine)"))
    assert built["data"]["launcher_job_id"] == f"{job['id']}-1-build"
    assert job["trained_tokens"] and job["trained_tokens"] > 96 * 10  # counted by the training job, not here

    # What the jobs did is on the version: its evaluation and its engine.
    registry = Registry()
    try:
        info = registry.get_version(job["fine_tuned_model"], 1)
        assert "accuracy" in info.metrics() and "accuracy" in info.base_metrics()
        assert info.tags["forgeline.engine.torch"] == built["data"]["artifact"]
    finally:
        registry.close()
