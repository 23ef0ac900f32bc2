"""Engine build, target ``tensorrt-llm``: prepare the artifact, run the build job, write the manifest.

The work is split by where it can run:

1. here (forgeline's environment): the merged checkpoint (reusing the torch build) or the
   base with adapters kept separate for multi-LoRA, the ``trtllm-serve`` YAML and argv
   (`serving.artifacts.trtllm_config`), and a job description (`TrtllmJob`);
2. in TensorRT-LLM's release container, on H200s: ``trtllm_entry.py build`` does the FP8
   quantization or engine build and a smoke test, then writes ``job/build-result.json``;
3. here again: `finalize_trtllm_job` checks the result and writes the checksummed manifest.

The job runs through a local container runtime (docker, podman or enroot), or as a job of
the ``jobs`` seam (`trtllm_job_spec`): a detached container command on this machine, an
sbatch script running it through pyxis (``srun --container-image``) or a Kubernetes Job on
H200 nodes, both rendered from the templates in ``platform/`` and visible in ``forgeline
jobs``. Every launcher mounts the artifact at the same path inside the container as
outside, so paths in the job need no translation.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jobs.base import JobSpec
from jobs.config import ClusterSpec
from registry.errors import (
    ConfigError,
    ConflictError,
    ErrorCode,
    FieldProblem,
    ForgelineError,
    MissingDependencyError,
    NotFoundError,
)

from .torch_build import build_torch_artifact
from .trtllm_config import (
    ADAPTERS_DIR,
    CHECKPOINT_DIR,
    EXTRA_OPTIONS_FILE,
    TrtllmConfigError,
    TrtllmServeOptions,
    extra_llm_api_options,
    h200_serve_options,
    lora_options,
    render_yaml,
    serve_argv_template,
)
from .trtllm_manifest import (
    BUILD_RESULT,
    GpuTarget,
    Parallelism,
    Quantization,
    ServeConfig,
    TrtllmManifest,
    TrtllmRuntime,
    checksum_tree,
)
from .trtllm_version import GPU_ARCH, GPU_NAME, TRTLLM_IMAGE_DIGEST, TRTLLM_VERSION, image_reference

logger = logging.getLogger(__name__)

JOB_DIR = "job"
JOB_FILE = f"{JOB_DIR}/job.json"
ENTRY_FILE = f"{JOB_DIR}/trtllm_entry.py"
SPEC_FILE = f"{JOB_DIR}/build-spec.json"
LOG_FILE = f"{JOB_DIR}/build.log"
RUNTIME_ENV = "FORGELINE_CONTAINER_RUNTIME"

Runtime = Literal["docker", "podman", "enroot"]
Runner = Literal["local", "none"]


class TrtllmBuildOptions(BaseModel):
    """What ``forgeline build --target tensorrt-llm`` was asked for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quantize: Literal["none", "fp8"] = Field(default="none", description="`fp8`: ModelOpt FP8 weights and KV cache.")
    backend: Literal["pytorch", "tensorrt"] = Field(default="pytorch", description="`tensorrt` builds a serialized engine.")
    tp: int = Field(default=1, description="Tensor-parallel GPUs (1, 2, 4, 8).")
    pp: int = Field(default=1, ge=1, description="Pipeline stages.")
    multi_lora: bool = Field(default=False, description="Keep adapters separate and serve them per request.")
    max_batch_size: int = Field(default=256, gt=0, description="`--max_batch_size`.")
    max_num_tokens: int = Field(default=8192, gt=0, description="`--max_num_tokens`.")
    max_seq_len: int | None = Field(default=None, gt=0, description="`--max_seq_len`; None reads the model config.")
    calib_dataset: str = Field(default="cnn_dailymail", description="FP8 calibration data: HF dataset name or local folder.")
    calib_size: int = Field(default=512, gt=0, description="Calibration samples.")
    smoke_test: bool = Field(default=True, description="Start the worker once in the build job and run one completion.")

    @field_validator("tp")
    @classmethod
    def _one_node(cls, value: int) -> int:
        if value not in (1, 2, 4, 8):
            raise ValueError("must be 1, 2, 4 or 8 (GPUs of one H200 node)")
        return value


def build_options(**values: Any) -> TrtllmBuildOptions:
    """`TrtllmBuildOptions` from loose values (CLI flags); every problem in one error.

    Raises:
        ConfigError: a value is invalid (the message names the option and the fix).
    """
    try:
        return TrtllmBuildOptions(**values)
    except ValidationError as exc:
        problems = [
            FieldProblem(path=".".join(str(p) for p in err["loc"]) or "options", message=err["msg"], value=err.get("input"))
            for err in exc.errors()
        ]
        raise ConfigError(problems=problems, source="tensorrt-llm build options") from None


class TrtllmJob(BaseModel):
    """``job/job.json``: everything needed to launch the build and, later, finalize it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Job name (DNS-safe).")
    artifact: str = Field(description="Absolute artifact folder; mounted at the same path in the container.")
    image: str = Field(description="Container image reference.")
    gpus: int = Field(gt=0, description="GPUs the build needs (tp * pp).")
    command: list[str] = Field(description="argv run inside the container.")
    mounts: list[str] = Field(description="Host paths mounted at the same path.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment inside the container.")
    base_model: str = Field(description="Base model of the checkpoint.")
    merged_adapter: str | None = Field(default=None, description="Adapter merged into the checkpoint.")
    full_weights: str | None = Field(default=None, description="A full fine-tune's model folder, built in place of the base.")
    adapters: dict[str, str] = Field(default_factory=dict, description="Multi-LoRA adapters: name -> folder in the artifact.")
    build: TrtllmBuildOptions
    serve: TrtllmServeOptions

    @property
    def root(self) -> Path:
        return Path(self.artifact)


def _dns_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return name[:63].rstrip("-") or "forgeline"


def _copy_adapter(src: Path, dst: Path) -> None:
    if not (src / "adapter_config.json").is_file():
        raise NotFoundError(f"{src} is not a PEFT adapter folder (no adapter_config.json)", param="adapters")
    shutil.copytree(src, dst)


def prepare_trtllm_job(
    base_model: str,
    adapter: str | Path | None,
    out_dir: Path,
    options: TrtllmBuildOptions,
    *,
    name: str,
    adapter_name: str | None = None,
    extra_adapters: dict[str, Path] | None = None,
    overwrite: bool = False,
    full_weights: str | Path | None = None,
) -> TrtllmJob:
    """Write everything the in-container build needs into ``out_dir``.

    Args:
        base_model: hub id or folder of the base model.
        adapter: the version's PEFT adapter, merged unless ``options.multi_lora``.
        out_dir: the artifact folder (must not exist unless ``overwrite``).
        options: build options.
        name: job name (made DNS-safe).
        adapter_name: the adapter's name for multi-LoRA requests (default: its folder name).
        extra_adapters: multi-LoRA only: more adapters (name -> folder) on the same base.
        overwrite: replace an existing ``out_dir``.
        full_weights: a full fine-tune's model folder (trained from ``base_model``), built
            instead of the base; it has no adapter, so ``adapter`` must be None.

    Raises:
        ConflictError: ``out_dir`` exists.
        TrtllmConfigError: the options do not fit together or the adapters cannot be served.
    """
    out_dir = Path(out_dir).resolve()
    if extra_adapters and not options.multi_lora:
        raise TrtllmConfigError("extra adapters need multi-LoRA; add --multi-lora", param="multi_lora")
    if options.multi_lora and adapter is None and not extra_adapters:
        raise TrtllmConfigError("multi-LoRA needs at least one adapter; this version has none", param="multi_lora")
    if full_weights is not None and (adapter is not None or options.multi_lora):
        # Adapters are trained on the base's weights; a full fine-tune changed every one of them.
        raise TrtllmConfigError(
            "a full fine-tune has no adapter: build it without --multi-lora and extra adapters", param="multi_lora"
        )
    if out_dir.exists():
        if not overwrite:
            raise ConflictError(f"{out_dir} already exists; pass overwrite=True or remove it", param="out_dir")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    try:
        return _prepare(base_model, adapter, out_dir, options, name, adapter_name, extra_adapters or {}, full_weights)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _prepare(
    base_model: str,
    adapter: str | Path | None,
    out_dir: Path,
    options: TrtllmBuildOptions,
    name: str,
    adapter_name: str | None,
    extra_adapters: dict[str, Path],
    full_weights: str | Path | None = None,
) -> TrtllmJob:
    adapters: dict[str, Path] = {}
    if options.multi_lora:
        if adapter is not None:
            adapters[adapter_name or Path(adapter).name] = Path(adapter)
        adapters.update(extra_adapters)
    merged = None if options.multi_lora or adapter is None else Path(adapter)
    # The torch build merges (or copies) the weights and normalizes tokenizer + generation config.
    build_torch_artifact(base_model, merged, out_dir / CHECKPOINT_DIR, full_weights=full_weights)
    relative: dict[str, str] = {}
    for adapter_id, folder in adapters.items():
        relative[adapter_id] = f"{ADAPTERS_DIR}/{adapter_id}"
        _copy_adapter(folder, out_dir / relative[adapter_id])
    lora = lora_options({k: out_dir / v for k, v in relative.items()}, relative) if adapters else None
    serve = h200_serve_options(
        backend=options.backend,
        tp=options.tp,
        pp=options.pp,
        quantize=options.quantize,
        lora=lora,
        max_seq_len=options.max_seq_len,
        max_batch_size=options.max_batch_size,
        max_num_tokens=options.max_num_tokens,
    )
    (out_dir / EXTRA_OPTIONS_FILE).parent.mkdir(parents=True, exist_ok=True)
    (out_dir / EXTRA_OPTIONS_FILE).write_text(render_yaml(extra_llm_api_options(serve)))
    argv = serve_argv_template(serve)

    (out_dir / JOB_DIR).mkdir(exist_ok=True)
    shutil.copy2(Path(__file__).with_name("trtllm_entry.py"), out_dir / ENTRY_FILE)
    spec = {
        "expect_version": TRTLLM_VERSION,
        "artifact": str(out_dir),
        "backend": options.backend,
        "quantize": options.quantize,
        "tp_size": options.tp,
        "pp_size": options.pp,
        "checkpoint": CHECKPOINT_DIR,
        "model_dir": serve.model_dir,
        "limits": {"max_batch_size": serve.max_batch_size, "max_num_tokens": serve.max_num_tokens, "max_seq_len": serve.max_seq_len},
        "lora": lora.model_dump() if lora is not None else None,
        "calib": {"dataset": options.calib_dataset, "size": options.calib_size, "batch_size": 1, "max_seq_length": 512},
        "smoke": {"enabled": options.smoke_test, "port": 18000, "timeout_s": 1800, "prompt": "Hello, my name is"},
        "serve_argv": argv,
    }
    (out_dir / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")

    mounts = [str(out_dir)]
    calib = Path(options.calib_dataset)
    if options.quantize == "fp8" and calib.is_absolute() and calib.exists():
        mounts.append(str(calib))
    job = TrtllmJob(
        name=_dns_name(f"forgeline-trtllm-{name}"),
        artifact=str(out_dir),
        image=image_reference(),
        gpus=serve.gpus,
        command=["python3", str(out_dir / ENTRY_FILE), "build", "--spec", str(out_dir / SPEC_FILE)],
        mounts=mounts,
        env={"PYTHONUNBUFFERED": "1"},
        base_model=base_model,
        merged_adapter=str(merged) if merged is not None else None,
        full_weights=str(full_weights) if full_weights is not None else None,
        adapters=relative,
        build=options,
        serve=serve,
    )
    (out_dir / JOB_FILE).write_text(job.model_dump_json(indent=2) + "\n")
    logger.info("prepared TensorRT-LLM build job %s in %s", job.name, out_dir)
    return job


def load_job(artifact_dir: str | Path) -> TrtllmJob:
    """The job description written by `prepare_trtllm_job`."""
    path = Path(artifact_dir) / JOB_FILE
    if not path.is_file():
        raise NotFoundError(f"{artifact_dir} has no {JOB_FILE}; prepare the build first", param="artifact_dir")
    return TrtllmJob.model_validate_json(path.read_text())


# -- launchers -------------------------------------------------------------------------


def _enroot_uri(image: str) -> str:
    # enroot separates the registry from the path with '#': docker://nvcr.io#nvidia/...
    registry, _, path = image.partition("/")
    return f"docker://{registry}#{path}"


def container_commands(job: TrtllmJob, runtime: Runtime, *, executable: str | None = None, cache_dir: Path | None = None) -> list[list[str]]:
    """The commands that run the build job with a local container runtime.

    Args:
        job: the prepared job.
        runtime: ``docker``, ``podman`` (GPUs through CDI) or ``enroot`` (import, create, start).
        executable: the runtime's binary; default: its name.
        cache_dir: enroot only: where the imported image (.sqsh) is kept.
    """
    exe = executable or runtime
    if runtime in ("docker", "podman"):
        gpus = ["--gpus", str(job.gpus)] if runtime == "docker" else ["--device", "nvidia.com/gpu=all"]
        # --ipc host and the ulimits are what TensorRT-LLM's container guide asks for (NCCL, pinned memory).
        argv = [exe, "run", "--rm", "--name", job.name, *gpus, "--ipc", "host", "--ulimit", "memlock=-1", "--ulimit", "stack=67108864"]
        for mount in job.mounts:
            argv += ["-v", f"{mount}:{mount}"]
        for key, value in job.env.items():
            argv += ["-e", f"{key}={value}"]
        return [argv + ["-w", job.artifact, job.image, *job.command]]
    cache = cache_dir or Path(job.artifact).parent
    image_file = cache / f"trtllm-{TRTLLM_VERSION}.sqsh"
    start = [exe, "start", "--rw"]
    for mount in job.mounts:
        start += ["--mount", f"{mount}:{mount}"]
    for key, value in {**job.env, "NVIDIA_VISIBLE_DEVICES": ",".join(str(i) for i in range(job.gpus))}.items():
        start += ["--env", f"{key}={value}"]
    return [
        [exe, "import", "--output", str(image_file), _enroot_uri(job.image)],
        [exe, "create", "--force", "--name", job.name, str(image_file)],
        start + [job.name, *job.command],
    ]


def detect_runtime() -> tuple[Runtime, str]:
    """The local container runtime: ``$FORGELINE_CONTAINER_RUNTIME`` (a name or a path), else docker, podman, enroot.

    Raises:
        MissingDependencyError: none is installed.
    """
    wanted = os.environ.get(RUNTIME_ENV)
    candidates = [wanted] if wanted else ["docker", "podman", "enroot"]
    for candidate in candidates:
        path = shutil.which(candidate) if candidate else None
        if path is None:
            continue
        kind = next((k for k in ("docker", "podman", "enroot") if k in Path(candidate).name), None)
        if kind is None:
            raise ForgelineError(f"{RUNTIME_ENV}={candidate} is not docker, podman or enroot", code=ErrorCode.INVALID_CONFIG, param=RUNTIME_ENV)
        return kind, path  # type: ignore[return-value]
    raise MissingDependencyError(
        f"no container runtime found ({wanted or 'docker, podman, enroot'}); TensorRT-LLM builds run in its "
        "container on an H200 machine: install one there, or build as a job with --cluster FILE (Slurm, Kubernetes)",
        param="runner",
    )


def resolve_image_digest(executable: str, runtime: Runtime, image: str) -> str | None:
    """The ``sha256:`` digest the runtime pulled for ``image``, when it can tell."""
    if runtime == "enroot":
        return None
    try:
        out = subprocess.run(
            [executable, "image", "inspect", "--format", "{{json .RepoDigests}}", image],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        digests = json.loads(out.stdout.strip() or "[]")
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        logger.warning("could not read the digest of %s: %s", image, exc)
        return None
    for entry in digests or []:
        if "@" in entry:
            return str(entry.split("@", 1)[1])
    return None


def run_local(job: TrtllmJob, *, runtime: Runtime | None = None, executable: str | None = None) -> tuple[str | None, str]:
    """Run the build job with a local container runtime; its output goes to ``job/build.log``.

    Returns:
        ``(digest, source)``: the image digest and where it came from (see `TrtllmRuntime`).

    Raises:
        MissingDependencyError: no container runtime.
        ForgelineError: the job failed (the message holds the end of its log).
    """
    if runtime is None:
        runtime, executable = detect_runtime()
    log_path = job.root / LOG_FILE
    with log_path.open("ab") as log:
        for argv in container_commands(job, runtime, executable=executable):
            if runtime == "enroot" and argv[1] == "import" and Path(argv[3]).exists():
                continue  # the image was imported by an earlier build
            logger.info("running %s", " ".join(argv))
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=False)
            if proc.returncode != 0:
                tail = log_path.read_text(errors="replace").splitlines()[-20:]
                raise ForgelineError(
                    f"TensorRT-LLM build job failed (exit {proc.returncode}); end of {log_path}:\n" + "\n".join(tail),
                    code=ErrorCode.INTERNAL,
                )
    if TRTLLM_IMAGE_DIGEST:
        return TRTLLM_IMAGE_DIGEST, "pinned"
    digest = resolve_image_digest(executable or runtime, runtime, job.image)
    return digest, "runtime" if digest else "unresolved"


def _pyxis_image(image: str) -> str:
    # pyxis takes enroot image URIs: REGISTRY#IMAGE[:TAG]
    registry, _, path = image.partition("/")
    return f"{registry}#{path}"


def _default_mount(job: TrtllmJob) -> str:
    from registry.settings import forgeline_home

    home = forgeline_home()
    return str(home) if Path(job.artifact).is_relative_to(home) else str(Path(job.artifact).parent)


def trtllm_job_spec(job: TrtllmJob, cluster: ClusterSpec, *, name: str, job_id: str | None = None) -> JobSpec:
    """The build as a job on ``cluster``: in TensorRT-LLM's container, with ``job.gpus`` GPUs on one node.

    Args:
        job: the prepared build.
        cluster: where it runs. ``local`` (or ``hostfile``): a detached container command here;
            ``slurm``: pyxis; ``kubernetes``: a Job whose PVC is mounted at ``cluster.mount_path``,
            which must be where the artifact lives on this machine too.
        name: the registered model the build is for (shown by ``forgeline jobs list``).

    Raises:
        TrtllmConfigError: on Kubernetes, the artifact is not under ``cluster.mount_path``.
        MissingDependencyError: locally, no container runtime.
    """
    ids = {"id": job_id} if job_id else {}
    if cluster.kind in ("local", "hostfile"):
        runtime, executable = detect_runtime()
        commands = container_commands(job, runtime, executable=executable)
        if runtime == "enroot" and Path(commands[0][3]).exists():
            commands = commands[1:]  # the image was imported by an earlier build
        return JobSpec(**ids, stage="build", name=name, python=False, cluster=cluster, env=job.env,
                       command=["/bin/sh", "-c", " && ".join(shlex.join(argv) for argv in commands)])
    if cluster.kind == "kubernetes":
        mount = cluster.mount_path.rstrip("/")
        if not job.artifact.startswith(mount + "/"):
            raise TrtllmConfigError(f"the artifact {job.artifact} is not under the volume mount {cluster.mount_path}; fix: "
                                    "set cluster.mount_path to where this machine mounts the forgeline volume",
                                    param="cluster.mount_path")
        image = job.image
    else:
        image = _pyxis_image(job.image)
    return JobSpec(**ids, stage="build", name=name, python=False, command=list(job.command), cluster=cluster,
                   container_image=image, gpus=job.gpus, mounts=list(job.mounts), env=job.env)


def write_launch_files(job: TrtllmJob, *, name: str) -> dict[str, Path]:
    """Render the Slurm script and Kubernetes Job (from ``platform/``) next to the job, for operators who launch by hand."""
    import yaml

    from jobs.kubernetes import render_manifests
    from jobs.slurm import render_job

    folder = job.root / JOB_DIR
    slurm = trtllm_job_spec(job, ClusterSpec(kind="slurm"), name=name, job_id=job.name)
    sbatch = folder / "trtllm-build.sbatch"
    sbatch.write_text(render_job(slurm, job_dir=folder)["build.sbatch"])
    kubernetes = ClusterSpec(kind="kubernetes", container_image=job.image, pvc="forgeline-home", mount_path=_default_mount(job))
    manifest, _ = render_manifests(trtllm_job_spec(job, kubernetes, name=name, job_id=job.name))
    k8s = folder / "trtllm-build-job.yaml"
    k8s.write_text(yaml.safe_dump(manifest, sort_keys=False))
    local = folder / "trtllm-build-docker.sh"
    local.write_text("#!/bin/sh\nset -e\n" + "\n".join(shlex.join(argv) for argv in container_commands(job, "docker")) + "\n")
    return {"slurm": sbatch, "kubernetes": k8s, "docker": local}


# -- finalize --------------------------------------------------------------------------


def read_build_result(artifact_dir: str | Path) -> dict[str, Any]:
    """``job/build-result.json`` written by the in-container entry point.

    Raises:
        NotFoundError: the build has not finished (or never ran).
        ForgelineError: the build reported a failure.
    """
    path = Path(artifact_dir) / BUILD_RESULT
    if not path.is_file():
        raise NotFoundError(f"{path} does not exist: the TensorRT-LLM build job has not finished", param="artifact_dir")
    result = dict(json.loads(path.read_text()))
    if not result.get("ok"):
        raise ForgelineError(f"the TensorRT-LLM build failed: {result.get('error', 'no error recorded')}", code=ErrorCode.INTERNAL)
    return result


def finalize_trtllm_job(job: TrtllmJob, *, image_digest: str | None = None, digest_source: str = "unresolved") -> TrtllmManifest:
    """Check the build result and write the manifest (the artifact is complete once it exists).

    Raises:
        NotFoundError: the job has not finished.
        ForgelineError: the job failed, or ran another TensorRT-LLM version than the pin.
    """
    result = read_build_result(job.root)
    version = str(result.get("tensorrt_llm_version"))
    if version != TRTLLM_VERSION:
        raise ForgelineError(
            f"the build ran TensorRT-LLM {version}, but forgeline pins {TRTLLM_VERSION}; rebuild with {job.image}",
            code=ErrorCode.CONFLICT,
        )
    model_dir = job.root / job.serve.model_dir
    if not model_dir.is_dir() or not any(model_dir.iterdir()):
        raise ForgelineError(f"the build reported success but {model_dir} is empty", code=ErrorCode.INTERNAL)
    if TRTLLM_IMAGE_DIGEST:
        image_digest, digest_source = TRTLLM_IMAGE_DIGEST, "pinned"
    fp8 = job.build.quantize == "fp8"
    kv_cache = "fp8" if fp8 or (job.serve.backend == "pytorch" and job.serve.kv_cache_dtype == "fp8") else "auto"
    method = "none" if not fp8 else ("modelopt-engine" if job.serve.backend == "tensorrt" else "modelopt-hf")
    manifest = TrtllmManifest(
        backend=job.serve.backend,
        tensorrt_llm=TrtllmRuntime(version=version, image=job.image, image_digest=image_digest, digest_source=digest_source),  # type: ignore[arg-type]
        gpu=GpuTarget(name=GPU_NAME, arch=GPU_ARCH, count=job.gpus, detected=list(result.get("gpus") or [])),
        parallelism=Parallelism(tp=job.serve.tp_size, pp=job.serve.pp_size),
        quantization=Quantization(
            weights=job.serve.weights,
            kv_cache=kv_cache,  # type: ignore[arg-type]
            method=method,  # type: ignore[arg-type]
            calib_dataset=job.build.calib_dataset if fp8 else None,
        ),
        base_model=job.base_model,
        merged_adapter=job.merged_adapter,
        full_weights=job.full_weights,
        adapters=dict(job.adapters),
        serve=ServeConfig(options=job.serve, extra_llm_api_options=EXTRA_OPTIONS_FILE, argv=serve_argv_template(job.serve)),
        inputs=checksum_tree(job.root, under=(CHECKPOINT_DIR, ADAPTERS_DIR)),
        files=checksum_tree(job.root),
        build_seconds=result.get("seconds"),
        created_at=datetime.now(UTC),
    )
    from .torch_build import MANIFEST_NAME

    (job.root / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
    logger.info("TensorRT-LLM artifact ready at %s (%s, %s, tp=%d)", job.root, manifest.backend, manifest.quantization.weights, manifest.parallelism.tp)
    return manifest


def build_trtllm_artifact(
    base_model: str,
    adapter: str | Path | None,
    out_dir: Path,
    options: TrtllmBuildOptions,
    *,
    name: str,
    runner: Runner = "local",
    adapter_name: str | None = None,
    extra_adapters: dict[str, Path] | None = None,
    overwrite: bool = False,
    full_weights: str | Path | None = None,
    model: str | None = None,
) -> tuple[TrtllmJob, TrtllmManifest | None]:
    """Prepare the artifact and, with ``runner="local"``, run its build here and return the manifest.

    ``none`` only prepares it and writes the launch files (``None`` is returned); a cluster
    build is prepared this way and submitted as a job (`trtllm_job_spec`), then finalized
    when it ends.
    """
    if runner not in ("local", "none"):
        raise ForgelineError(f"unknown runner {runner!r}; fix: use local or none, or submit the build as a job "
                             "(`forgeline build --cluster FILE`)", code=ErrorCode.INVALID_REQUEST, param="runner")
    job = prepare_trtllm_job(
        base_model, adapter, out_dir, options, name=name, adapter_name=adapter_name, extra_adapters=extra_adapters, overwrite=overwrite,
        full_weights=full_weights,
    )
    files = write_launch_files(job, name=model or name)
    if runner == "none":
        logger.info("build job prepared; launch files: %s", ", ".join(str(p) for p in files.values()))
        return job, None
    digest, source = run_local(job)
    return job, finalize_trtllm_job(job, image_digest=digest, digest_source=source)
