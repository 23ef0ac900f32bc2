"""Held-out evaluation: exact-match accuracy of generated answers, and completion loss.

The same function scores the base model and the tuned version, so the promotion gate
``better_than_base`` compares like with like.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any

from .config import EvaluateSpec
from .stop_tokens import stop_token_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalExample:
    """One held-out question: the rendered prompt and the answer we expect.

    ``completion`` is the answer as the chat template renders it after ``prompt`` (with the
    turn's closing stop token, e.g. ``<|eot_id|>``), which is what training taught the model
    to emit; None for plain-text prompts, whose answer ends with the tokenizer's eos.
    """

    prompt: str
    expected: str
    completion: str | None = None


def to_examples(rows: list[dict[str, Any]], tokenizer: Any) -> list[EvalExample]:
    """Render rows with the tokenizer's chat template; rows without an answer are skipped.

    Preference rows count their ``chosen`` answer as the expected one. Prompt-only rows
    (GRPO's prompt/answer) have no text to match: `training.reward_evaluation` scores those.
    """
    examples = []
    for row in rows:
        if "chosen" in row and "completion" not in row:
            row = {"prompt": row["prompt"], "completion": row["chosen"]}
        if "messages" in row:
            messages = row["messages"]
            if messages[-1]["role"] != "assistant" or row.get("tools") or messages[-1].get("tool_calls"):
                continue  # tool-use rows are scored by tool-call accuracy, not exact match of text
            prompt_msgs, expected = messages[:-1], messages[-1]["content"]
        elif "prompt" in row and "completion" in row:
            prompt_msgs, completion = row["prompt"], row["completion"]
            if isinstance(prompt_msgs, str):
                examples.append(EvalExample(prompt_msgs, completion))
                continue
            expected = completion[-1]["content"]
        else:
            continue
        prompt = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*prompt_msgs, {"role": "assistant", "content": expected}], tokenize=False
        )
        examples.append(EvalExample(prompt, expected, full[len(prompt) :] if full.startswith(prompt) else None))
    return examples


def normalise(text: str) -> str:
    """Exact match ignores surrounding whitespace and case, nothing else."""
    return " ".join(text.split()).casefold()


def _batches(items: list[EvalExample], size: int) -> list[list[EvalExample]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    samples: int = 1,
    temperature: float | None = None,
) -> list[str]:
    """Greedy answers, batched with left padding, each ending at the model's first stop token.

    The stop tokens are the model's ``generation_config`` list (`training.stop_tokens`), the
    same ones the served engine stops on, so an answer scores here as the gateway returns it.
    With ``temperature`` set, ``samples`` completions per prompt are sampled instead (the
    answers of prompt ``i`` are ``answers[i * samples : (i + 1) * samples]``).
    """
    import torch

    stops = stop_token_ids(getattr(model, "generation_config", None), tokenizer)
    if temperature is None:
        sampling: dict[str, Any] = {"do_sample": False}
    else:
        # Full distribution (top_k=0, top_p=1), as GRPO samples its groups in training.
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0, "num_return_sequences": samples}
        batch_size = max(1, batch_size // samples)

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    **sampling,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=stops,
                )
            new = out[:, enc["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def completion_losses(model: Any, tokenizer: Any, examples: list[EvalExample], *, batch_size: int) -> list[tuple[float, int]]:
    """Per example: the summed negative log-likelihood of its expected answer with the token(s)
    that end it, and how many tokens that is.

    Chat answers are scored as the template renders them (closing stop token included), plain
    answers with the tokenizer's eos appended.
    """
    import torch

    found: list[tuple[float, int]] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for batch in _batches(examples, batch_size):
            prompt_ids = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in batch]
            answer_ids = [_answer_ids(tokenizer, e) for e in batch]
            seqs = [p + a for p, a in zip(prompt_ids, answer_ids, strict=True)]
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
            labels = torch.full_like(ids, -100)
            mask = torch.zeros_like(ids)
            for i, (p, s) in enumerate(zip(prompt_ids, seqs, strict=True)):
                ids[i, : len(s)] = torch.tensor(s)
                labels[i, len(p) : len(s)] = torch.tensor(s[len(p) :])
                mask[i, : len(s)] = 1
            with torch.inference_mode():
                logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(model.device)
            losses = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), reduction="none", ignore_index=-100
            ).view(shift_labels.shape)
            counted = shift_labels != -100
            found += [(float(losses[i][counted[i]].sum()), int(counted[i].sum())) for i in range(len(batch))]
    finally:
        tokenizer.padding_side = side
    return found


def completion_loss(model: Any, tokenizer: Any, examples: list[EvalExample], *, batch_size: int) -> float:
    """Mean per-token negative log-likelihood of the expected answers (plus eos)."""
    losses = completion_losses(model, tokenizer, examples, batch_size=batch_size)
    return sum(total for total, _ in losses) / max(sum(count for _, count in losses), 1)


def item_id(example: EvalExample) -> str:
    """A stable id of a held-out item, so two versions scored on the same data compare item by item."""
    return hashlib.sha256(f"{example.prompt}\0{example.expected}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ItemScores:
    """Per-item scores behind the aggregate metrics (what significance-aware gates compare)."""

    items: list[str]
    scores: dict[str, list[float]]


def _answer_ids(tokenizer: Any, example: EvalExample) -> list[int]:
    if example.completion is not None:
        return tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    return tokenizer(example.expected, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def evaluate_model(model: Any, tokenizer: Any, rows: list[dict[str, Any]], spec: EvaluateSpec) -> dict[str, float]:
    """Score a model on held-out rows (see :func:`evaluate_items`); the aggregates only."""
    return evaluate_items(model, tokenizer, rows, spec)[0]


def evaluate_items(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], spec: EvaluateSpec
) -> tuple[dict[str, float], ItemScores | None]:
    """Score a model on held-out rows.

    Returns:
        ``accuracy`` (exact match of generated answers), ``eval_loss`` (completion NLL per
        token) and ``eval_perplexity``, over at most ``spec.max_samples`` rows; and each
        item's ``accuracy`` (0 or 1) and ``eval_loss`` (its own mean NLL per token).
    """
    model.eval()
    examples = to_examples(rows, tokenizer)[: spec.max_samples]
    if not examples:
        return {}, None
    answers = generate_answers(
        model, tokenizer, [e.prompt for e in examples], max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size
    )
    right = [float(normalise(a) == normalise(e.expected)) for a, e in zip(answers, examples, strict=True)]
    losses = completion_losses(model, tokenizer, examples, batch_size=spec.batch_size)
    loss = sum(total for total, _ in losses) / max(sum(count for _, count in losses), 1)
    metrics = {"accuracy": sum(right) / len(examples), "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
    log.info("evaluated %d examples: %s", len(examples), {k: round(v, 4) for k, v in metrics.items()})
    ids: list[str] = []
    seen: dict[str, int] = {}
    for example in examples:  # a repeated item is a second item, not the same one twice
        base = item_id(example)
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    items = ItemScores(
        items=ids,
        scores={"accuracy": right, "eval_loss": [total / max(count, 1) for total, count in losses]},
    )
    return metrics, items
