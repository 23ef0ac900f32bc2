"""Held-out evaluation of RL (GRPO) versions with the recipe's own reward functions.

GRPO rows are prompts with a reference (``{"prompt": [...], "answer": "11"}``), not
prompt/completion pairs, so exact match has nothing to compare. Instead each held-out
prompt gets ``samples`` completions sampled at the recipe's temperature, and every reward
function of the recipe scores them, called exactly as TRL calls it in training. Reported:

- ``reward``: mean weighted sum of the rewards (TRL's ``reward``), and
  ``reward_<function>``: each function's mean;
- ``pass_at_1`` / ``pass_at_<k>``: the unbiased pass@k estimate (Chen et al., 2021) of a
  *verifiable* answer — a completion passes when every reward that reads a reference
  field (``numeric_match``, ``exact_match``, or any reward given ``field``) scores 1.

The same function scores the base with the same seed, so ``better_than_base``,
``thresholds`` and ``no_regression`` gates compare like with like.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import EvaluateSpec, GRPOMethod
from .evaluation import generate_answers
from .rewards import resolve_rewards

log = logging.getLogger(__name__)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)``.

    Raises:
        ValueError: ``k`` is not in ``1..n`` or ``c`` not in ``0..n``.
    """
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    # Product form of the binomial ratio: exact and free of overflow for large n.
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def _render(prompt: str | list[dict[str, Any]], tokenizer: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _function_name(function: Any) -> str:
    inner = getattr(function, "func", function)  # built-ins are partials bound to their reference field
    return getattr(inner, "__name__", type(inner).__name__)


def evaluate_rewards(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    spec: EvaluateSpec,
    method: GRPOMethod,
    *,
    search_path: Path | None = None,
) -> dict[str, float]:
    """Score a model on held-out prompt rows with the recipe's rewards.

    Args:
        model: the causal LM (a PEFT model with its adapter on, or a full model).
        tokenizer: its tokenizer, with the chat template the version was trained with.
        rows: held-out rows with ``prompt`` and the fields the rewards read.
        spec: ``max_samples`` prompts, ``samples`` completions each, ``pass_k``, ``seed``.
        method: the recipe's ``method`` section: rewards, weights, temperature and
            ``max_completion_length``.
        search_path: where user reward modules (``module:function``) are imported from.

    Returns:
        ``reward``, ``reward_<function>`` per function, and ``pass_at_1`` / ``pass_at_<k>``
        when a reward is verifiable; empty when no row has a prompt.
    """
    import torch

    model.eval()
    prompt_rows = [r for r in rows if "prompt" in r][: spec.max_samples]
    if not prompt_rows:
        return {}
    functions, weights = resolve_rewards(method.rewards, search_path)
    verifiable = [i for i, reward in enumerate(method.rewards) if reward.reference_field()]
    n = spec.samples
    torch.manual_seed(spec.seed)
    texts = generate_answers(
        model,
        tokenizer,
        [_render(r["prompt"], tokenizer) for r in prompt_rows],
        max_new_tokens=method.max_completion_length,
        batch_size=spec.batch_size,
        samples=n,
        temperature=method.temperature,
    )
    # TRL's call: one entry per completion, every other column repeated alongside it.
    expanded = [row for row in prompt_rows for _ in range(n)]
    conversational = not isinstance(prompt_rows[0]["prompt"], str)
    completions: Sequence[Any] = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    columns = {key: [row.get(key) for row in expanded] for key in prompt_rows[0] if key not in ("prompt", "completion")}
    scores: list[list[float]] = []
    for function in functions:
        values = function(prompts=[row["prompt"] for row in expanded], completions=completions, **columns)
        scores.append([math.nan if v is None else float(v) for v in values])

    metrics: dict[str, float] = {}
    totals = [sum(w * s[j] for w, s in zip(weights, scores, strict=True) if not math.isnan(s[j])) for j in range(len(texts))]
    metrics["reward"] = sum(totals) / len(totals)
    for function, values in zip(functions, scores, strict=True):
        finite = [v for v in values if not math.isnan(v)]
        metrics[f"reward_{_function_name(function)}"] = sum(finite) / len(finite) if finite else 0.0
    if verifiable:
        passed = [all(scores[i][j] >= 1.0 for i in verifiable) for j in range(len(texts))]
        correct = [sum(passed[p * n : (p + 1) * n]) for p in range(len(prompt_rows))]
        for k in sorted({1, spec.pass_k}):
            metrics[f"pass_at_{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(correct)
    log.info(
        "evaluated %d prompts x %d samples: %s", len(prompt_rows), n, {k: round(v, 4) for k, v in metrics.items()}
    )
    return metrics
