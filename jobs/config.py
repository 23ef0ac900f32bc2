"""The recipe's ``cluster`` section: where a job's processes run (training, evaluation, builds).

Defined here, beside the launchers that consume it, and composed into the recipe by
``forgeline.recipe``. One switch (``kind``) moves the same recipe between this machine,
a Slurm cluster and a Kubernetes cluster; the other fields say how big the job is and
what the scheduler needs to know. Fields that only one kind reads are rejected for the
others, so a setting never silently does nothing.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ClusterKind = Literal["local", "slurm", "kubernetes", "hostfile"]

# Slurm's --time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.,-]+$")
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

_ONLY_FOR: dict[str, tuple[str, ...]] = {
    "partition": ("slurm",),
    "account": ("slurm",),
    "sbatch_options": ("slurm",),
    "container_mounts": ("slurm",),
    "setup": ("slurm", "hostfile"),
    "python": ("slurm", "hostfile", "kubernetes"),
    "namespace": ("kubernetes",),
    "pvc": ("kubernetes",),
    "mount_path": ("kubernetes",),
    "gpu_product": ("kubernetes",),
    "service_account": ("kubernetes",),
    "hosts": ("hostfile",),
    "time_limit": ("slurm", "kubernetes"),
    "container_image": ("slurm", "kubernetes"),
    "shared_dir": ("slurm", "hostfile"),
    "max_restarts": ("slurm", "kubernetes"),
}


def applies_to(field: str, kind: str) -> bool:
    """Whether a ``cluster`` field means something for ``kind`` (sizes do not, for ``local``)."""
    if kind == "local" and field in ("nodes", "gpus_per_node", "processes_per_node", "cpus_per_node"):
        return False
    return kind in _ONLY_FOR.get(field, (kind,))


def time_limit_seconds(value: str) -> int:
    """Seconds in a Slurm-style time limit (``90`` minutes, ``4:00:00``, ``2-00:00:00``)."""
    match = _TIME.match(value)
    if not match:
        raise ValueError(f"cannot read time limit {value!r}")
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if days is None:
        # MM | MM:SS | HH:MM:SS
        if second is None:
            return (first or 0) * 60
        if third is None:
            return (first or 0) * 60 + second
        return (first or 0) * 3600 + second * 60 + third
    # D-HH | D-HH:MM | D-HH:MM:SS
    return days * 86400 + (first or 0) * 3600 + (second or 0) * 60 + (third or 0)


class ClusterSpec(BaseModel):
    """Where and how big: this machine, a Slurm cluster, a Kubernetes cluster or a DeepSpeed hostfile."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ClusterKind = Field(
        default="local",
        description="`local`: this machine (`distributed.nproc` processes); `slurm`: sbatch with one srun torchrun "
        "per node; `kubernetes`: a Kubeflow PyTorchJob; `hostfile`: DeepSpeed's own launcher over ssh/pdsh.",
    )
    nodes: int = Field(default=1, ge=1, description="Machines the job spans.")
    gpus_per_node: int = Field(
        default=1, ge=0,
        description="GPUs per node, one training process each (torchrun --nproc-per-node). 0: CPU-only nodes, "
        "no GPU requested; then `processes_per_node` processes run on each node.",
    )
    processes_per_node: int | None = Field(
        default=None, ge=1,
        description="Training processes per node; default: gpus_per_node (1 on CPU-only nodes).",
    )
    cpus_per_node: int | None = Field(
        default=None, ge=1, description="CPU cores per node for the job (Slurm --cpus-per-task, Kubernetes cpu request)."
    )
    time_limit: str | None = Field(
        default=None,
        description="Wall-clock limit, Slurm style: `MM`, `HH:MM:SS` or `D-HH:MM:SS` (Kubernetes: activeDeadlineSeconds). "
        "On Slurm the job requeues itself shortly before the limit and resumes from its newest checkpoint.",
    )
    max_restarts: int = Field(
        default=2, ge=0,
        description="Times a failed job is started again, resuming from its newest complete checkpoint "
        "(Slurm: requeues; Kubernetes: backoffLimit).",
    )
    rdzv_port: int = Field(default=29500, ge=1024, le=65535, description="TCP port of the rendezvous on the first node.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment for every training process (e.g. NCCL_IB_HCA, GLOO_SOCKET_IFNAME)."
    )
    container_image: str | None = Field(
        default=None,
        description="Image the training runs in. Slurm: pyxis/enroot `--container-image` (e.g. "
        "`nvcr.io#nvidia/pytorch:25.01-py3` with forgeline installed); Kubernetes: required.",
    )
    # --- Slurm ---
    partition: str | None = Field(default=None, description="slurm: partition (--partition).")
    account: str | None = Field(default=None, description="slurm: account charged (--account).")
    sbatch_options: list[str] = Field(
        default_factory=list, description="slurm: extra sbatch options, e.g. [`--exclusive`, `--mem=0`, `--qos=high`]."
    )
    container_mounts: list[str] = Field(
        default_factory=list,
        description="slurm + container_image: pyxis `--container-mounts` (`SRC:DST[:FLAGS]`); the shared folder is always mounted.",
    )
    setup: list[str] = Field(
        default_factory=list,
        description="slurm, hostfile: shell lines run on every node before training (e.g. `module load cuda`, "
        "`source /shared/venv/bin/activate`).",
    )
    python: str | None = Field(
        default=None,
        description="Python on the nodes; default: this interpreter (Slurm, hostfile: a shared install), "
        "`python` in a container.",
    )
    shared_dir: str | None = Field(
        default=None,
        description="slurm, hostfile: a folder every node mounts at the same path, for job files, logs and "
        "checkpoints; default: $FORGELINE_HOME (which must then be shared).",
    )
    # --- Kubernetes ---
    namespace: str = Field(default="default", description="kubernetes: namespace of the PyTorchJob.")
    pvc: str | None = Field(
        default=None,
        description="kubernetes: a ReadWriteMany PersistentVolumeClaim every pod mounts for checkpoints (required).",
    )
    mount_path: str = Field(default="/forgeline", description="kubernetes: where the PVC is mounted (the pods' $FORGELINE_HOME).")
    gpu_product: str | None = Field(
        default="NVIDIA-H200",
        description="kubernetes: nodeSelector `nvidia.com/gpu.product` (GPU feature discovery label); null for any GPU.",
    )
    service_account: str | None = Field(default=None, description="kubernetes: service account of the pods.")
    # --- DeepSpeed hostfile ---
    hosts: list[str] = Field(
        default_factory=list,
        description="hostfile: the nodes, reachable by passwordless ssh; the first one hosts the rendezvous.",
    )

    @field_validator("time_limit")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None and (not _TIME.match(value) or time_limit_seconds(value) <= 0):
            raise ValueError(f"time_limit {value!r} is not a Slurm time: use `90` (minutes), `4:00:00` or `1-12:00:00`")
        return value

    @field_validator("partition", "account")
    @classmethod
    def _slurm_name(cls, value: str | None) -> str | None:
        if value is not None and not _SLURM_NAME.match(value):
            raise ValueError(f"{value!r} is not a Slurm name (letters, digits, _ . - and , between several)")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k in value if not _ENV_NAME.match(k)]
        if bad:
            raise ValueError(f"not environment variable names: {', '.join(bad)} (letters, digits and _, not first a digit)")
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not _K8S_NAME.match(value) or len(value) > 63:
            raise ValueError(f"namespace {value!r} is not a Kubernetes name (lower-case letters, digits and -)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ClusterSpec:
        # Compared with the defaults, not model_fields_set, so a full dump (the job store, JSON
        # across processes) validates again.
        fields = type(self).model_fields
        misplaced = sorted(
            f for f, kinds in _ONLY_FOR.items() if self.kind not in kinds and getattr(self, f) != fields[f].get_default(call_default_factory=True)
        )
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)}: not read by kind {self.kind}; remove them, or pick the kind they are for")
        if self.kind == "local" and (self.nodes > 1 or self.gpus_per_node != 1 or self.processes_per_node is not None):
            raise ValueError("kind: local runs on this machine: use distributed.nproc, or kind: slurm / kubernetes for nodes")
        if self.kind == "kubernetes":
            if not self.container_image:
                raise ValueError("kind: kubernetes needs container_image (an image with forgeline installed)")
            if not self.pvc:
                raise ValueError("kind: kubernetes needs pvc: a ReadWriteMany claim every pod mounts for checkpoints")
        if self.kind == "hostfile" and len(self.hosts) != self.nodes:
            raise ValueError(f"kind: hostfile needs one entry in hosts per node ({self.nodes}); got {len(self.hosts)}")
        if self.container_mounts and not self.container_image:
            raise ValueError("container_mounts need container_image")
        return self

    @property
    def nproc_per_node(self) -> int:
        """Training processes on each node."""
        if self.processes_per_node is not None:
            return self.processes_per_node
        return self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        """Training processes in the whole job."""
        return self.nodes * self.nproc_per_node
