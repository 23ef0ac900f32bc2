"""Generate verifiable arithmetic tasks for GRPO (and the SFT cold start R1-style runs use).

Two datasets, both deterministic:

- ``recipes/data/toy-arithmetic``: one-digit sums (``What is 3 + 4?``, answer ``7``) for the
  tiny CPU model. ``cold-start.jsonl`` holds SFT rows answering in the R1 format
  ``<think>3+4=7</think><answer>7</answer>``; ``train.jsonl``/``eval.jsonl`` hold
  prompt-only rows with the reference ``answer`` the rewards check.
- ``recipes/data/r1-math``: multi-step integer arithmetic with a system prompt asking for
  the R1 format, for a real instruction-tuned model on a GPU (``recipes/grpo-r1-math.yaml``).

Run from the repository root::

    python assets/make_arithmetic_data.py
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

log = logging.getLogger("make_arithmetic_data")

ROOT = Path(__file__).resolve().parent.parent / "recipes" / "data"
TOY_SEED = 20250120
MATH_SEED = 20250122
R1_SYSTEM = (
    "You are a careful calculator. Think step by step inside <think> </think>, then give only the final "
    "integer inside <answer> </answer>."
)


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def toy_rows(rng: random.Random, n: int) -> list[tuple[int, int]]:
    return [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(n)]


def toy_question(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"What is {a} + {b}?"}]


def make_toy(rng: random.Random) -> dict[str, list[dict]]:
    cold = [
        {"prompt": toy_question(a, b), "completion": [{"role": "assistant", "content": f"<think>{a}+{b}={a + b}</think><answer>{a + b}</answer>"}]}
        for a, b in toy_rows(rng, 300)
    ]
    train = [{"prompt": toy_question(a, b), "answer": str(a + b)} for a, b in toy_rows(rng, 512)]
    eval_ = [{"prompt": toy_question(a, b), "answer": str(a + b)} for a, b in toy_rows(rng, 64)]
    return {"cold-start": cold, "train": train, "eval": eval_}


def math_problem(rng: random.Random) -> tuple[str, int]:
    """An expression of 3-4 integer terms with +, - and *, and its value."""
    terms = [rng.randint(2, 99) for _ in range(rng.choice((3, 4)))]
    ops = [rng.choice("+-*") for _ in terms[1:]]
    expression = str(terms[0]) + "".join(f" {op} {t}" for op, t in zip(ops, terms[1:], strict=True))
    # Value with the usual precedence: fold products first, then add the signed summands.
    summands, signs = [terms[0]], [1]
    for op, term in zip(ops, terms[1:], strict=True):
        if op == "*":
            summands[-1] *= term
        else:
            summands.append(term)
            signs.append(1 if op == "+" else -1)
    return expression, sum(s * v for s, v in zip(signs, summands, strict=True))


def make_math(rng: random.Random) -> dict[str, list[dict]]:
    def row() -> dict:
        expression, value = math_problem(rng)
        prompt = [{"role": "system", "content": R1_SYSTEM}, {"role": "user", "content": f"Compute {expression}."}]
        return {"prompt": prompt, "answer": str(value)}

    return {"train": [row() for _ in range(4000)], "eval": [row() for _ in range(200)]}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name, rows_by_split, readme in (
        ("toy-arithmetic", make_toy(random.Random(TOY_SEED)),
         "One-digit sums for the tiny CPU model. `cold-start.jsonl`: SFT rows in the R1 format "
         "(`<think>3+4=7</think><answer>7</answer>`); `train.jsonl`/`eval.jsonl`: GRPO prompts with the "
         "reference `answer`."),
        ("r1-math", make_math(random.Random(MATH_SEED)),
         "Multi-step integer arithmetic for GRPO on an instruction-tuned model: a system prompt asks for "
         "`<think>…</think><answer>…</answer>`; each row carries the reference `answer`."),
    ):
        folder = ROOT / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in rows_by_split.items():
            write_jsonl(rows, folder / f"{split}.jsonl")
        counts = ", ".join(f"{len(rows)} {split}" for split, rows in rows_by_split.items())
        (folder / "README.md").write_text(
            f"# {name}\n\n{readme} Rows: {counts}.\n"
            "Regenerate (deterministic) with `python assets/make_arithmetic_data.py`.\n",
            encoding="utf-8",
        )
        log.info("wrote %s (%s)", folder, counts)


if __name__ == "__main__":
    main()
