"""Full fine-tunes and GRPO versions through evaluate → promote → build → serve, on the tiny base.

The R1 recipe in miniature trains both kinds once per module: a short full SFT cold start
(``adapter: {kind: none}``) that teaches the answer format, and two GRPO steps from it.
The cold start is evaluated against the tiny base, promoted, built and served by name; the
GRPO version is scored with its recipe's rewards and promoted through a threshold policy.
A hot swap between two full-weight versions under load fails no request.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from typer.testing import CliRunner

from forgeline import pipeline
from forgeline.cli import app as cli
from forgeline.recipe import load_recipe
from registry import lineage
from registry.client import Registry
from registry.errors import PolicyRefused
from registry.eval_samples import load_samples
from registry.policy import PromotionPolicy
from serving.artifacts.torch_build import load_manifest
from serving.config import ServeSpec
from serving.gateway.server import serve_in_background
from serving.registry_models import BaseSource
from serving.service import build_gateway
from tests.conftest import REPO, TINY_BASE, point_home
from tests.support.swap_load import SwapLoad
from tests.support.tiny_model import build_tiny_base
from training.config import EvaluateSpec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = REPO / "recipes" / "tiny"
COLD_START_ROWS = REPO / "recipes" / "data" / "toy-arithmetic" / "cold-start.jsonl"
QUESTION = [{"role": "user", "content": "What is 8 + 7?"}]


def _recipe(name: str, out: Path, **overrides: dict[str, Any]) -> Path:
    raw = yaml.safe_load((TINY / f"{name}.yaml").read_text())
    raw["model"]["base"] = str((TINY / raw["model"]["base"]).resolve())
    raw["data"] = {k: (str((TINY / v).resolve()) if isinstance(v, str) else v) for k, v in raw["data"].items()}
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A forgeline home holding ``tiny-cold-start`` v1 (full SFT) and ``tiny-grpo`` v1 (full GRPO from it)."""
    import torch

    root = tmp_path_factory.mktemp("versions")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # for the module (evaluations too): on 2 shared cores spinning OpenMP threads cost more than they give
    with pytest.MonkeyPatch.context() as mp:
        point_home(mp, root / "home")
        registry = Registry()
        cold_path = _recipe("sft-cold-start", root / "cold.yaml", train={"max_steps": 60, "eval_steps": None, "save_steps": 1000})
        cold = pipeline.train(load_recipe(cold_path), cold_path, registry=registry)
        grpo_path = _recipe(
            "grpo-toy",
            root / "grpo.yaml",
            model={"base": str(cold.adapter_dir)},
            method={"num_generations": 4, "max_completion_length": 48},
            train={"max_steps": 2, "batch_size": 8, "save_steps": 1000},
        )
        pipeline.train(load_recipe(grpo_path), grpo_path, registry=registry)
        registry.close()
        yield root / "home"
    torch.set_num_threads(threads)


@pytest.fixture
def registry(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    point_home(monkeypatch, home)
    reg = Registry()
    yield reg
    reg.close()


def test_a_grpo_version_is_evaluated_with_its_rewards_and_promoted_through_a_threshold_policy(registry: Registry) -> None:
    info = registry.get_version("tiny-grpo", 1)
    assert info.tags[lineage.METHOD] == "grpo" and lineage.is_full_fine_tune(info.tags)

    # The CLI reads the rewards from the training run: no recipe needed.
    result = CliRunner().invoke(cli, ["evaluate", "tiny-grpo", "1", "--max-samples", "24", "--samples", "4", "--pass-k", "2"])
    assert result.exit_code == 0, result.output
    assert "reward_r1_format" in result.output and "pass_at_2" in result.output

    info = registry.get_version("tiny-grpo", 1)
    metrics, base = info.metrics(), info.base_metrics()
    expected = {"reward", "reward_r1_format", "reward_numeric_match", "pass_at_1", "pass_at_2"}
    assert set(metrics) == expected and set(base) == expected
    assert metrics["reward_r1_format"] >= 0.5, metrics  # the cold start taught the format
    assert metrics["reward"] == pytest.approx(metrics["reward_r1_format"] + 0.5 * metrics["reward_numeric_match"])
    assert 0.0 <= metrics["pass_at_1"] <= metrics["pass_at_2"] <= 1.0
    assert metrics["pass_at_1"] == pytest.approx(metrics["reward_numeric_match"])  # numeric_match is the verifiable one
    run = registry.client.get_run(info.run_id).data.metrics
    assert run["final_reward"] == pytest.approx(metrics["reward"]) and "base_pass_at_1" in run

    strict = PromotionPolicy(thresholds={"pass_at_1": {"min": 0.99}})
    with pytest.raises(PolicyRefused, match="pass_at_1"):
        pipeline.promote_version(registry, "tiny-grpo", 1, strict, alias="production", actor="test", reason="too early")
    policy = PromotionPolicy(thresholds={"reward_r1_format": {"min": 0.5}, "reward": {"min": 0.4}})
    pipeline.promote_version(registry, "tiny-grpo", 1, policy, alias="production", actor="test", reason="format learned")
    assert registry.alias_holder("tiny-grpo", "production").version == 1  # type: ignore[union-attr]
    # no_regression compares the same reward metrics against the holder.
    ok = pipeline.check(registry, "tiny-grpo", 1, PromotionPolicy(no_regression=["reward", "pass_at_1"]), alias="production")
    assert ok.passed, ok


def _greedy(folder: Path, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_a_full_fine_tune_is_evaluated_against_its_base_promoted_built_and_served_by_name(registry: Registry) -> None:
    report = pipeline.evaluate(
        registry, "tiny-cold-start", 1, spec=EvaluateSpec(max_samples=16, max_new_tokens=24), data=str(COLD_START_ROWS)
    )
    # The base is the tiny base checkpoint named in lineage, not the fine-tune with something switched off.
    assert report.metrics["eval_loss"] < 0.5 * report.base_metrics["eval_loss"], report
    # Each item's scores are kept (an MLflow table on the run) for significance-aware gates.
    samples = load_samples(registry, report.version)
    assert samples is not None and len(samples.version["eval_loss"]) == len(samples.base["eval_loss"]) == 16
    significant = PromotionPolicy(better_than_base=["eval_loss"], significance={"alpha": 0.05})
    gate = pipeline.check(registry, "tiny-cold-start", 1, significant).gates[0]
    assert gate.passed and "a significant gain" in gate.detail and "paired over 16 items" in gate.detail, gate

    built = pipeline.build(registry, "tiny-cold-start@1")
    manifest = load_manifest(built.path)
    assert manifest.adapter is None and manifest.full_weights is not None
    assert Path(manifest.base_model) == TINY_BASE.resolve()
    assert "model.safetensors" in manifest.files and "generation_config.json" in manifest.files

    policy = PromotionPolicy(better_than_base=["eval_loss"], requires={"production": {"engine": "torch"}})
    pipeline.promote_version(registry, "tiny-cold-start", 1, policy, alias="production", actor="test", reason="beats base")

    spec = ServeSpec(auth=False, device="cpu", poll_interval_s=0, max_new_tokens=32)
    app = build_gateway(registry, ["tiny-cold-start"], spec, bases=[BaseSource("tiny", str(TINY_BASE))])
    base_url, stop = serve_in_background(app)
    try:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=60)
        listed = [m.id for m in client.models.list()]
        assert "tiny-cold-start" in listed and "tiny" in listed
        raw = client.chat.completions.with_raw_response.create(
            model="tiny-cold-start", messages=QUESTION, max_tokens=24, temperature=0
        )
        answer = raw.parse().choices[0].message.content
        assert raw.headers["x-forgeline-model-version"] == "tiny-cold-start/1"
        assert answer == _greedy(built.path, QUESTION, 24)  # the fine-tuned weights answer
        base_answer = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=24, temperature=0)
        assert base_answer.choices[0].message.content != answer

        # A full fine-tune is no adapter: asked for by name on a gateway that does not serve it, the
        # refusal says how to serve it, and the base keeps answering.
        with pytest.raises(openai.NotFoundError) as refused:
            client.chat.completions.create(model="tiny-grpo", messages=QUESTION, max_tokens=4)
        message = refused.value.body["message"]  # type: ignore[index]
        assert "full fine-tune" in message and "forgeline serve --model tiny-grpo@1" in message, message
        with pytest.raises(openai.NotFoundError, match="full fine-tune"):
            client.chat.completions.create(model="tiny:tiny-grpo", messages=QUESTION, max_tokens=4)
        again = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=24, temperature=0)
        assert again.choices[0].message.content == base_answer.choices[0].message.content
    finally:
        stop()


def _full_weights_version(registry: Registry, name: str, folder: Path) -> int:
    """Register a full model folder the way training registers a full fine-tune."""
    info = registry.create_version(
        name,
        source=str(folder),
        run_id=None,
        tags={lineage.BASE_MODEL: str(TINY_BASE), lineage.METHOD: "sft", lineage.ADAPTER: lineage.FULL_WEIGHTS},
    )
    return info.version


def test_full_fine_tunes_hot_swap_when_the_alias_moves_and_no_request_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORGELINE_HOME", str(tmp_path / "home"))
    registry = Registry()
    for seed in (3, 7):
        version = _full_weights_version(registry, "swapfull", build_tiny_base(tmp_path / f"weights-{seed}", seed=seed))
        pipeline.build(registry, f"swapfull@{version}")
    registry.move_alias("swapfull", "production", 1, actor="test", reason="first release")
    spec = ServeSpec(auth=False, device="cpu", poll_interval_s=0.2, max_new_tokens=16)
    app = build_gateway(registry, ["swapfull"], spec)
    base_url, stop_server = serve_in_background(app)
    load = SwapLoad(base_url, "swapfull", QUESTION, max_tokens=6, threads=3)
    try:
        with load:
            deadline = time.monotonic() + 30
            while len(load.answers) < 4 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert load.versions and set(load.versions) == {"swapfull/1"}, (load.versions, load.errors[:3])
            registry.move_alias("swapfull", "production", 2, actor="test", reason="new release")
            load.wait_for("swapfull/2", recent=3)
            time.sleep(0.5)
    finally:
        stop_server()
        registry.close()
    errors, seen = load.errors, load.versions
    assert errors == [], errors[:3]
    assert set(seen) == {"swapfull/1", "swapfull/2"} and seen[-1] == "swapfull/2"

