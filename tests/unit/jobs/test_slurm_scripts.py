"""The sbatch and per-node scripts: what they ask Slurm for, and what they do when run.

The scripts are run here with stand-ins for Slurm's commands (`scontrol`, `srun`) and for
Python, so their shell logic (rendezvous address, requeue decisions, torchrun flags) is
exercised; tests/integration/jobs runs them on a real Slurm.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from jobs.base import JobHandle, JobPhase, JobSpec
from jobs.config import ClusterSpec
from jobs.slurm import SlurmLauncher, _exit_code, _phase, render_scripts
from training.cluster_job import train_spec
from training.job import TrainJob


def _render_spec(spec: JobSpec, tmp_path: Path) -> dict[str, str]:
    handle = JobHandle(id=spec.id, kind="slurm", backend_id="", name=spec.name, job_dir=str(tmp_path / "launches" / spec.id),
                       output_dir=spec.output_dir or "", cluster=spec.cluster, stage=spec.stage)
    return render_scripts(spec, handle, root=tmp_path)


def _render(job: TrainJob, tmp_path: Path, **cluster: object) -> tuple[str, str]:
    job = job.model_copy(update={"output_dir": str(tmp_path / "jobs" / "x")})
    scripts = _render_spec(train_spec(job, ClusterSpec(kind="slurm", **cluster), job_id="fl-test-1"), tmp_path)
    return scripts["train-node.sh"], scripts["train.sbatch"]


def _directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ").strip() for line in script.splitlines() if line.startswith("#SBATCH")]


def test_gpu_job_asks_for_nodes_gpus_partition_time_and_requeue(train_job: TrainJob, tmp_path: Path) -> None:
    _, sbatch = _render(train_job, tmp_path, nodes=4, gpus_per_node=8, partition="h200", account="ml",
                        time_limit="1-00:00:00", cpus_per_node=64, sbatch_options=["--exclusive"])
    directives = _directives(sbatch)
    for expected in ("--nodes=4", "--ntasks-per-node=1", "--gres=gpu:8", "--partition=h200", "--account=ml",
                     "--time=1-00:00:00", "--cpus-per-task=64", "--requeue", "--open-mode=append", "--exclusive",
                     "--signal=B:USR1@120", "--job-name=fl-test-1"):
        assert expected in directives, expected
    assert f"--output={tmp_path}/launches/fl-test-1/train.log" in directives
    assert "srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=64" in sbatch


def test_cpu_job_requests_no_gpus_and_no_signal_without_a_time_limit(train_job: TrainJob, tmp_path: Path) -> None:
    _, sbatch = _render(train_job, tmp_path, nodes=2, gpus_per_node=0)
    directives = _directives(sbatch)
    assert not any(d.startswith(("--gres", "--gpus", "--partition", "--time", "--signal")) for d in directives)
    assert "container" not in sbatch


def test_container_image_goes_to_pyxis_with_the_shared_folder_mounted(train_job: TrainJob, tmp_path: Path) -> None:
    node, sbatch = _render(train_job, tmp_path, container_image="nvcr.io#nvidia/pytorch:25.01-py3",
                           container_mounts=["/data:/data:ro"])
    assert "--container-image='nvcr.io#nvidia/pytorch:25.01-py3'" in sbatch
    assert f"--container-mounts={tmp_path}:{tmp_path},/data:/data:ro" in sbatch
    assert "exec python -m torch.distributed.run" in node  # the container's python, not this venv's


def test_environment_reaches_the_nodes_quoted(train_job: TrainJob, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    _, sbatch = _render(train_job, tmp_path, env={"NCCL_DEBUG": "WARN", "ODD": "a b'c"})
    env = subprocess.run(["bash", "-c", _exports(sbatch) + "\nenv"], capture_output=True, text=True, check=True).stdout
    assert "MLFLOW_TRACKING_URI=http://mlflow.internal:5000" in env
    assert "ODD=a b'c" in env and "NCCL_DEBUG=WARN" in env
    assert f"FORGELINE_HOME={os.environ['FORGELINE_HOME']}" in env


def _exports(script: str) -> str:
    return "\n".join(line for line in script.splitlines() if line.startswith("export ") and "=" in line.split()[1])


def test_both_scripts_are_valid_bash(train_job: TrainJob, tmp_path: Path) -> None:
    node, sbatch = _render(train_job, tmp_path, nodes=2, time_limit="30", setup=["module load cuda"])
    for text in (node, sbatch):
        subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_each_node_runs_torchrun_with_the_rendezvous_on_the_first_node(train_job: TrainJob, tmp_path: Path) -> None:
    node, _ = _render(train_job, tmp_path, nodes=2, gpus_per_node=8, python=str(tmp_path / "python"),
                      setup=["export FROM_SETUP=1"])
    _stub(tmp_path, "python", 'echo "FROM_SETUP=$FROM_SETUP"; printf "%s\\n" "$@"\n')
    script = tmp_path / "node.sh"
    script.write_text(node)
    env = {**os.environ, "FORGELINE_NODE_ADDRS": "n1=10.0.0.1 n2=10.0.0.2 ", "FORGELINE_RDZV_ENDPOINT": "10.0.0.1:29500",
           "SLURM_JOB_ID": "77"}
    first = subprocess.run(["bash", str(script)], env={**env, "SLURMD_NODENAME": "n1", "SLURM_NODEID": "0"},
                           capture_output=True, text=True, check=True).stdout.splitlines()
    second = subprocess.run(["bash", str(script)], env={**env, "SLURMD_NODENAME": "n2", "SLURM_NODEID": "1"},
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert "FROM_SETUP=1" in first
    for args in (first, second):
        for flag in ("-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                     "--rdzv-endpoint=10.0.0.1:29500", "--rdzv-id=77", "--max-restarts=0", "training.entry",
                     f"{tmp_path}/launches/fl-test-1/job.json"):
            assert flag in args, flag
    assert "--rdzv-conf=is_host=true" in first and "--local-addr=10.0.0.1" in first
    assert "--rdzv-conf=is_host=false" in second and "--local-addr=10.0.0.2" in second


def _run_batch(tmp_path: Path, sbatch: str, *, srun_status: int, restart_count: int | None) -> tuple[int, str, str]:
    """Run the batch script as slurmd would, with stand-ins for scontrol and srun."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    _stub(bin_dir, "scontrol", f"""echo "scontrol $*" >> {shlex.quote(str(calls))}
case "$1 $2" in
  "show hostnames") printf 'n1\\nn2\\n' ;;
  "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=10.9.0.${{3#n}} NodeHostName=$3" ;;
  "requeue "*) kill -TERM $PPID ;;  # Slurm ends the batch script when it requeues the job
esac
""")
    _stub(bin_dir, "srun", f'echo "srun rdzv=$FORGELINE_RDZV_ENDPOINT addrs=$FORGELINE_NODE_ADDRS" >> {shlex.quote(str(calls))}\n'
                           f"exit {srun_status}\n")
    script = tmp_path / "train.sbatch"
    script.write_text(sbatch)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n[1-2]"}
    if restart_count is not None:
        env["SLURM_RESTART_COUNT"] = str(restart_count)
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    return proc.returncode, proc.stdout, calls.read_text()


def test_a_failed_attempt_requeues_the_job(train_job: TrainJob, tmp_path: Path) -> None:
    _, sbatch = _render(train_job, tmp_path, nodes=2, max_restarts=2)
    _, out, calls = _run_batch(tmp_path, sbatch, srun_status=1, restart_count=None)
    assert "srun rdzv=10.9.0.1:29500 addrs=n1=10.9.0.1 n2=10.9.0.2" in calls
    assert "scontrol requeue 77" in calls
    assert "attempt 1 failed with status 1; requeueing job 77" in out


def test_the_last_attempt_fails_the_job_instead(train_job: TrainJob, tmp_path: Path) -> None:
    _, sbatch = _render(train_job, tmp_path, nodes=2, max_restarts=2)
    code, out, calls = _run_batch(tmp_path, sbatch, srun_status=3, restart_count=2)
    assert code == 3
    assert "requeue" not in calls
    assert "attempt 3 ended with status 3" in out


def test_a_successful_attempt_ends_the_job(train_job: TrainJob, tmp_path: Path) -> None:
    _, sbatch = _render(train_job, tmp_path, nodes=2)
    code, out, calls = _run_batch(tmp_path, sbatch, srun_status=0, restart_count=1)
    assert code == 0 and "requeue" not in calls
    assert "attempt 2 ended with status 0" in out


def test_prepare_writes_the_job_where_every_node_reads_it(train_job: TrainJob, tmp_path: Path) -> None:
    cluster = ClusterSpec(kind="slurm", shared_dir=str(tmp_path / "shared"), nodes=2, gpus_per_node=0)
    handle = SlurmLauncher().prepare(train_spec(train_job, cluster, job_id="fl-test-2"))
    job_dir = Path(handle.job_dir)
    assert job_dir == tmp_path / "shared" / "launches" / "fl-test-2"
    assert handle.output_dir == str(tmp_path / "shared" / "jobs" / "support-router" / "0123456789abcdef")
    assert TrainJob.model_validate_json((job_dir / "job.json").read_text()).output_dir == handle.output_dir
    assert f"export FORGELINE_HOME={tmp_path}/shared" in (job_dir / "train.sbatch").read_text()
    assert (job_dir / "train-node.sh").is_file()


def test_an_evaluation_job_is_one_task_running_the_plain_command(tmp_path: Path) -> None:
    spec = JobSpec(id="fl-eval-1", stage="evaluate", name="m", command=["-m", "forgeline", "evaluate", "m", "3"],
                   cluster=ClusterSpec(kind="slurm", gpus_per_node=1, partition="h200", setup=["module load cuda"]))
    (name, sbatch), = _render_spec(spec, tmp_path).items()
    assert name == "evaluate.sbatch"
    directives = _directives(sbatch)
    for expected in ("--nodes=1", "--ntasks=1", "--gres=gpu:1", "--partition=h200", "--no-requeue", "--job-name=fl-eval-1",
                     f"--output={tmp_path}/launches/fl-eval-1/evaluate.log"):
        assert expected in directives, expected
    lines = sbatch.splitlines()
    assert lines[-1].endswith("-m forgeline evaluate m 3") and "module load cuda" in lines
    assert "torch.distributed.run" not in sbatch and "requeue" not in sbatch.replace("--no-requeue", "")
    subprocess.run(["bash", "-n"], input=sbatch, text=True, check=True)


def test_a_container_job_runs_through_pyxis_with_its_own_image_and_gpus(tmp_path: Path) -> None:
    art = tmp_path / "engines" / "m" / "1"
    spec = JobSpec(id="fl-build-1", stage="build", name="m", python=False, command=["python3", f"{art}/entry.py", "build"],
                   cluster=ClusterSpec(kind="slurm", gpus_per_node=0), container_image="nvcr.io#nvidia/tensorrt-llm/release:1",
                   gpus=8, mounts=[str(art)])
    sbatch = _render_spec(spec, tmp_path)["build.sbatch"]
    assert "--gres=gpu:8" in _directives(sbatch)
    srun = sbatch[sbatch.index("srun "):]
    assert "--container-image='nvcr.io#nvidia/tensorrt-llm/release:1'" in srun
    assert f"--container-mounts={tmp_path}:{tmp_path},{art}:{art}" in srun
    assert srun.rstrip().endswith(f"python3 {art}/entry.py build")
    subprocess.run(["bash", "-n"], input=sbatch, text=True, check=True)


@pytest.mark.parametrize(
    ("state", "restarts", "phase"),
    [("PENDING", 0, JobPhase.PENDING), ("PENDING", 1, JobPhase.REQUEUED), ("RUNNING", 0, JobPhase.RUNNING),
     ("COMPLETING", 1, JobPhase.RUNNING), ("COMPLETED", 0, JobPhase.SUCCEEDED), ("CANCELLED by 0", 0, JobPhase.CANCELLED),
     ("CANCELLED+", 0, JobPhase.CANCELLED), ("TIMEOUT", 0, JobPhase.FAILED), ("NODE_FAIL", 0, JobPhase.FAILED),
     ("REQUEUE_HOLD", 1, JobPhase.REQUEUED), ("", 0, JobPhase.UNKNOWN)],
)
def test_slurm_states_map_to_phases(state: str, restarts: int, phase: JobPhase) -> None:
    assert _phase(state, restarts) is phase


def test_exit_codes_fold_the_signal_in() -> None:
    assert (_exit_code("0:0"), _exit_code("2:0"), _exit_code("0:9"), _exit_code(None)) == (0, 2, 137, None)
