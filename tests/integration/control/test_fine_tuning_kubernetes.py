"""The fine-tuning jobs API on a Kubernetes operator setup, with stand-ins for the cluster.

No cluster runs here. The control plane's launcher talks through the real ``kubernetes``
client to a fake API server that keeps the PyTorchJobs and ConfigMaps it is sent; a tmp
folder plays the PVC, which the control plane and the "pod" see at the same mount path;
and the pod is played by running the container's entry point (``python -m training.entry``
on the job.json from the ConfigMap) as a local process with the pod's environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from forgeline.control import create_control_app
from forgeline.finetune.service import FineTuningSettings
from jobs import kubernetes as kubernetes_launcher
from jobs.config import ClusterSpec
from registry.client import Registry
from serving.gateway.server import serve_in_background
from tests.conftest import REPO, SUPPORT_DATA
from tests.support.finetune_client import Org, add_tiny_base, all_events, chat_file, make_org
from tests.support.polling import wait_for
from tests.unit.jobs.fake_kube import FakeKubeCluster, api_client
from training.job import TrainJob

pytest.importorskip("kubernetes", reason="the [k8s] extra (kubernetes client) is not installed")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAMESPACE = "train"
PVC = "forgeline-jobs"


@dataclass
class Setup:
    url: str
    api: FakeKubeCluster
    mount: Path
    org: Org


@pytest.fixture
def setup(tmp_path: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    api = FakeKubeCluster()
    # Instead of in-cluster or ~/.kube/config credentials: a real client whose HTTP goes to the fake.
    monkeypatch.setattr(kubernetes_launcher, "default_api_client", lambda: api_client(api))
    # The PVC, mounted at this path in the pods and as the control plane's FORGELINE_HOME: both track
    # into its mlflow.db (on a real cluster, MLFLOW_TRACKING_URI names a server and is forwarded).
    mount = isolated_home
    mount.mkdir(parents=True, exist_ok=True)
    add_tiny_base(save_steps=3, logging_steps=3)
    cluster = ClusterSpec(
        kind="kubernetes",
        namespace=NAMESPACE,
        nodes=1,
        gpus_per_node=0,
        container_image="ghcr.io/acme/forgeline:0.1",
        pvc=PVC,
        mount_path=str(mount),
    )
    app = create_control_app(
        fine_tuning=FineTuningSettings(cluster=cluster, poll_interval_s=0.5, evaluate=False, build=False)
    )
    url, stop = serve_in_background(app)
    try:
        yield Setup(url=url, api=api, mount=mount, org=make_org())
    finally:
        stop()


def _create_job(s: Setup, tmp_path: Path, rows: int) -> tuple[openai.OpenAI, str]:
    tess = s.org.client(s.url, "tess")
    train = tess.files.create(
        file=chat_file(tmp_path / "train.jsonl", SUPPORT_DATA / "train.jsonl", rows).open("rb"), purpose="fine-tune"
    )
    job = tess.fine_tuning.jobs.create(
        model="tiny",
        training_file=train.id,
        suffix="k8s",
        seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 16}}},
    )
    assert job.status == "queued"
    return tess, job.id


def _submitted(api: FakeKubeCluster) -> tuple[dict[str, Any], dict[str, Any]]:
    """The PyTorchJob and its ConfigMap, once the launcher has created both."""
    ((name, manifest),) = wait_for("the PyTorchJob", lambda: list(api.jobs.items()), timeout_s=120)
    config_map = wait_for("its ConfigMap", lambda: api.config_maps.get(f"{name}-job"), timeout_s=60)
    return manifest, config_map  # type: ignore[return-value]


def _status(client: openai.OpenAI, job_id: str, status: str) -> bool:
    return client.fine_tuning.jobs.retrieve(job_id).status == status


def test_a_job_trains_as_a_pytorchjob_on_the_pvc_and_registers_its_version(setup: Setup, tmp_path: Path) -> None:
    s = setup
    tess, job_id = _create_job(s, tmp_path, rows=96)

    manifest, config_map = _submitted(s.api)
    assert (manifest["apiVersion"], manifest["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert manifest["metadata"]["namespace"] == NAMESPACE
    master = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (container,) = master["containers"]
    volumes = {v["name"]: v for v in master["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["checkpoints"]["persistentVolumeClaim"] == {"claimName": PVC}
    assert mounts["checkpoints"] == str(s.mount)
    assert container["command"][-3:] == ["-m", "training.entry", "/etc/forgeline-job/job.json"]

    job = TrainJob.model_validate_json(config_map["data"]["job.json"])
    data_dir = s.mount / "fine_tuning" / job_id / "data"
    assert Path(job.data.train).parent == data_dir
    assert Path(job.data.train).is_file()  # written by the control plane onto the PVC, read by the pod
    assert job.output_dir and Path(job.output_dir).is_relative_to(s.mount)
    output_dir = Path(job.output_dir)

    # Play the operator and the pod: Running, then the container's command with the pod's environment.
    name = manifest["metadata"]["name"]
    s.api.set_condition(name, "Created")
    s.api.set_condition(name, "Running")
    wait_for("the job to run", lambda: _status(tess, job_id, "running"), timeout_s=60)
    job_file = tmp_path / "job.json"
    job_file.write_text(config_map["data"]["job.json"])
    pod_env = {e["name"]: e["value"] for e in container["env"]}
    assert pod_env["FORGELINE_HOME"] == str(s.mount)
    assert "MLFLOW_TRACKING_URI" not in pod_env  # SQLite on this machine is not forwarded: pods use the PVC's store
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | pod_env | {"OMP_NUM_THREADS": "1"}
    pod = subprocess.run(
        [sys.executable, "-m", "training.entry", str(job_file)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pod.returncode == 0, pod.stderr[-3000:]
    result = json.loads((output_dir / "result.json").read_text())
    assert result["version"] == 1
    assert tess.fine_tuning.jobs.retrieve(job_id).status == "running"  # the operator has not said Succeeded yet
    s.api.set_condition(name, "Succeeded", "PyTorchJob succeeded")

    done = wait_for(
        "the job to finish", lambda: (j := tess.fine_tuning.jobs.retrieve(job_id)).finished_at and j, timeout_s=120
    )
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "ft-acme-tiny-k8s"

    messages = [e.message for e in all_events(tess, job_id)]
    assert any(m.startswith("Training submitted to kubernetes as ") for m in messages), messages
    assert f"New fine-tuned model created: {done.fine_tuned_model} version 1" in messages
    assert messages[-1] == "The job has successfully completed"

    registry = Registry()
    try:
        info = registry.get_version(done.fine_tuned_model, 1)
        assert info.tags["forgeline.fine_tuning_job"] == job_id
        assert registry.client.get_run(info.run_id).data.tags["forgeline.fine_tuning_job"] == job_id
    finally:
        registry.close()

    on_pvc = sorted(int(p.name.split("-")[1]) for p in (output_dir / "checkpoints").glob("checkpoint-*"))
    assert len(on_pvc) >= 2  # a checkpoint every 3 steps
    listed = tess.fine_tuning.jobs.checkpoints.list(job_id).data
    assert [c.step_number for c in listed] == sorted(on_pvc, reverse=True)
    assert listed[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-{on_pvc[-1]}"
    assert listed[0].metrics.train_loss is not None


def test_cancelling_a_running_job_deletes_its_pytorchjob(setup: Setup, tmp_path: Path) -> None:
    s = setup
    tess, job_id = _create_job(s, tmp_path, rows=32)
    manifest, _ = _submitted(s.api)
    name = manifest["metadata"]["name"]
    s.api.set_condition(name, "Created")
    s.api.set_condition(name, "Running")
    wait_for("the job to run", lambda: _status(tess, job_id, "running"), timeout_s=60)

    cancelled = tess.fine_tuning.jobs.cancel(job_id)
    assert cancelled.status == "cancelled"
    assert f"/apis/kubeflow.org/v1/namespaces/{NAMESPACE}/pytorchjobs/{name}" in s.api.deleted()
    assert name not in s.api.jobs and f"{name}-job" not in s.api.config_maps  # the pods' job file went with it
    assert "Job cancelled by tess" in [e.message for e in all_events(tess, job_id)]
    time.sleep(1.5)  # three supervisor passes
    assert tess.fine_tuning.jobs.retrieve(job_id).status == "cancelled"  # a gone PyTorchJob does not revive it
