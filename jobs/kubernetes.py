"""Kubernetes: a Kubeflow ``PyTorchJob`` (training-operator) for torchrun jobs, a ``batch/v1``
``Job`` for the others (evaluation, builds), through the official client.

A one-pod Job (``platform/kubernetes/job.yaml.j2``) runs the command in the job's image
(TensorRT-LLM's for its build) with the forgeline PVC mounted at ``mount_path``; its
scheduler id is ``job/<name>``. The PyTorchJob manifest (``platform/kubernetes/training/pytorchjob.yaml.j2``) has one Master and
``nodes - 1`` Worker replicas, each pod running ``torchrun`` for ``gpus_per_node``
processes with the c10d rendezvous on the Master pod (``<job>-master-0``, the service
the operator creates). GPUs are requested as ``nvidia.com/gpu`` on nodes labelled
``nvidia.com/gpu.product`` (H200 by default); checkpoints go to a shared ReadWriteMany
PVC; ``restartPolicy: OnFailure`` with ``backoffLimit`` restarts failed pods, and
``train.resume: auto`` continues from the newest complete checkpoint. The job file
reaches the pods in a ConfigMap owned by the job (deleted with it).

Not run against a live cluster here: the manifests and the API calls are tested against
the ``kubernetes`` client's own models and request code with a fake HTTP layer.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import yaml

from registry.errors import MissingDependencyError

from .base import (
    JobHandle,
    JobPhase,
    JobSpec,
    JobStatus,
    LaunchError,
    dns_label,
    forwarded_env,
    job_command,
)
from .config import ClusterSpec, time_limit_seconds
from .outcome import with_outcome
from .templates import render

log = logging.getLogger(__name__)

GROUP = "kubeflow.org"
VERSION = "v1"
PLURAL = "pytorchjobs"
JOB_MOUNT = "/etc/forgeline-job"
LABEL_JOB = "forgeline.dev/job-id"
LABEL_MODEL = "forgeline.dev/model"
LABEL_STAGE = "forgeline.dev/stage"
BATCH_PREFIX = "job/"  # scheduler ids of batch Jobs; a bare name is a PyTorchJob
_CONDITIONS: dict[str, JobPhase] = {
    "Created": JobPhase.PENDING,
    "Running": JobPhase.RUNNING,
    "Restarting": JobPhase.REQUEUED,
    "Suspended": JobPhase.PENDING,
    "Succeeded": JobPhase.SUCCEEDED,
    "Failed": JobPhase.FAILED,
}
_BATCH_CONDITIONS: dict[str, JobPhase] = {
    "Complete": JobPhase.SUCCEEDED,
    "Failed": JobPhase.FAILED,
    "Suspended": JobPhase.PENDING,
}


def _client() -> Any:
    try:
        import kubernetes
    except ImportError as err:
        raise MissingDependencyError(
            "the kubernetes client is not installed; fix: pip install 'forgeline[k8s]'", param="cluster.kind"
        ) from err
    return kubernetes


def default_api_client() -> Any:
    """An ``ApiClient`` from the in-cluster service account, else ``~/.kube/config`` (``KUBECONFIG``)."""
    k8s = _client()
    try:
        k8s.config.load_incluster_config()
    except k8s.config.ConfigException:
        try:
            k8s.config.load_kube_config()
        except (k8s.config.ConfigException, OSError) as err:
            raise LaunchError(f"no Kubernetes credentials: {err}; fix: set KUBECONFIG or run inside the cluster") from err
    return k8s.client.ApiClient()


def job_name(job_id: str, model: str) -> str:
    """The job's name (PyTorchJob or Job): DNS-safe, short enough for the pod and service names the operator derives.

    Cut short, a name would lose the end of the id, which is what keeps a version's training,
    evaluation and build jobs apart; a long one keeps the model's start and a digest of the id.
    """
    name = dns_label(f"{model}-{job_id}", limit=63)
    if len(name) <= 45:
        return name
    return f"{dns_label(model, limit=28)}-{hashlib.sha256(job_id.encode()).hexdigest()[:16]}"


def _pod_env(cluster: ClusterSpec, extra: dict[str, str] | None = None) -> list[dict[str, str]]:
    env = {"FORGELINE_HOME": cluster.mount_path, "PYTHONUNBUFFERED": "1"}
    # A tracking server or database reachable from the pods is forwarded; SQLite files on this
    # machine are not (the pods keep theirs on the PVC under FORGELINE_HOME).
    for name, value in forwarded_env().items():
        if name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "FORGELINE_DB_URL") and "://" in value and not value.startswith(("sqlite", "file")):
            env[name] = value
    env.update(cluster.env)
    env.update(extra or {})
    return [{"name": k, "value": v} for k, v in env.items()]


def torchrun_args(spec: JobSpec, *, name: str, is_host: bool) -> list[str]:
    """The container command of one replica: torchrun with the rendezvous on the Master pod."""
    cluster, job_id = spec.cluster, spec.id
    python = cluster.python or "python"
    return [
        python, "-m", "torch.distributed.run",
        f"--nnodes={cluster.nodes}",
        f"--nproc-per-node={cluster.nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={name}-master-0:{cluster.rdzv_port}",
        f"--rdzv-id={job_id}",
        f"--rdzv-conf=is_host={'true' if is_host else 'false'}",
        "--max-restarts=0",  # a failed pod restarts (OnFailure) and resumes from the newest checkpoint
        *job_command(spec.model_copy(update={"python": False}), python="", job_files=JOB_MOUNT),
    ]


def _resources(spec: JobSpec) -> tuple[dict[str, Any], dict[str, Any], dict[str, str] | None]:
    """Requests, limits and node selector of one pod."""
    gpus, cluster = spec.gpus_per_node, spec.cluster
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if gpus:
        # Quantities as strings (the API's Quantity type); extended resources need requests == limits.
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(gpus)
    if cluster.cpus_per_node:
        requests["cpu"] = str(cluster.cpus_per_node)
    selector = {"nvidia.com/gpu.product": cluster.gpu_product} if gpus and cluster.gpu_product else None
    return requests, limits, selector


def render_manifests(spec: JobSpec) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The job's manifest (a PyTorchJob for torchrun, else a batch Job) and its files' ConfigMap (None without files)."""
    cluster, job_id = spec.cluster, spec.id
    name = job_name(job_id, spec.name)
    labels = {LABEL_JOB: job_id, LABEL_MODEL: dns_label(spec.name, limit=63), LABEL_STAGE: spec.stage,
              "app.kubernetes.io/managed-by": "forgeline"}
    requests, limits, selector = _resources(spec)
    deadline_s = time_limit_seconds(cluster.time_limit) if cluster.time_limit else None
    config_map = None
    if spec.files:
        config_map = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{name}-job", "namespace": cluster.namespace, "labels": labels},
            "data": dict(spec.files),
        }
    common = dict(
        job_id=job_id, name=spec.name, job_name=name, namespace=cluster.namespace, labels=labels,
        service_account=cluster.service_account, node_selector=selector, image=spec.image,
        env=_pod_env(cluster, spec.env), resources=requests, limits=limits, mount_path=cluster.mount_path,
        pvc=cluster.pvc, config_map=config_map["metadata"]["name"] if config_map else None, deadline_s=deadline_s,
    )
    if not spec.torchrun:
        command = job_command(spec, python=cluster.python or "python", job_files=JOB_MOUNT)
        text = render("kubernetes/job.yaml.j2", **common, stage=spec.stage, command=command,
                      working_dir=spec.mounts[0] if spec.mounts else None)
        return yaml.safe_load(text), config_map
    replicas = [{"type": "Master", "count": 1, "command": torchrun_args(spec, name=name, is_host=True)}]
    if cluster.nodes > 1:
        replicas.append(
            {"type": "Worker", "count": cluster.nodes - 1, "command": torchrun_args(spec, name=name, is_host=False)}
        )
    text = render("kubernetes/training/pytorchjob.yaml.j2", **common, max_restarts=cluster.max_restarts,
                  replicas=replicas, rdzv_port=cluster.rdzv_port)
    return yaml.safe_load(text), config_map


def _is_batch(handle: JobHandle) -> bool:
    return handle.backend_id.startswith(BATCH_PREFIX)


class KubernetesLauncher:
    """Submits, follows and cancels PyTorchJobs (``CustomObjectsApi``) and Jobs (``BatchV1Api``); ``[k8s]`` extra."""

    kind = "kubernetes"

    def __init__(self, api_client: Any | None = None) -> None:
        self._api_client = api_client

    @property
    def api_client(self) -> Any:
        if self._api_client is None:
            self._api_client = default_api_client()
        return self._api_client

    def _custom(self) -> Any:
        return _client().client.CustomObjectsApi(self.api_client)

    def _core(self) -> Any:
        return _client().client.CoreV1Api(self.api_client)

    def _batch(self) -> Any:
        return _client().client.BatchV1Api(self.api_client)

    def submit(self, spec: JobSpec) -> JobHandle:
        from registry.settings import forgeline_home, private_dir

        k8s = _client()
        cluster = spec.cluster
        manifest, config_map = render_manifests(spec)
        job_dir = forgeline_home() / "launches" / spec.id
        private_dir(job_dir)
        kind = manifest["kind"]
        (job_dir / f"{kind.lower()}.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
        name = manifest["metadata"]["name"]
        try:
            if kind == "PyTorchJob":
                created = self._custom().create_namespaced_custom_object(
                    group=GROUP, version=VERSION, namespace=cluster.namespace, plural=PLURAL, body=manifest
                )
                uid, api_version = created["metadata"]["uid"], f"{GROUP}/{VERSION}"
            else:
                created = self._batch().create_namespaced_job(namespace=cluster.namespace, body=manifest)
                uid, api_version = created.metadata.uid, "batch/v1"
            if config_map is not None:
                owner = k8s.client.V1OwnerReference(api_version=api_version, kind=kind, name=name, uid=uid,
                                                    block_owner_deletion=False)
                meta = config_map["metadata"]
                body = k8s.client.V1ConfigMap(
                    metadata=k8s.client.V1ObjectMeta(name=meta["name"], namespace=meta["namespace"], labels=meta["labels"],
                                                     owner_references=[owner]),
                    data=config_map["data"],
                )
                self._core().create_namespaced_config_map(namespace=cluster.namespace, body=body)
        except k8s.client.ApiException as err:
            raise LaunchError(f"Kubernetes refused {kind} {name} in {cluster.namespace}: {err.status} {err.reason}: "
                              f"{(err.body or '').strip()[:300]}") from err
        log.info("submitted %s (%s) as %s %s/%s", spec.id, spec.stage, kind, cluster.namespace, name)
        return JobHandle(
            id=spec.id, kind=self.kind, backend_id=name if kind == "PyTorchJob" else f"{BATCH_PREFIX}{name}",
            name=spec.name, job_dir=str(job_dir), output_dir=spec.output_dir or str(job_dir), cluster=cluster,
            stage=spec.stage,
        )

    def status(self, handle: JobHandle) -> JobStatus:
        if _is_batch(handle):
            return self._batch_status(handle)
        k8s = _client()
        namespace = handle.cluster.namespace
        try:
            obj = self._custom().get_namespaced_custom_object(
                group=GROUP, version=VERSION, namespace=namespace, plural=PLURAL, name=handle.backend_id
            )
        except k8s.client.ApiException as err:
            if err.status == 404:
                return JobStatus(phase=JobPhase.UNKNOWN, detail=f"PyTorchJob {namespace}/{handle.backend_id} not found (deleted?)")
            raise LaunchError(f"cannot read PyTorchJob {handle.backend_id}: {err.status} {err.reason}") from err
        conditions = [c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
        # The operator appends conditions as the job moves on; the last true one is where it is.
        latest = conditions[-1] if conditions else None
        phase = _CONDITIONS.get(latest["type"], JobPhase.UNKNOWN) if latest else JobPhase.PENDING
        detail = latest["type"] + (f": {latest['message']}" if latest and latest.get("message") else "") if latest else "submitted"
        pods = self._pods(handle)
        restarts = sum(cs.restart_count or 0 for p in pods for cs in (p.status.container_statuses or []))
        nodes = sorted({p.spec.node_name for p in pods if p.spec and p.spec.node_name})
        # result.json on the PVC, when this machine mounts it at mount_path too (the fine-tuning control plane).
        return with_outcome(JobStatus(phase=phase, detail=detail, restarts=restarts, nodes=nodes), handle)

    def _batch_status(self, handle: JobHandle) -> JobStatus:
        k8s = _client()
        name, namespace = handle.backend_id.removeprefix(BATCH_PREFIX), handle.cluster.namespace
        try:
            obj = self._batch().read_namespaced_job(name=name, namespace=namespace)
        except k8s.client.ApiException as err:
            if err.status == 404:
                return JobStatus(phase=JobPhase.UNKNOWN, detail=f"Job {namespace}/{name} not found (deleted?)")
            raise LaunchError(f"cannot read Job {name}: {err.status} {err.reason}") from err
        status = obj.status
        conditions = [c for c in (status.conditions or []) if c.status == "True"]
        latest = conditions[-1] if conditions else None
        if latest is not None and latest.type in _BATCH_CONDITIONS:
            phase = _BATCH_CONDITIONS[latest.type]
            detail = latest.type + (f": {latest.message}" if latest.message else "")
        elif status.active:
            phase, detail = JobPhase.RUNNING, f"{status.active} pod(s) active"
        else:
            phase, detail = JobPhase.PENDING, "submitted"
        pods = self._pods(handle)
        nodes = sorted({p.spec.node_name for p in pods if p.spec and p.spec.node_name})
        return with_outcome(JobStatus(phase=phase, detail=detail, nodes=nodes), handle)

    def _pods(self, handle: JobHandle) -> list[Any]:
        pods = self._core().list_namespaced_pod(namespace=handle.cluster.namespace, label_selector=f"{LABEL_JOB}={handle.id}")
        # Master first, then workers by index (the operator names pods <job>-<type>-<index>).
        return sorted(pods.items, key=lambda p: ("master" not in p.metadata.name, p.metadata.name))

    def logs(self, handle: JobHandle, *, tail: int | None = None) -> str:
        k8s = _client()
        parts = []
        for pod in self._pods(handle):
            try:
                text = self._core().read_namespaced_pod_log(
                    name=pod.metadata.name, namespace=handle.cluster.namespace,
                    container="job" if _is_batch(handle) else "pytorch", tail_lines=tail,
                )
            except k8s.client.ApiException as err:
                text = f"(no log: {err.status} {err.reason})\n"
            if text and not text.endswith("\n"):
                text += "\n"
            parts.append(f"==> {pod.metadata.name} <==\n{text}")
        return "".join(parts)

    def cancel(self, handle: JobHandle) -> None:
        k8s = _client()
        if _is_batch(handle):
            name = handle.backend_id.removeprefix(BATCH_PREFIX)
            try:
                self._batch().delete_namespaced_job(name=name, namespace=handle.cluster.namespace,
                                                    propagation_policy="Foreground")
            except k8s.client.ApiException as err:
                if err.status != 404:
                    raise LaunchError(f"cannot delete Job {name}: {err.status} {err.reason}") from err
            log.info("deleted Job %s/%s (%s)", handle.cluster.namespace, name, handle.id)
            return
        try:
            self._custom().delete_namespaced_custom_object(
                group=GROUP, version=VERSION, namespace=handle.cluster.namespace, plural=PLURAL, name=handle.backend_id,
                propagation_policy="Foreground",  # pods and the job's ConfigMap go with it
            )
        except k8s.client.ApiException as err:
            if err.status != 404:
                raise LaunchError(f"cannot delete PyTorchJob {handle.backend_id}: {err.status} {err.reason}") from err
        log.info("deleted PyTorchJob %s/%s (%s)", handle.cluster.namespace, handle.backend_id, handle.id)
