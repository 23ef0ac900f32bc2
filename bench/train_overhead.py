"""Training overhead: the same LoRA SFT run through forgeline and as a plain TRL script.

Same model (assets/tiny-base), data (support tickets), hyper-parameters and seed. forgeline
adds data checks, MLflow tracking (the HF MLflow callback, per-step metrics), the checkpoint
completeness marker and registration; the plain script is what one would write by hand
with TRL and PEFT, reporting nowhere. We time the steady-state step (time between
consecutive ``on_step_end`` events, logging and checkpoint saves included, the first
steps skipped as warm-up) and report the forgeline/plain ratio per pair of runs, the two
run back to back in alternating order; goal: median ratio <= 1.02. Both wall-clock and
process CPU time are kept: on a shared machine other tenants stretch wall time by 2-4x
from one run to the next, while CPU time (one intra-op thread) stays comparable.

    python -m bench.train_overhead [--setting smoke|full]   # writes bench/results/train_overhead.json
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import main
from bench.procs import REPO
from bench.stats import spread

NAME = "train_overhead"
log = logging.getLogger(NAME)

BASE = REPO / "assets" / "tiny-base"
DATA = REPO / "recipes" / "data" / "support-tickets"
COUNTS = {"smoke": {"steps": 12, "repeats": 1, "warmup": 3}, "full": {"steps": 40, "repeats": 4, "warmup": 6}}
HYPER = {"learning_rate": 2e-3, "batch_size": 16, "max_length": 128, "r": 16, "alpha": 32, "seed": 42, "logging_steps": 5, "save_steps": 20}


def step_timer() -> Any:
    """A TrainerCallback that records when each optimiser step ends."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[tuple[float, float]] = []  # (wall, process CPU)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.ends.append((time.perf_counter(), time.process_time()))

    return StepTimer()


def step_times(timer: Any, warmup: int, clock: int) -> list[float]:
    """Per-step durations after ``warmup`` steps on one clock (0: wall, 1: process CPU)."""
    ends = [end[clock] for end in timer.ends[warmup:]]
    return [b - a for a, b in zip(ends, ends[1:], strict=False)]


def plain_trl(steps: int, out: Path, timer: Any) -> None:
    """The hand-written baseline: TRL SFTTrainer + PEFT LoRA on the same data, no tracking."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(BASE)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    dataset = load_dataset("json", data_files=str(DATA / "train.jsonl"), split="train")
    config = SFTConfig(
        output_dir=str(out), max_steps=steps, learning_rate=HYPER["learning_rate"],
        per_device_train_batch_size=HYPER["batch_size"], max_length=HYPER["max_length"], seed=HYPER["seed"],
        logging_steps=HYPER["logging_steps"], save_steps=HYPER["save_steps"], save_total_limit=2,
        gradient_checkpointing=False, bf16=False, use_cpu=not torch.cuda.is_available(), report_to=[],
        dataloader_num_workers=0, logging_first_step=True,
    )
    lora = LoraConfig(r=HYPER["r"], lora_alpha=HYPER["alpha"], target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora, callbacks=[timer])
    trainer.train()
    trainer.save_model(str(out / "adapter"))


def forgeline(steps: int, out: Path, timer: Any, run: int) -> None:
    """The same run through forgeline's training job (tracking, checks, registration)."""
    from training.config import AdapterSpec, DataSpec, ModelSpec, SFTMethod, TrainSpec
    from training.job import TrainJob, run_job

    job = TrainJob(
        name="bench-train", model=ModelSpec(base=str(BASE)),
        data=DataSpec(train=str(DATA / "train.jsonl"), eval=str(DATA / "eval.jsonl")),
        method=SFTMethod(), adapter=AdapterSpec(kind="lora", r=HYPER["r"], alpha=HYPER["alpha"]),
        train=TrainSpec(max_steps=steps, learning_rate=HYPER["learning_rate"], batch_size=HYPER["batch_size"],
                        max_length=HYPER["max_length"], seed=HYPER["seed"], logging_steps=HYPER["logging_steps"],
                        save_steps=HYPER["save_steps"]),
        recipe_hash=f"bench{run}", output_dir=str(out),
    )
    run_job(job, callbacks=[timer])


def run(setting: str, work: Path) -> dict[str, Any]:
    import torch

    counts = COUNTS[setting]
    # One intra-op thread: on a shared 2-core box OpenMP spin-waits otherwise dominate the noise.
    torch.set_num_threads(1)
    pairs = []
    for repeat in range(counts["repeats"]):
        medians: dict[str, float] = {}
        cpu: dict[str, float] = {}
        order = ("plain", "forgeline") if repeat % 2 == 0 else ("forgeline", "plain")
        for which in order:
            timer = step_timer()
            out = work / f"{which}-{repeat}"
            began = time.perf_counter()
            if which == "plain":
                plain_trl(counts["steps"], out, timer)
            else:
                forgeline(counts["steps"], out, timer, repeat)
            times = step_times(timer, counts["warmup"], 0)
            medians[which] = statistics.median(times)
            cpu[which] = statistics.median(step_times(timer, counts["warmup"], 1))
            log.info("repeat %d %s: median step %.4f s wall, %.4f s CPU over %d steps (%.1f s in all)",
                     repeat, which, medians[which], cpu[which], len(times), time.perf_counter() - began)
        pairs.append({
            **medians, "ratio": medians["forgeline"] / medians["plain"],
            "cpu_plain": cpu["plain"], "cpu_forgeline": cpu["forgeline"], "cpu_ratio": cpu["forgeline"] / cpu["plain"],
        })
    result = {
        "what": "median steady-state step time, forgeline SFT (run_job: checks, MLflow, markers, registry) / plain TRL script",
        "model": str(BASE.relative_to(REPO)), "data": str((DATA / "train.jsonl").relative_to(REPO)),
        "hyper": HYPER, "counts": counts, "torch_threads": 1,
        "pairs": pairs,
        "step_s_plain": spread([p["plain"] for p in pairs]),
        "step_s_forgeline": spread([p["forgeline"] for p in pairs]),
        "ratio": spread([p["ratio"] for p in pairs]),
        "cpu_step_s_plain": spread([p["cpu_plain"] for p in pairs]),
        "cpu_step_s_forgeline": spread([p["cpu_forgeline"] for p in pairs]),
        "cpu_ratio": spread([p["cpu_ratio"] for p in pairs]),
        "goal": "ratio median <= 1.02",
    }
    for key, label in (("ratio", "wall"), ("cpu_ratio", "CPU")):
        ratio = result[key]
        print(f"train overhead, {label} step time forgeline / plain TRL: median {ratio['median']:.3f} "
              f"(min {ratio['min']:.3f}, max {ratio['max']:.3f}, {ratio['n']} pairs); goal <= 1.02")
    print(json.dumps(pairs, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(main(NAME, run))
