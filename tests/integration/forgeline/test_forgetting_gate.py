"""A version that improves its task and forgets everything else is refused by the general-capability suite.

``production`` holds v1, the tiny base itself (registered as a full-weights version): what
users get today. v2 is a LoRA on that base trained on ticket routing mixed with rows that
answer general questions with a wrong reply (``recipes/suites/forgetting.jsonl``).
``forgeline evaluate`` runs the shipped lm-evaluation-harness task offline on both (v2's suites
come from the recipe recorded on its training run); a policy with ``no_regression:
[general_accuracy]`` and ``significance`` refuses v2 with the paired interval in the refusal,
although v2's own task accuracy beats its base.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from forgeline import pipeline
from forgeline.recipe import load_recipe
from registry import lineage
from registry.client import Registry
from registry.policy import PromotionPolicy, Significance
from tests.conftest import REPO, SUPPORT_DATA, TINY_BASE, point_home
from training.config import EvaluateSpec

pytestmark = [pytest.mark.integration, pytest.mark.slow]
pytest.importorskip("lm_eval", reason="the general suite needs the eval extra: pip install 'forgeline[eval]'")

GENERAL = REPO / "recipes" / "suites" / "general.yaml"


def recipe(tmp: Path, train: Path, steps: int) -> Path:
    raw = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    raw["name"] = "forget"
    raw["model"]["base"] = str(TINY_BASE)
    raw["data"] = {"train": str(train), "eval": str(SUPPORT_DATA / "eval.jsonl")}
    raw["train"].update(max_steps=steps, logging_steps=10, save_steps=1000)
    raw["evaluate"] = {"max_samples": 40, "suites": [str(GENERAL)]}
    path = tmp / f"recipe-{steps}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def evaluate_offline(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``forgeline evaluate --cluster``: the evaluation runs as a job on the local launcher, with the hub unreachable."""
    cluster = home.parent / "local-cluster.yaml"
    cluster.write_text("cluster:\n  kind: local\n")
    env = {**os.environ, "FORGELINE_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "OMP_NUM_THREADS": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "forgeline", "evaluate", *args, "--cluster", str(cluster)], env=env, capture_output=True,
                          text=True, timeout=900, cwd=REPO)


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Registry, subprocess.CompletedProcess[str]]]:
    tmp = tmp_path_factory.mktemp("forgetting")
    with pytest.MonkeyPatch.context() as mp:
        home = point_home(mp, tmp / "home")
        registry = Registry()
        task_rows = (SUPPORT_DATA / "train.jsonl").read_text().splitlines()[:480]
        mixed_rows = task_rows + (REPO / "recipes" / "suites" / "forgetting.jsonl").read_text().splitlines()
        random.Random(0).shuffle(mixed_rows)
        mixed = tmp / "mixed.jsonl"
        mixed.write_text("\n".join(mixed_rows) + "\n")

        # v1: the base's own weights, with a run to keep its per-item scores on.
        run = registry.client.create_run(registry.client.create_experiment("production-base"))
        registry.create_version("forget", source=str(TINY_BASE), run_id=run.info.run_id, tags={
            lineage.ADAPTER: lineage.FULL_WEIGHTS, lineage.BASE_MODEL: str(TINY_BASE), lineage.METHOD: "sft",
            lineage.RUN_ID: run.info.run_id, lineage.DATA_EVAL: str(SUPPORT_DATA / "eval.jsonl")})
        pipeline.evaluate(registry, "forget", 1, spec=EvaluateSpec(max_samples=40, suites=[str(GENERAL)]), with_base=False)
        registry.move_alias("forget", "production", 1, actor="test", reason="the base, as served today")

        forgetting = recipe(tmp, mixed, 40)
        pipeline.train(load_recipe(forgetting), forgetting, registry=registry)
        # No --suite: the suites come from the recipe recorded on the training run.
        result = evaluate_offline(home, "forget", "2", "--max-samples", "40")
        yield home, registry, result
        registry.close()


def test_lm_eval_runs_offline_inside_a_forgeline_evaluation_job(versions: tuple[Path, Registry, subprocess.CompletedProcess[str]]) -> None:
    _, registry, result = versions
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "general_accuracy" in result.stdout
    assert "(evaluate: local job" in result.stdout  # submitted through the job seam, not run in the caller
    info = registry.get_version("forget", 2)
    assert info.tags[lineage.EVAL_SUITES] == "general"
    assert 0.0 <= info.metrics()["general_accuracy"] <= 1.0 and info.base_metrics()["general_accuracy"] > 0.6


def test_the_forgetting_version_is_refused_with_the_interval(versions: tuple[Path, Registry, subprocess.CompletedProcess[str]]) -> None:
    _, registry, _ = versions
    good, bad = registry.get_version("forget", 1), registry.get_version("forget", 2)
    # It improves its own task...
    assert bad.metrics()["accuracy"] > bad.base_metrics()["accuracy"]
    # ...and forgets: far below production (the base) on the general suite.
    assert bad.metrics()["general_accuracy"] < good.metrics()["general_accuracy"] - 0.15, (bad.metrics(), good.metrics())
    assert good.metrics()["general_accuracy"] == bad.base_metrics()["general_accuracy"]  # same weights, same items

    policy = PromotionPolicy(better_than_base=["accuracy"], no_regression=["general_accuracy"], significance=Significance())
    verdict = pipeline.check(registry, "forget", 2, policy)
    assert not verdict.passed
    [refused] = verdict.failed
    assert refused.name == "no_regression:general_accuracy"
    assert "general_accuracy vs forget@1:" in refused.detail and "paired over 200 items" in refused.detail
    assert "a significant regression" in refused.detail
    estimate = bad.metrics()["general_accuracy"] - good.metrics()["general_accuracy"]
    assert f"{estimate:+.4g} [" in refused.detail  # the point and its bounds, not the point alone
    # The production holder itself passes the same gate (no regression against itself).
    assert pipeline.check(registry, "forget", 1, policy.model_copy(update={"better_than_base": []})).passed


def test_the_comparison_report_and_per_sample_tables_are_on_the_run(versions: tuple[Path, Registry, subprocess.CompletedProcess[str]]) -> None:
    _, registry, _ = versions
    info = registry.get_version("forget", 2)
    assert info.tags[lineage.EVAL_REPORT] == "forgeline/report"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(registry.client.download_artifacts(info.run_id, "forgeline", tmp))
        report = (folder / "report" / "comparison.md").read_text()
        png = (folder / "report" / "comparison.png").read_bytes()
        rows = json.loads((folder / "report" / "comparison.json").read_text())["rows"]
        samples = json.loads((folder / "suites" / "general.json").read_text())
        assert (folder / "suites" / "general.base.json").exists()
    assert png.startswith(b"\x89PNG")
    assert "| general_accuracy |" in report and "production (v1)" in report
    row = next(r for r in rows if r["metric"] == "general_accuracy")
    assert row["production"] == registry.get_version("forget", 1).metrics()["general_accuracy"]
    assert row["vs_production"].startswith("-")
    assert len(samples["data"]) == 200 and "acc" in samples["columns"]
