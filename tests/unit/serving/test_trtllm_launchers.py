"""The build job as each launcher runs it: docker, podman, enroot, and as a job of the ``jobs`` seam
on Slurm (pyxis) and Kubernetes, rendered from the templates in platform/."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from jobs.config import ClusterSpec
from jobs.kubernetes import render_manifests
from jobs.slurm import render_job
from registry.errors import MissingDependencyError
from serving.artifacts.trtllm_build import (
    RUNTIME_ENV,
    TrtllmBuildOptions,
    TrtllmJob,
    container_commands,
    detect_runtime,
    trtllm_job_spec,
    write_launch_files,
)
from serving.artifacts.trtllm_config import h200_serve_options


@pytest.fixture
def job(tmp_path: Path) -> TrtllmJob:
    art = tmp_path / "home/engines/tiny/1/tensorrt-llm"
    return TrtllmJob(
        name="forgeline-trtllm-tiny-v1",
        artifact=str(art),
        image="nvcr.io/nvidia/tensorrt-llm/release:1.2.1",
        gpus=8,
        command=["python3", f"{art}/job/trtllm_entry.py", "build", "--spec", f"{art}/job/build-spec.json"],
        mounts=[str(art)],
        env={"PYTHONUNBUFFERED": "1"},
        base_model="/models/base",
        build=TrtllmBuildOptions(tp=8),
        serve=h200_serve_options(tp=8),
    )


def test_docker_runs_the_entry_in_the_pinned_image_with_the_artifact_at_the_same_path(job: TrtllmJob) -> None:
    (argv,) = container_commands(job, "docker")
    image_at = argv.index(job.image)
    assert argv[:2] == ["docker", "run"] and argv[image_at + 1 :] == job.command
    options = argv[2:image_at]
    assert options[options.index("--gpus") + 1] == "8"
    assert options[options.index("-v") + 1] == f"{job.artifact}:{job.artifact}"
    assert {"--ipc", "host"} <= set(options) and "memlock=-1" in options


def test_podman_uses_cdi_and_enroot_imports_creates_and_starts(job: TrtllmJob, tmp_path: Path) -> None:
    (podman,) = container_commands(job, "podman")
    assert podman[podman.index("--device") + 1] == "nvidia.com/gpu=all"
    imp, create, start = container_commands(job, "enroot", cache_dir=tmp_path)
    assert imp[-1] == "docker://nvcr.io#nvidia/tensorrt-llm/release:1.2.1"
    assert create[:3] == ["enroot", "create", "--force"] and create[-1] == imp[imp.index("--output") + 1]
    assert start[start.index("--mount") + 1] == f"{job.artifact}:{job.artifact}"
    assert "NVIDIA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7" in start
    assert start[-len(job.command) :] == job.command


def test_sbatch_runs_the_entry_through_pyxis_on_one_node(job: TrtllmJob, tmp_path: Path) -> None:
    spec = trtllm_job_spec(job, ClusterSpec(kind="slurm", partition="h200", account="ml", gpus_per_node=0), name="tiny")
    assert (spec.stage, spec.name, spec.gpus, spec.python) == ("build", "tiny", 8, False)
    script = render_job(spec, job_dir=tmp_path / "launch")["build.sbatch"]
    assert script.startswith("#!/bin/bash\n")
    assert "#SBATCH --gres=gpu:8" in script and "#SBATCH --partition=h200" in script and "#SBATCH --nodes=1" in script
    srun = script[script.index("srun "):]
    assert "--container-image='nvcr.io#nvidia/tensorrt-llm/release:1.2.1'" in srun
    assert f"{job.artifact}:{job.artifact}" in srun and "--no-container-mount-home" in srun
    assert srun.rstrip().endswith(" ".join(job.command))


def test_kubernetes_job_targets_h200_nodes(job: TrtllmJob, tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    cluster = ClusterSpec(kind="kubernetes", namespace="ml", pvc="forgeline", mount_path=home, container_image="forgeline:1")
    body, config_map = render_manifests(trtllm_job_spec(job, cluster, name="tiny"))
    pod = body["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert body["kind"] == "Job" and body["metadata"]["namespace"] == "ml" and body["spec"]["backoffLimit"] == 0
    assert config_map is None
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"} and pod["restartPolicy"] == "Never"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["image"] == job.image and container["command"] == job.command
    assert container["workingDir"] == job.artifact
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["forgeline"] == home and job.artifact.startswith(home + "/")
    assert {"name": "forgeline", "persistentVolumeClaim": {"claimName": "forgeline"}} in pod["volumes"]
    with pytest.raises(Exception, match="not under the volume mount"):
        trtllm_job_spec(job, cluster.model_copy(update={"mount_path": "/elsewhere"}), name="tiny")


def test_launch_files_for_operators_are_rendered_from_the_platform_templates(job: TrtllmJob, tmp_path: Path) -> None:
    (Path(job.artifact) / "job").mkdir(parents=True)
    files = write_launch_files(job, name="tiny")
    assert "Rendered by jobs/slurm.py from platform/slurm/job.sbatch.j2" in files["slurm"].read_text()
    manifest = yaml.safe_load(files["kubernetes"].read_text())
    assert manifest["kind"] == "Job" and manifest["metadata"]["labels"]["forgeline.dev/stage"] == "build"
    assert files["docker"].read_text().startswith("#!/bin/sh\nset -e\ndocker run")


def test_runtime_detection(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(RUNTIME_ENV, raising=False)
    with pytest.raises(MissingDependencyError, match="no container runtime"):
        detect_runtime()
    fake = tmp_path / "podman"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    assert detect_runtime() == ("podman", str(fake))
    monkeypatch.setenv(RUNTIME_ENV, str(fake))
    assert detect_runtime() == ("podman", str(fake))


def test_platform_files_follow_the_one_pin() -> None:
    """Templates cannot import the pin, so they are checked against it instead."""
    import re

    from serving.artifacts.trtllm_version import TRTLLM_VERSION

    platform = Path(__file__).resolve().parents[3] / "platform"
    found = {}
    for file in platform.rglob("*"):
        if file.is_file():
            for match in re.finditer(r"tensorrt-llm/release:([\w.]+)|trtllm-worker:([\w.]+)", file.read_text()):
                found[f"{file.relative_to(platform)}: {match.group(0)}"] = match.group(1) or match.group(2)
    assert found, "no TensorRT-LLM image reference found under platform/"
    assert {k: v for k, v in found.items() if v != TRTLLM_VERSION} == {}
    dockerfile = (platform / "docker/trtllm-worker.Dockerfile").read_text()
    assert "ARG TRTLLM_IMAGE\nFROM ${TRTLLM_IMAGE}" in dockerfile, "the worker image must take the pinned base as a build argument"
