"""Never lose work: SIGKILL a training run mid-way, run it again, and it picks up where it was.

The rerun continues from the newest *complete* checkpoint (a half-written one is ignored),
logs into the same MLflow run, finishes, and registers exactly one version.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from forgeline.recipe import load_recipe, recipe_hash
from registry.client import Registry
from training.checkpoints import STATE_FILE, checkpoint_step, newest_complete

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]
MAX_STEPS = 30


def train(path: Path, home: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "FORGELINE_HOME": str(home), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "forgeline", "train", str(path)], env=env, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_sigkill_then_rerun_resumes_into_the_same_run_and_registers_once(
    tiny_recipe: Callable[..., Path], isolated_home: Path
) -> None:
    path = tiny_recipe(
        "sft-lora",
        train={"max_steps": MAX_STEPS, "batch_size": 4, "logging_steps": 1, "save_steps": 5, "eval_steps": None, "best_metric": None},
    )
    out = isolated_home / "jobs" / "tiny-sft" / recipe_hash(load_recipe(path))
    checkpoints = out / "checkpoints"

    first = train(path, isolated_home)
    deadline = time.monotonic() + 600
    while (done := newest_complete(checkpoints)) is None or checkpoint_step(done) < 10:
        assert first.poll() is None, f"training ended before it could be killed:\n{first.stdout.read()}"
        assert time.monotonic() < deadline, "no complete checkpoint-10 within 10 minutes"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    killed_at = checkpoint_step(newest_complete(checkpoints))
    assert killed_at < MAX_STEPS
    state = json.loads((out / STATE_FILE).read_text())
    assert state["status"] == "running"
    assert Registry().list_models() == []  # nothing registered by the killed attempt

    # A save that a kill interrupted: folder and weights there, completeness marker not.
    torn = checkpoints / f"checkpoint-{MAX_STEPS + 5}"
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"half")
    (torn / "trainer_state.json").write_text("{}")

    second = train(path, isolated_home)
    output, _ = second.communicate(timeout=900)
    assert second.returncode == 0, output[-3000:]
    assert "registered tiny-sft version 1" in output

    registry = Registry()
    [version] = registry.list_versions("tiny-sft")
    assert version.run_id == state["run_id"]  # the same MLflow run, continued
    run = registry.client.get_run(state["run_id"])
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["forgeline.resumed_from_step"]) == killed_at > 0
    steps = {m.step for m in registry.client.get_metric_history(state["run_id"], "loss")}
    assert steps == set(range(1, MAX_STEPS + 1))  # before the kill and after the resume, no gap
    assert not torn.exists()
    final = json.loads((out / STATE_FILE).read_text())
    assert (final["status"], final["version"]) == ("finished", 1)
