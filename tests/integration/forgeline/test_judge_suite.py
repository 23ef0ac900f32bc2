"""The judge suite against models forgeline serves: a real gateway under uvicorn on loopback, called by alias.

The judge (``judge@production``) is a tiny Llama-3-style model scripted to answer "A" to
every prompt: the extreme of first-position bias. Judged in one order the version would win
every item; judged in both, each item scores 0.5, so the win rate is exactly 0.5.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from forgeline import pipeline
from registry import lineage
from registry.client import Registry
from registry.errors import ForgelineError
from serving.config import ServeSpec
from serving.gateway.server import serve_in_background
from serving.service import build_gateway
from tests.conftest import REPO
from tests.support.scripted import save_scripted
from training.suites.judge import run_judge
from training.suites.spec import JudgeSuite, load_suite

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway(family_checkpoint: Callable[[str], Path], tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``judge@production`` (always "A") and ``support@production`` served from the registry; the gateway URL."""
    from transformers import AutoTokenizer

    source = family_checkpoint("llama3")
    tok = AutoTokenizer.from_pretrained(source)
    prompt = tok.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False, add_generation_prompt=True)
    last = tok(prompt, add_special_tokens=False)["input_ids"][-1]
    [first] = tok("A", add_special_tokens=False)["input_ids"]
    judge = save_scripted(source, tmp_path / "judge", {last: first, first: tok.convert_tokens_to_ids("<|eot_id|>")})
    registry = Registry()
    for name, folder in (("judge", judge), ("support", source)):
        registry.create_version(name, source=str(folder), run_id=None,
                                tags={lineage.ADAPTER: lineage.FULL_WEIGHTS, lineage.BASE_MODEL: str(folder), lineage.METHOD: "sft"})
        pipeline.build(registry, f"{name}@1")
        registry.move_alias(name, "production", 1, actor="test", reason="serve it")
    app = build_gateway(registry, ["judge@production", "support@production"], ServeSpec(auth=False, device="cpu"))
    base_url, stop = serve_in_background(app)
    try:
        yield f"{base_url}/v1", source
    finally:
        stop()
        registry.close()


def _suite(url: str, **update: object) -> JudgeSuite:
    suite = load_suite(REPO / "recipes" / "suites" / "judge.yaml")
    assert isinstance(suite, JudgeSuite)
    return suite.model_copy(update={"gateway_url": url, "max_new_tokens": 6, "max_samples": 6, **update})


def test_position_swapping_cancels_a_first_position_judge(gateway: tuple[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    url, source = gateway
    model, tokenizer = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    result = run_judge(_suite(url), model, tokenizer, model_name="support")

    assert len(result.samples) == 6 and all(s["reference"] is not None for s in result.samples)
    # The judge picked the first answer every time, whichever model wrote it...
    assert {(s["verdict_version_first"], s["verdict_version_second"]) for s in result.samples} == {("a", "a")}
    unswapped = sum(s["verdict_version_first"] == "a" for s in result.samples) / len(result.samples)
    assert unswapped == 1.0  # one order only: a "perfect" version
    # ...and both orders together cancel it.
    metrics = result.metrics
    assert metrics["judge_win_rate"] == 0.5 == metrics["judge_win_rate_low"] == metrics["judge_win_rate_high"]
    assert metrics["judge_first_position_rate"] == 1.0 and metrics["judge_position_consistency"] == 0.0
    assert result.scores["judge_win_rate"] == [0.5] * 6 and len(set(result.items)) == 6


def test_no_reference_skips_and_an_unserved_judge_is_a_clear_error(gateway: tuple[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    url, source = gateway
    model, tokenizer = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    # A model's first version: nothing holds its production alias, so there is nothing to compare with.
    assert run_judge(_suite(url, max_samples=2), model, tokenizer, model_name="newcomer").metrics == {}
    with pytest.raises(ForgelineError, match=r"the judge 'nobody@production' is not served"):
        run_judge(_suite(url, judge="nobody@production", max_samples=2), model, tokenizer, model_name="support")
    with pytest.raises(ForgelineError, match="cannot reach the gateway"):
        run_judge(_suite("http://127.0.0.1:9/v1", max_samples=1), model, tokenizer, model_name="support")


def test_forgeline_evaluate_runs_the_judge_suite_on_the_version(gateway: tuple[str, Path], tmp_path: Path) -> None:
    """Through `pipeline.evaluate` (what `forgeline evaluate --suite` runs): the judge scores the version only."""
    import yaml

    from tests.conftest import SUPPORT_DATA
    from training.config import EvaluateSpec

    url, _ = gateway
    raw = yaml.safe_load((REPO / "recipes" / "suites" / "judge.yaml").read_text())
    raw.update(prompts=str(REPO / "recipes" / "suites" / "judge-prompts.jsonl"), gateway_url=url, max_samples=3, max_new_tokens=4)
    suite = tmp_path / "judge.yaml"
    suite.write_text(yaml.safe_dump(raw))
    registry = Registry()
    report = pipeline.evaluate(registry, "support", 1, spec=EvaluateSpec(max_samples=4, max_new_tokens=4, suites=[str(suite)]),
                               data=str(SUPPORT_DATA / "eval.jsonl"), with_base=False)
    assert report.metrics["judge_win_rate"] == 0.5 and report.metrics["judge_first_position_rate"] == 1.0
    assert registry.get_version("support", 1).metrics()["judge_win_rate"] == 0.5
    registry.close()
