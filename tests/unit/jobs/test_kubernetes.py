"""Kubeflow PyTorchJob and batch Job manifests, and the calls the launcher makes with the official client.

No cluster runs here: the manifests are checked for structure and against the client's
own models, and the API calls go through the real ``kubernetes`` client (serialisation,
URLs, error handling) down to a fake urllib3 pool manager that plays the API server.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import pytest

from jobs.base import JobHandle, JobPhase, JobSpec, LaunchError
from jobs.config import ClusterSpec
from jobs.kubernetes import KubernetesLauncher, render_manifests
from tests.unit.jobs.fake_kube import FakeApiServer, api_client
from training.cluster_job import train_spec
from training.job import TrainJob

k8s = pytest.importorskip("kubernetes", reason="the [k8s] extra (kubernetes client) is not installed")

BASE = "/apis/kubeflow.org/v1/namespaces/train/pytorchjobs"


def _cluster(**fields: Any) -> ClusterSpec:
    values = {"kind": "kubernetes", "namespace": "train", "nodes": 3, "gpus_per_node": 8,
              "container_image": "ghcr.io/acme/forgeline:0.1", "pvc": "forgeline-ckpt", **fields}
    return ClusterSpec.model_validate(values)


def _replicas(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["pytorchReplicaSpecs"]


def _container(replica: dict[str, Any]) -> dict[str, Any]:
    (container,) = replica["template"]["spec"]["containers"]
    return container


def test_manifest_is_a_pytorchjob_with_one_master_and_workers(train_job: TrainJob) -> None:
    manifest, _ = render_manifests(train_spec(train_job, _cluster(), job_id="fl-261129-abc123"))
    assert (manifest["apiVersion"], manifest["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert manifest["metadata"]["name"] == "support-router-fl-261129-abc123"
    assert manifest["metadata"]["namespace"] == "train"
    replicas = _replicas(manifest)
    assert {k: v["replicas"] for k, v in replicas.items()} == {"Master": 1, "Worker": 2}
    assert {v["restartPolicy"] for v in replicas.values()} == {"OnFailure"}  # failed pods restart and resume
    assert manifest["spec"]["runPolicy"]["backoffLimit"] == 2
    assert "activeDeadlineSeconds" not in manifest["spec"]["runPolicy"]


def test_pods_request_h200_gpus_and_share_the_checkpoint_volume(train_job: TrainJob) -> None:
    manifest, _ = render_manifests(train_spec(train_job, _cluster(cpus_per_node=96), job_id="fl-1-a"))
    for replica in _replicas(manifest).values():
        spec = replica["template"]["spec"]
        container = _container(replica)
        assert container["resources"]["limits"] == {"nvidia.com/gpu": "8"}
        assert container["resources"]["requests"] == {"nvidia.com/gpu": "8", "cpu": "96"}
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["checkpoints"]["persistentVolumeClaim"] == {"claimName": "forgeline-ckpt"}
        assert volumes["job"]["configMap"] == {"name": "support-router-fl-1-a-job"}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts == {"checkpoints": "/forgeline", "job": "/etc/forgeline-job", "dshm": "/dev/shm"}


def test_rendezvous_runs_on_the_master_pod(train_job: TrainJob) -> None:
    manifest, _ = render_manifests(train_spec(train_job, _cluster(rdzv_port=23456), job_id="fl-1-a"))
    master, worker = (_container(_replicas(manifest)[t]) for t in ("Master", "Worker"))
    for container, is_host in ((master, "true"), (worker, "false")):
        command = container["command"]
        assert command[:3] == ["python", "-m", "torch.distributed.run"]
        for flag in ("--nnodes=3", "--nproc-per-node=8", "--rdzv-backend=c10d",
                     "--rdzv-endpoint=support-router-fl-1-a-master-0:23456", "--rdzv-id=fl-1-a",
                     f"--rdzv-conf=is_host={is_host}", "--max-restarts=0"):
            assert flag in command
        assert command[-3:] == ["-m", "training.entry", "/etc/forgeline-job/job.json"]
        # The operator finds the master port by these names and sets MASTER_ADDR/PORT from them.
        assert container["name"] == "pytorch"
        assert container["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456}]


def test_cpu_single_node_job_has_no_gpu_request_no_selector_and_no_workers(train_job: TrainJob) -> None:
    manifest, _ = render_manifests(train_spec(train_job, _cluster(nodes=1, gpus_per_node=0, time_limit="2:00:00"), job_id="fl-1-a"))
    assert set(_replicas(manifest)) == {"Master"}
    spec = _replicas(manifest)["Master"]["template"]["spec"]
    assert "nodeSelector" not in spec and "tolerations" not in spec
    assert _container(_replicas(manifest)["Master"])["resources"] == {"requests": {}, "limits": {}}
    assert manifest["spec"]["runPolicy"]["activeDeadlineSeconds"] == 7200


def test_pods_get_the_tracking_server_but_not_local_sqlite(train_job: TrainJob, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.mlops:5000")
    monkeypatch.setenv("FORGELINE_DB_URL", "sqlite:////home/me/.forgeline/control.db")
    manifest, _ = render_manifests(train_spec(train_job, _cluster(env={"NCCL_DEBUG": "WARN"}), job_id="fl-1-a"))
    env = {e["name"]: e["value"] for e in _container(_replicas(manifest)["Master"])["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.mlops:5000"
    assert env["FORGELINE_HOME"] == "/forgeline" and env["NCCL_DEBUG"] == "WARN"
    assert "FORGELINE_DB_URL" not in env


def test_job_file_points_checkpoints_at_the_pvc(train_job: TrainJob) -> None:
    _, config_map = render_manifests(train_spec(train_job.model_copy(update={"recipe_file": "/home/me/r.yaml"}), _cluster(), job_id="fl-1-a"))
    job = TrainJob.model_validate_json(config_map["data"]["job.json"])
    assert job.output_dir == "/forgeline/jobs/support-router/0123456789abcdef"
    assert job.recipe_file is None  # a path on this machine does not exist in the pod
    assert job.distributed.zero_stage == 3


def test_pod_templates_are_valid_kubernetes_objects(train_job: TrainJob) -> None:
    """Every key survives the client's own V1PodTemplateSpec model (a typo would be dropped)."""
    manifest, _ = render_manifests(train_spec(train_job, _cluster(service_account="trainer", cpus_per_node=8), job_id="fl-1-a"))
    client = k8s.client.ApiClient()
    for replica in _replicas(manifest).values():
        template = replica["template"]
        model = k8s.client.V1PodTemplateSpec.from_dict(template)
        assert client.sanitize_for_serialization(model) == template
        assert model.spec.service_account_name == "trainer"


# --- the API calls, through the real client down to a fake HTTP layer --------------------------


@pytest.fixture
def server() -> FakeApiServer:
    return FakeApiServer()


@pytest.fixture
def launcher(server: FakeApiServer) -> KubernetesLauncher:
    return KubernetesLauncher(api_client=api_client(server))


def _handle(cluster: ClusterSpec) -> JobHandle:
    return JobHandle(id="fl-1-a", kind="kubernetes", backend_id="support-router-fl-1-a", name="support-router",
                     job_dir="/tmp/x", output_dir="/forgeline/jobs/support-router/0123456789abcdef", cluster=cluster)


def test_submit_creates_the_pytorchjob_then_its_owned_configmap(
    launcher: KubernetesLauncher, server: FakeApiServer, train_job: TrainJob
) -> None:
    cluster = _cluster()
    manifest, config_map = render_manifests(train_spec(train_job, cluster, job_id="fl-1-a"))
    server.route("POST", BASE, 201, {**manifest, "metadata": {**manifest["metadata"], "uid": "uid-123"}})
    server.route("POST", "/api/v1/namespaces/train/configmaps", 201, config_map)
    handle = launcher.submit(train_spec(train_job, cluster, job_id="fl-1-a"))
    assert handle.backend_id == "support-router-fl-1-a"
    (m1, p1, body1), (m2, p2, body2) = server.requests
    assert (m1, p1) == ("POST", BASE) and body1 == manifest
    assert (m2, p2) == ("POST", "/api/v1/namespaces/train/configmaps")
    assert body2["metadata"]["ownerReferences"] == [
        {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": "support-router-fl-1-a", "uid": "uid-123",
         "blockOwnerDeletion": False}
    ]
    assert TrainJob.model_validate_json(body2["data"]["job.json"]).output_dir == handle.output_dir


def test_a_refused_submit_says_why(launcher: KubernetesLauncher, server: FakeApiServer, train_job: TrainJob) -> None:
    server.route("POST", BASE, 403, {"kind": "Status", "message": 'pytorchjobs.kubeflow.org is forbidden: User "me"'})
    with pytest.raises(LaunchError, match="403.*forbidden"):
        launcher.submit(train_spec(train_job, _cluster(), job_id="fl-1-a"))


def _pod(name: str, node: str, restarts: int) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"nodeName": node, "containers": [{"name": "pytorch"}]},
            "status": {"containerStatuses": [{"name": "pytorch", "restartCount": restarts, "ready": True,
                                              "image": "i", "imageID": "", "containerID": ""}]}}


@pytest.mark.parametrize(
    ("conditions", "phase"),
    [([], JobPhase.PENDING),
     ([{"type": "Created", "status": "True"}], JobPhase.PENDING),
     ([{"type": "Created", "status": "True"}, {"type": "Running", "status": "True"}], JobPhase.RUNNING),
     ([{"type": "Running", "status": "False"}, {"type": "Restarting", "status": "True"}], JobPhase.REQUEUED),
     ([{"type": "Running", "status": "False"}, {"type": "Succeeded", "status": "True", "message": "done"}], JobPhase.SUCCEEDED),
     ([{"type": "Running", "status": "False"}, {"type": "Failed", "status": "True", "message": "backoff"}], JobPhase.FAILED)],
)
def test_status_follows_the_operator_conditions_and_pods(
    launcher: KubernetesLauncher, server: FakeApiServer, conditions: list[dict[str, str]], phase: JobPhase
) -> None:
    server.route("GET", f"{BASE}/support-router-fl-1-a", 200, {"kind": "PyTorchJob", "status": {"conditions": conditions}})
    server.route("GET", "/api/v1/namespaces/train/pods", 200, {"kind": "PodList", "items": [
        _pod("support-router-fl-1-a-worker-0", "gpu-b", 1), _pod("support-router-fl-1-a-master-0", "gpu-a", 0)]})
    status = launcher.status(_handle(_cluster()))
    assert status.phase is phase
    assert (status.restarts, status.nodes) == (1, ["gpu-a", "gpu-b"])
    path, _, query = server.requests[-1][1].partition("?")
    assert (path, parse_qs(query)) == ("/api/v1/namespaces/train/pods", {"labelSelector": ["forgeline.dev/job-id=fl-1-a"]})


def test_status_of_a_deleted_job_is_unknown(launcher: KubernetesLauncher) -> None:
    assert launcher.status(_handle(_cluster())).phase is JobPhase.UNKNOWN


def test_logs_come_from_every_pod_master_first(launcher: KubernetesLauncher, server: FakeApiServer) -> None:
    server.route("GET", "/api/v1/namespaces/train/pods", 200, {"kind": "PodList", "items": [
        _pod("support-router-fl-1-a-worker-0", "gpu-b", 0), _pod("support-router-fl-1-a-master-0", "gpu-a", 0)]})
    server.route("GET", "/api/v1/namespaces/train/pods/support-router-fl-1-a-master-0/log", 200, "step 10 loss 1.2\n")
    server.route("GET", "/api/v1/namespaces/train/pods/support-router-fl-1-a-worker-0/log", 200, "worker ready")
    text = launcher.logs(_handle(_cluster()), tail=50)
    assert text == ("==> support-router-fl-1-a-master-0 <==\nstep 10 loss 1.2\n"
                    "==> support-router-fl-1-a-worker-0 <==\nworker ready\n")
    query = parse_qs(server.requests[1][1].partition("?")[2])
    assert (query["container"], query["tailLines"]) == (["pytorch"], ["50"])


def test_cancel_deletes_the_job_with_its_pods(launcher: KubernetesLauncher, server: FakeApiServer) -> None:
    server.route("DELETE", f"{BASE}/support-router-fl-1-a", 200, {"kind": "Status", "status": "Success"})
    launcher.cancel(_handle(_cluster()))
    method, path, _ = server.requests[0]
    path, _, query = path.partition("?")
    assert (method, path, parse_qs(query)) == ("DELETE", f"{BASE}/support-router-fl-1-a", {"propagationPolicy": ["Foreground"]})


def test_cancel_of_a_job_already_gone_is_quiet(launcher: KubernetesLauncher) -> None:
    launcher.cancel(_handle(_cluster()))


# --- one-pod batch Jobs: evaluation and builds -------------------------------------------------

BATCH = "/apis/batch/v1/namespaces/train/jobs"


def _eval_spec(**fields: Any) -> JobSpec:
    values: dict[str, Any] = {"id": "fl-1-e", "stage": "evaluate", "name": "support-router",
                              "command": ["-m", "forgeline", "evaluate", "support-router", "3"],
                              "cluster": _cluster(nodes=1, gpus_per_node=1), **fields}
    return JobSpec(**values)


def test_a_job_that_is_not_torchrun_is_a_batch_job_with_one_pod() -> None:
    manifest, config_map = render_manifests(_eval_spec())
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job") and config_map is None
    assert manifest["metadata"]["labels"]["forgeline.dev/stage"] == "evaluate"
    assert manifest["spec"]["backoffLimit"] == 0
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "forgeline", "evaluate", "support-router", "3"]
    assert container["image"] == "ghcr.io/acme/forgeline:0.1" and pod["restartPolicy"] == "Never"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]} == {"forgeline": "/forgeline", "dshm": "/dev/shm"}
    model = k8s.client.V1PodTemplateSpec.from_dict(manifest["spec"]["template"])
    assert k8s.client.ApiClient().sanitize_for_serialization(model) == manifest["spec"]["template"]


def test_a_container_job_brings_its_own_image_gpus_and_working_folder() -> None:
    spec = _eval_spec(stage="build", python=False, command=["python3", "/forgeline/engines/m/1/job/entry.py"],
                      container_image="nvcr.io/nvidia/tensorrt-llm/release:1", gpus=8, mounts=["/forgeline/engines/m/1"])
    manifest, _ = render_manifests(spec)
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "nvcr.io/nvidia/tensorrt-llm/release:1" and container["command"][0] == "python3"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert container["workingDir"] == "/forgeline/engines/m/1"
    assert manifest["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}


def test_long_ids_keep_job_names_apart() -> None:
    from jobs.kubernetes import job_name

    base = "ftjob-0123456789abcdef01234567-1"
    names = {job_name(f"{base}{suffix}", "ft-acme-support-router-large") for suffix in ("", "-evaluate", "-build")}
    assert len(names) == 3 and all(len(n) <= 45 for n in names)


def test_batch_jobs_are_submitted_followed_and_cancelled_through_the_batch_api(
    launcher: KubernetesLauncher, server: FakeApiServer
) -> None:
    spec = _eval_spec()
    manifest, _ = render_manifests(spec)
    name = manifest["metadata"]["name"]
    server.route("POST", BATCH, 201, {**manifest, "metadata": {**manifest["metadata"], "uid": "uid-9"}})
    handle = launcher.submit(spec)
    assert handle.backend_id == f"job/{name}" and handle.stage == "evaluate"
    assert server.requests[0][:2] == ("POST", BATCH) and len(server.requests) == 1  # no files: no ConfigMap

    server.route("GET", f"{BATCH}/{name}", 200, {"kind": "Job", "status": {"active": 1}})
    server.route("GET", "/api/v1/namespaces/train/pods", 200, {"kind": "PodList", "items": []})
    assert launcher.status(handle).phase is JobPhase.RUNNING
    server.route("GET", f"{BATCH}/{name}", 200, {"kind": "Job", "status": {"conditions": [
        {"type": "Failed", "status": "True", "message": "BackoffLimitExceeded"}]}})
    status = launcher.status(handle)
    assert status.phase is JobPhase.FAILED and "BackoffLimitExceeded" in status.detail

    server.route("DELETE", f"{BATCH}/{name}", 200, {"kind": "Status", "status": "Success"})
    launcher.cancel(handle)
    assert server.requests[-1][:2] == ("DELETE", f"{BATCH}/{name}?propagationPolicy=Foreground")
