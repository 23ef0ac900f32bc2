"""Evaluation throughput: 1,000 generated answers on the tiny base, batched vs one by one.

Generation-based suites (task accuracy, safety, the judge suite's own answers) all go through
``training.evaluation.generate_answers``: left-padded ``generate`` batches that stop at the
model's stop tokens. This benchmark scores the same 1,000 support-ticket prompts with
``batch_size`` 64 and with ``batch_size`` 1 in one process, back to back, and reports both
times, their ratio, how many answers agree (greedy answers should not depend on batching)
and the load average around each run, since the machine is shared.

    python -m bench.eval_batching [--setting smoke|full]   # writes bench/results/eval_batching.json
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import main
from bench.procs import REPO

NAME = "eval_batching"
BASE = REPO / "assets" / "tiny-base"
DATA = REPO / "recipes" / "data" / "support-tickets"
log = logging.getLogger(NAME)


def prompts(tokenizer: Any, count: int) -> list[str]:
    rows = [json.loads(line) for name in ("train.jsonl", "eval.jsonl") for line in (DATA / name).read_text().splitlines()]
    return [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows[:count]]


def run(setting: str, work: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.evaluation import generate_answers

    count, max_new_tokens, batch = (40, 8, 16) if setting == "smoke" else (1000, 8, 64)
    torch.set_num_threads(2)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(BASE).eval(), AutoTokenizer.from_pretrained(BASE)
    texts = prompts(tokenizer, count)
    generate_answers(model, tokenizer, texts[:8], max_new_tokens=max_new_tokens, batch_size=8)  # warm-up
    runs: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[str]] = {}
    for label, size in (("batched", batch), ("one_by_one", 1)):
        load_before = os.getloadavg()[0]
        began, cpu_began = time.perf_counter(), time.process_time()
        answers[label] = generate_answers(model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=size)
        seconds, cpu = time.perf_counter() - began, time.process_time() - cpu_began
        # CPU time too: on a shared machine other tenants stretch wall time, not this process's CPU time.
        runs[label] = {"batch_size": size, "seconds": seconds, "cpu_seconds": cpu, "samples_per_s": count / seconds,
                       "load_before": load_before, "load_after": os.getloadavg()[0]}
        log.info("%s (batch %d): %d samples in %.1f s", label, size, count, seconds)
    agree = sum(a == b for a, b in zip(answers["batched"], answers["one_by_one"], strict=True)) / count
    ratio = runs["one_by_one"]["seconds"] / runs["batched"]["seconds"]
    cpu_ratio = runs["one_by_one"]["cpu_seconds"] / runs["batched"]["cpu_seconds"]
    print(f"eval of {count} samples on the tiny base: batched (64) {runs['batched']['seconds']:.1f} s, one by one "
          f"{runs['one_by_one']['seconds']:.1f} s: {ratio:.1f}x faster batched ({cpu_ratio:.1f}x in CPU time); "
          f"answers agree {agree:.1%}; load average {runs['batched']['load_before']:.1f}-{runs['one_by_one']['load_after']:.1f}")
    return {"what": "generate_answers on support-ticket prompts, greedy, max_new_tokens tokens each",
            "model": str(BASE.relative_to(REPO)), "samples": count, "max_new_tokens": max_new_tokens, "torch_threads": 2,
            "runs": runs, "speedup": ratio, "cpu_speedup": cpu_ratio, "answers_agree": agree}


if __name__ == "__main__":
    sys.exit(main(NAME, run))
