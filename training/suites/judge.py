"""LLM-as-judge: the version's answers against the production holder's, judged pairwise.

The judge is a model forgeline itself serves, called by name (an alias such as
``judge@production``) through the gateway's OpenAI API with the stock ``openai`` client; so
is the reference (``{name}@production`` by default). The version's own answers are generated
here, in batches, from the weights being evaluated.

Judges prefer whichever answer they read first more often than chance. Every pair is judged
in both orders and an item's score is the mean of the two verdicts (win 1, tie 0.5, loss 0),
so a judge that always picks the first answer scores every item 0.5: the bias cancels instead
of deciding. ``{name}_first_position_rate`` reports how often the judge picked the first
answer, and ``{name}_position_consistency`` how often both orders agreed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from registry.errors import ErrorCode, ForgelineError

from ..evaluation import generate_answers
from .result import SuiteResult
from .rows import messages_of, read_jsonl, render, stable_id, unique_ids
from .spec import JudgeSuite

log = logging.getLogger(__name__)

DEFAULT_GATEWAY = "http://127.0.0.1:8000/v1"
_VERDICT = re.compile(r"^\W*(a|b|tie)\b", re.IGNORECASE)
INSTRUCTIONS = (
    "You compare two answers to the same request and say which is better.\n"
    "Rubric: {rubric}\n"
    "Reply with exactly one word: A if answer A is better, B if answer B is better, tie if neither is."
)


def judge_prompt(question: str, first: str, second: str) -> str:
    """The user turn the judge reads: the request, then the two answers in the order given."""
    return f"Request:\n{question}\n\n[Answer A]\n{first}\n\n[Answer B]\n{second}\n\nWhich answer is better: A, B or tie?"


def verdict(text: str) -> str | None:
    """``"a"``, ``"b"`` or ``"tie"`` from the judge's reply; None when it said something else."""
    found = _VERDICT.match(text or "")
    return found.group(1).lower() if found else None


def item_score(candidate_first: str | None, candidate_second: str | None) -> float:
    """The candidate's score on one item from the verdicts of both orders (candidate shown first, then second)."""
    first = {"a": 1.0, "b": 0.0}.get(candidate_first or "", 0.5)
    second = {"b": 1.0, "a": 0.0}.get(candidate_second or "", 0.5)
    return (first + second) / 2


def interval(scores: list[float], confidence: float, *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Two-sided bootstrap percentile interval of the mean score."""
    values = np.asarray(scores, dtype=float)
    means = values[np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def _client(suite: JudgeSuite) -> Any:
    from openai import OpenAI

    base = suite.gateway_url or os.environ.get("FORGELINE_GATEWAY_URL") or DEFAULT_GATEWAY
    return OpenAI(base_url=base, api_key=os.environ.get(suite.api_key_env) or "none", max_retries=2, timeout=120)


def _chat(client: Any, model: str, messages: list[dict[str, str]], max_tokens: int) -> str:
    import openai

    try:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    except openai.APIConnectionError as err:
        raise ForgelineError(f"cannot reach the gateway at {client.base_url} for {model!r} ({err}); fix: start "
                             "`forgeline serve` or set the suite's gateway_url / $FORGELINE_GATEWAY_URL",
                             code=ErrorCode.UNAVAILABLE) from None
    return reply.choices[0].message.content or ""


def run_judge(suite: JudgeSuite, model: Any, tokenizer: Any, *, model_name: str) -> SuiteResult:
    """``{name}_win_rate`` of the version against the reference (0.5: as good), with its interval.

    Returns an empty result (and logs why) when the reference is not served: a model's first
    version has no production holder to be compared with.

    Raises:
        ForgelineError: the gateway cannot be reached, or the judge is not served.
    """
    import openai

    rows = read_jsonl(suite.prompts, required=(), limit=suite.max_samples)
    conversations = [messages_of(r) for r in rows]
    reference = suite.reference.format(name=model_name)
    client = _client(suite)
    result = SuiteResult(suite.name, suite.kind)
    with ThreadPoolExecutor(max_workers=suite.concurrency) as pool:
        def each(call: Callable[[Any], str], items: list[Any]) -> list[str]:
            return list(pool.map(call, items))

        try:
            theirs = each(lambda m: _chat(client, reference, m, suite.max_new_tokens), conversations)
        except openai.NotFoundError:
            log.warning("%s: the reference %r is not served; the suite is skipped (nothing to compare with)", suite.name, reference)
            return result
        prompts = [render(tokenizer, m) for m in conversations]
        mine = generate_answers(model, tokenizer, prompts, max_new_tokens=suite.max_new_tokens, batch_size=suite.batch_size)
        system = {"role": "system", "content": INSTRUCTIONS.format(rubric=suite.rubric.strip())}
        pairs = []
        for convo, m, t in zip(conversations, mine, theirs, strict=True):
            question = convo[-1]["content"]
            pairs += [[system, {"role": "user", "content": judge_prompt(question, m, t)}],
                      [system, {"role": "user", "content": judge_prompt(question, t, m)}]]
        try:
            replies = each(lambda p: _chat(client, suite.judge, p, 4), pairs)
        except openai.NotFoundError as err:
            raise ForgelineError(f"the judge {suite.judge!r} is not served at {client.base_url} ({err}); fix: serve it "
                                 "(`forgeline serve --model NAME@ALIAS`) or name a served model in the suite's `judge`",
                                 code=ErrorCode.INVALID_REQUEST, param="judge") from None
    verdicts = [verdict(r) for r in replies]
    scores = [item_score(verdicts[2 * i], verdicts[2 * i + 1]) for i in range(len(rows))]
    if not scores:
        return result
    picked = [v for v in verdicts if v in ("a", "b")]
    agree = [verdicts[2 * i] is not None and {"a": "b", "b": "a", "tie": "tie"}[verdicts[2 * i]] == verdicts[2 * i + 1]
             for i in range(len(rows))]
    low, high = interval(scores, suite.confidence)
    name = suite.name
    result.metrics = {
        f"{name}_win_rate": sum(scores) / len(scores),
        f"{name}_win_rate_low": low,
        f"{name}_win_rate_high": high,
        f"{name}_first_position_rate": (sum(v == "a" for v in picked) / len(picked)) if picked else 0.5,
        f"{name}_position_consistency": sum(agree) / len(agree),
    }
    result.items = unique_ids([f"{name}:{stable_id(c)}" for c in conversations])
    result.scores = {f"{name}_win_rate": list(scores)}
    result.samples = [
        {"prompt": c[-1]["content"], "answer": m, "reference": t, "verdict_version_first": verdicts[2 * i] or "?",
         "verdict_version_second": verdicts[2 * i + 1] or "?", "score": s}
        for i, (c, m, t, s) in enumerate(zip(conversations, mine, theirs, scores, strict=True))
    ]
    log.info("%s vs %s judged by %s: %s", name, reference, suite.judge, {k: round(v, 4) for k, v in result.metrics.items()})
    return result
