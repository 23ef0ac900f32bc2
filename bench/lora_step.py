"""The stacked multi-LoRA decode step against the merged model, on a chosen layer shape.

`bench/multi_lora.py` measures on the 10M-parameter `small` Llama, where a rank-16 adapter on
every linear layer is 6.9 % of a layer's weights: 16 rows with 16 different adapters read
1.1x the base layer's bytes again at every decode step, and a decode step on a CPU is bound
by the bytes it reads. On real bases the share is an order of magnitude smaller (0.6 % per
adapter on Llama-3-8B's layer shape). This runs `bench.multi_lora.step_times` (one decode
step of ``--rows`` rows, each with its own stacked adapter, against the model with one
adapter merged; no engine) on a model of ``--size`` (`bench.models.SIZES`), so the cost of
the stacked layers can be read at a realistic share. With ``--engine`` it also runs
`bench.multi_lora`'s closed loop (two `TorchEngine`s: the merged model, and the base serving
``--adapters`` adapters with each request naming a random one; ``--rows`` clients) on that
model, so the engine's figure the issue's goal names can be read at that share too.

    python -m bench.lora_step [--size llama3-8b-layer] [--rows 16] [--rank 16] [--reps 3] [--out FILE.json]
    python -m bench.lora_step --engine [--adapters 50] [--requests 64] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from bench.engine_batching import _threads
from bench.harness import show_result
from bench.models import SIZES, build_adapters, build_llama, layer_linears, model_parameters, weight_reads
from bench.multi_lora import engine_rounds, mixed_traffic, step_times, summary
from bench.stats import fmt_spread


def adapter_share(size: str, rank: int) -> float:
    """One adapter's parameters over its base layers' (every linear layer of a decoder layer)."""
    linears = layer_linears(SIZES[size])
    return sum(rank * (i + o) for i, o in linears) / sum(i * o for i, o in linears)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="llama3-8b-layer", choices=SIZES, help="bench.models size of the random Llama")
    parser.add_argument("--rows", type=int, default=16, help="decode rows, each with its own adapter (the closed loop's clients)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of merged and stacked")
    parser.add_argument("--engine", action="store_true", help="also run bench.multi_lora's closed loop on two engines")
    parser.add_argument("--adapters", type=int, default=50, help="with --engine: adapters served, each request naming a random one")
    parser.add_argument("--requests", type=int, default=64, help="with --engine: requests per round")
    parser.add_argument("--max-tokens", type=int, default=16, help="with --engine: tokens per request")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    from serving.artifacts.torch_build import build_torch_artifact

    threads = _threads()
    with tempfile.TemporaryDirectory(prefix="forgeline-lora-step-") as work:
        base = build_llama(Path(work) / "llama", args.size)
        count = max(args.rows, args.adapters) if args.engine else args.rows
        adapters = build_adapters(base, Path(work) / "adapters", count, r=args.rank)
        merged = Path(work) / "merged"
        build_torch_artifact(str(base), adapters[sorted(adapters)[0]], merged)
        # A short prefill: on the large shapes a 32-token prefill of every row is most of the run.
        step = step_times(merged, base, adapters, rows=args.rows, threads=threads, reps=args.reps, prompt_tokens=4)
        engine = _engine(args, base, merged, adapters, threads) if args.engine else None
        parameters = model_parameters(base)
        config = json.loads((base / "config.json").read_text())
    share = adapter_share(args.size, args.rank)
    result: dict[str, Any] = {
        "size": args.size, "parameters": parameters, "rank": args.rank, "rows": args.rows, "threads": threads,
        "adapter_share_of_layer": share, "weight_reads": weight_reads(config, args.rank, args.rows), "decode_step": step,
    }  # fmt: skip
    if engine is not None:
        result["engine"] = engine
    show_result(result, args.out)
    print(
        f"\n| {args.size} ({(parameters or 0) / 1e6:.0f}M parameters), {args.rows} rows, rank {args.rank} "
        f"(one adapter {share:.1%} of a layer), {threads} thread(s) | merged | stacked | speed ratio (median, range) |\n"
        "|---|---|---|---|\n"
        f"| decode step | {step['merged_ms']['median']:.1f} ms | {step['lora_ms']['median']:.1f} ms "
        f"| {_x(step['speed_ratio'])} |"
    )
    if engine is not None:
        s = engine["summary"]
        print(
            f"| closed loop, {args.adapters} adapters, tokens/s | {s['merged_tokens_per_s']['median']:.1f} "
            f"| {s['lora_tokens_per_s']['median']:.1f} | {_x(s['tokens_per_s_ratio'])} |"
        )


def _x(figure: dict[str, Any]) -> str:
    return fmt_spread(figure, "{:.2f}", "×")


def _engine(args: argparse.Namespace, base: Path, merged: Path, adapters: dict[str, Path], threads: int) -> dict[str, Any]:
    """`bench.multi_lora`'s closed loop on this model: ``args.rows`` clients, each request naming a random adapter."""
    names = sorted(adapters)[: args.adapters]
    texts, mixed = mixed_traffic(base, names, args.requests)
    measured = engine_rounds(
        merged, base, {n: adapters[n] for n in names}, texts=texts, mixed=mixed, concurrency=args.rows,
        max_tokens=args.max_tokens, rounds=args.reps, budget_s=float("inf"), threads=threads,
    )  # fmt: skip
    return {
        "adapters": len(names), "requests": args.requests, "max_tokens": args.max_tokens,
        "distinct_adapters_in_traffic": len(set(mixed)), "loaded_adapters": measured["loaded_adapters"],
        "rounds": measured["rounds"], "summary": summary(measured),
    }  # fmt: skip


if __name__ == "__main__":
    main()
