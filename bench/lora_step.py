"""The stacked multi-LoRA decode step against the merged model, on a chosen layer shape.

`bench/multi_lora.py` measures on the 10M-parameter `small` Llama, where a rank-16 adapter on
every linear layer is 6.9 % of a layer's weights: 16 rows with 16 different adapters read
1.1x the base layer's bytes again at every decode step, and a decode step on a CPU is bound
by the bytes it reads. On real bases the share is an order of magnitude smaller (0.6 % per
adapter on Llama-3-8B's layer shape). This runs `bench.multi_lora.step_times` (one decode
step of ``--rows`` rows, each with its own stacked adapter, against the model with one
adapter merged; no engine) on a model of ``--size`` (`bench.models.SIZES`), so the cost of
the stacked layers can be read at a realistic share.

    python -m bench.lora_step [--size llama3-8b-layer] [--rows 16] [--rank 16] [--reps 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from bench.engine_batching import _threads
from bench.harness import show_result
from bench.models import SIZES, build_adapters, build_llama, model_parameters
from bench.multi_lora import step_times


def adapter_share(size: str, rank: int) -> float:
    """One adapter's parameters over its base layers' (every linear layer of a decoder layer)."""
    shape = SIZES[size]
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    linears = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    return sum(rank * (i + o) for i, o in linears) / sum(i * o for i, o in linears)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="llama3-8b-layer", choices=SIZES, help="bench.models size of the random Llama")
    parser.add_argument("--rows", type=int, default=16, help="decode rows, each with its own adapter")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of merged and stacked")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    from serving.artifacts.torch_build import build_torch_artifact

    threads = _threads()
    with tempfile.TemporaryDirectory(prefix="forgeline-lora-step-") as work:
        base = build_llama(Path(work) / "llama", args.size)
        adapters = build_adapters(base, Path(work) / "adapters", args.rows, r=args.rank)
        merged = Path(work) / "merged"
        build_torch_artifact(str(base), adapters[sorted(adapters)[0]], merged)
        # A short prefill: on the large shapes a 32-token prefill of every row is most of the run.
        step = step_times(merged, base, adapters, rows=args.rows, threads=threads, reps=args.reps, prompt_tokens=4)
        parameters = model_parameters(base)
    share = adapter_share(args.size, args.rank)
    result: dict[str, Any] = {
        "size": args.size, "parameters": parameters, "rank": args.rank, "rows": args.rows, "threads": threads,
        "adapter_share_of_layer": share, "decode_step": step,
    }  # fmt: skip
    show_result(result, args.out)
    print(
        f"\n| {args.size} ({(parameters or 0) / 1e6:.0f}M parameters), {args.rows} rows, rank {args.rank} "
        f"(one adapter {share:.1%} of a layer), {threads} thread(s) | merged | stacked | speed ratio (median, range) |\n"
        "|---|---|---|---|\n"
        f"| decode step | {step['merged_ms']['median']:.1f} ms | {step['lora_ms']['median']:.1f} ms "
        f"| {step['speed_ratio']['median']:.2f}x ({step['speed_ratio']['min']:.2f}-{step['speed_ratio']['max']:.2f}) |"
    )


if __name__ == "__main__":
    main()
