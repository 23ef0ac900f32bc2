"""GPU benchmark for a lent H200: our PyTorch engine and LoRA SFT on a ~1B Llama built from config.

Measures, each against a ceiling measured in the same run:

* memory bandwidth: a large device-to-device copy (bytes read + written per second);
* matmul throughput: an 8192^3 bf16 matrix product (the compute ceiling, next to the
  datasheet's 989 TFLOP/s dense bf16 for H100/H200 SXM);
* decode with `serving.engine.torch_engine.TorchEngine` (continuous batching) and the static
  engine before it (`bench.static_engine`), bf16, random weights, batch 1 and larger:
  tokens/s and the fraction of measured bandwidth the decode steps use (weights + KV cache
  read per step); then requests arriving one every 50 ms: tokens/s and time to first token;
* many LoRA adapters in one batch (`serving.engine.multi_lora`): ``rows`` concurrent
  requests, each naming its own rank-16 adapter, against the same requests on the model
  alone (`bench.multi_lora.engine_rounds`), tokens/s and their ratio; on a GPU a decode step
  is bound by the bytes it reads, so the ratio should follow the adapters' share of them;
* LoRA SFT (PEFT, rank 16 on every linear layer, bf16): tokens/s and model FLOP
  utilisation, counted two ways: 6N (the usual full-fine-tuning count) and 4N (LoRA: the
  frozen base needs no weight gradients), plus attention.

Writes ``gpu-bench.json`` and ``gpu-bench.md`` to ``--out`` (default ``$OUT`` or
``bench/results``). Random weights: throughput does not depend on their values.

    python bench/gpu_bench.py [--out DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform as host_platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.append(str(REPO))

logger = logging.getLogger("bench.gpu")

H200_DENSE_BF16_TFLOPS = 989.4  # NVIDIA H100/H200 SXM datasheet, dense (no sparsity)
H200_HBM_TBPS = 4.8  # NVIDIA H200 datasheet


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: Any, *, gib: float = 4.0, iters: int = 20) -> dict[str, float]:
    """Device-to-device copy bandwidth, counting bytes read and written."""
    import torch

    n = int(gib * (1 << 30))
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    _sync(device)
    seconds = time.perf_counter() - t0
    del src, dst
    return {"bytes_per_copy": n, "iters": iters, "seconds": seconds, "gb_per_s": 2 * n * iters / seconds / 1e9}


def measure_matmul(device: Any, *, n: int = 8192, iters: int = 10) -> dict[str, float]:
    """bf16 matrix-product throughput on random data."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"n": n, "iters": iters, "seconds": seconds, "tflops": 2 * n**3 * iters / seconds / 1e12}


def llama_config(*, vocab_size: int, smoke: bool) -> Any:
    """A TinyLlama-1.1B-shaped config (22 layers, d=2048, GQA 32/4), or a tiny one for --smoke."""
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=2048)  # fmt: skip
    return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=vocab_size, max_position_embeddings=4096, tie_word_embeddings=False)  # fmt: skip


def _matmul_params(model: Any) -> int:
    """Parameters that take part in matrix products (everything but embeddings and norms)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)


def save_random_model(folder: Path, *, smoke: bool, device: Any) -> dict[str, Any]:
    """A random-weight Llama in bf16 with the project's tokenizer, ready for `TorchEngine`."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(REPO / "assets" / "tiny-base")
    config = llama_config(vocab_size=len(tokenizer), smoke=smoke)
    config.eos_token_id, config.bos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    with torch.no_grad():
        # Random weights would end some answers early on eos; keep every answer full length.
        for token in {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}:
            model.lm_head.weight[token].fill_(-1.0)
    info = {"params": sum(p.numel() for p in model.parameters()), "matmul_params": _matmul_params(model),
            "layers": config.num_hidden_layers, "hidden": config.hidden_size, "kv_heads": config.num_key_value_heads,
            "head_dim": config.hidden_size // config.num_attention_heads, "dtype": str(next(model.parameters()).dtype)}  # fmt: skip
    info["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    del model
    return info


async def _decode_run(engine: Any, batch: int, max_tokens: int, prompt: str) -> tuple[int, float]:
    from serving.engine.base import SamplingParams

    async def one() -> int:
        tokens = 0
        async for chunk in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0)):
            tokens += len(chunk.token_ids)
        return tokens

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one() for _ in range(batch)))
    return sum(counts), time.perf_counter() - t0


ENGINES = ("continuous", "static")
"""`TorchEngine` (continuous batching) and the engine before it (`bench.static_engine`)."""


def _engine(kind: str, folder: Path, *, device: str, max_batch_size: int) -> Any:
    if kind == "static":
        from bench.static_engine import StaticTorchEngine

        return StaticTorchEngine(folder, device=device, max_batch_size=max_batch_size, batch_window_ms=20.0, model_id="bench")
    from serving.engine.torch_engine import TorchEngine

    return TorchEngine(folder, device=device, max_batch_size=max_batch_size, batch_window_ms=20.0, model_id="bench")


def bench_decode(
    folder: Path, model: dict[str, Any], bandwidth_gbps: float, *, device: str, batches: list[int], max_tokens: int,
    engines: tuple[str, ...] = ENGINES,
) -> list[dict[str, Any]]:  # fmt: skip
    """Decode throughput of each PyTorch engine at each batch size (all requests submitted together)."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    results: list[dict[str, Any]] = []

    async def run(kind: str) -> None:
        engine = _engine(kind, folder, device=device, max_batch_size=max(batches))
        await engine.start()
        try:
            prompt_tokens = engine.count_tokens(prompt)
            await _decode_run(engine, 1, 8, prompt)  # warm-up: kernels, allocator
            for batch in batches:
                tokens, seconds = await _decode_run(engine, batch, max_tokens, prompt)
                steps = tokens / batch
                # Each decode step reads every weight once, and the KV cache of every row.
                avg_ctx = prompt_tokens + steps / 2
                kv_bytes = 2 * model["layers"] * model["kv_heads"] * model["head_dim"] * 2 * avg_ctx * batch
                step_bytes = model["weight_bytes"] + kv_bytes
                achieved = step_bytes * steps / seconds / 1e9
                results.append({
                    "engine": kind, "batch": batch, "max_tokens": max_tokens, "tokens": tokens, "seconds": round(seconds, 3),
                    "tokens_per_s": tokens / seconds, "ms_per_step": 1000 * seconds / steps,
                    "achieved_gb_per_s": achieved, "fraction_of_measured_bandwidth": achieved / bandwidth_gbps,
                })  # fmt: skip
                logger.info(
                    "%s decode batch %d: %.0f tokens/s, %.1f%% of measured bandwidth",
                    kind, batch, tokens / seconds, 100 * achieved / bandwidth_gbps,
                )  # fmt: skip
        finally:
            await engine.stop()

    for kind in engines:
        asyncio.run(run(kind))
    return results


def bench_arrivals(
    folder: Path, *, device: str, requests: int, gap_s: float, max_tokens: int, engines: tuple[str, ...] = ENGINES
) -> list[dict[str, Any]]:
    """Requests arriving one every ``gap_s`` (not all at once): tokens/s and time to first token per engine.

    Where continuous batching shows: the static engine makes a request that arrives while a
    batch decodes wait for the whole batch.
    """
    from serving.engine.base import SamplingParams

    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    results: list[dict[str, Any]] = []

    async def run(kind: str) -> None:
        engine = _engine(kind, folder, device=device, max_batch_size=requests)
        await engine.start()
        try:
            await _decode_run(engine, 1, 8, prompt)  # warm-up
            ttft: list[float] = []

            async def one(delay: float) -> int:
                await asyncio.sleep(delay)
                sent, tokens = time.perf_counter(), 0
                async for chunk in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0)):
                    if not tokens:
                        ttft.append(time.perf_counter() - sent)
                    tokens += len(chunk.token_ids)
                return tokens

            t0 = time.perf_counter()
            counts = await asyncio.gather(*(one(i * gap_s) for i in range(requests)))
            seconds = time.perf_counter() - t0
            ttft.sort()
            results.append({
                "engine": kind, "requests": requests, "gap_ms": 1000 * gap_s, "max_tokens": max_tokens,
                "tokens_per_s": sum(counts) / seconds, "ttft_p50_ms": 1000 * ttft[len(ttft) // 2],
                "ttft_max_ms": 1000 * ttft[-1],
            })  # fmt: skip
            logger.info("%s arrivals: %.0f tokens/s, ttft max %.0f ms", kind, results[-1]["tokens_per_s"], results[-1]["ttft_max_ms"])
        finally:
            await engine.stop()

    for kind in engines:
        asyncio.run(run(kind))
    return results


def bench_multi_lora(folder: Path, work: Path, *, device: str, rows: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    """``rows`` concurrent requests, each with its own stacked adapter, against the base alone.

    The base stands for the merged model: merging changes the weights' values, not a step's
    work, and saves merging and writing a second copy of the model in the GPU's time budget.
    """
    import random

    from bench.models import build_adapters, prompts, weight_reads
    from bench.multi_lora import engine_rounds, summary

    adapters = build_adapters(folder, work / "adapters", rows, r=16)
    names = sorted(adapters)
    texts = prompts(folder, rows * 2)
    rng = random.Random(0)
    mixed: list[str | None] = rng.sample(names, rows) + rng.sample(names, rows)  # every row its own adapter
    measured = engine_rounds(
        folder, folder, adapters, texts=texts, mixed=mixed, concurrency=rows, max_tokens=max_tokens,
        rounds=rounds, budget_s=float("inf"), threads=1, device=device,
    )  # fmt: skip
    config = json.loads((folder / "config.json").read_text())
    result = {"rows": rows, "rank": 16, "max_tokens": max_tokens, "rounds": measured["rounds"], "summary": summary(measured),
              "weight_reads": weight_reads(config, 16, rows)}  # fmt: skip
    s = result["summary"]
    logger.info("multi-LoRA, %d rows: %.2fx of the base alone", rows, s["tokens_per_s_ratio"]["median"])
    return result


def bench_lora_sft(*, device: Any, smoke: bool, batch: int, seq: int, steps: int, peak_tflops: float) -> dict[str, Any]:
    """LoRA SFT step throughput and model FLOP utilisation on a random ~1B Llama."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    config = llama_config(vocab_size=32000, smoke=smoke)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        base = LlamaForCausalLM(config).to(dtype)
    n_matmul = _matmul_params(base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda")
    model.train()
    data = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(3):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        last_loss = step()
    _sync(device)
    seconds = time.perf_counter() - t0
    tokens_per_s = batch * seq * steps / seconds
    # PaLM's count: 6N per token for full training, plus 12*L*d*T for attention (fwd + bwd).
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq
    flops_6n = 6 * n_matmul + attention
    flops_lora = 4 * n_matmul + attention  # frozen base: input gradients (2N) but no weight gradients
    result = {
        "params": sum(p.numel() for p in base.parameters()), "matmul_params": n_matmul, "trainable_params": trainable,
        "batch": batch, "seq_len": seq, "steps": steps, "seconds": round(seconds, 3), "tokens_per_s": tokens_per_s,
        "loss": last_loss, "mfu_6n_vs_datasheet": flops_6n * tokens_per_s / (H200_DENSE_BF16_TFLOPS * 1e12),
        "mfu_lora_4n_vs_datasheet": flops_lora * tokens_per_s / (H200_DENSE_BF16_TFLOPS * 1e12),
        "mfu_6n_vs_measured_matmul": flops_6n * tokens_per_s / (peak_tflops * 1e12),
        "mfu_lora_4n_vs_measured_matmul": flops_lora * tokens_per_s / (peak_tflops * 1e12),
    }  # fmt: skip
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / (1 << 30)
    return result


def markdown(report: dict[str, Any]) -> str:
    """A BENCHMARKS.md section for the report."""
    env, bw, mm, sft = report["environment"], report["bandwidth"], report["matmul"], report["lora_sft"]
    lines = [
        f"### GPU benchmark ({env['device']}, torch {env['torch']}, {report['finished_at']})",
        "",
        f"- Device-to-device copy: **{bw['gb_per_s']:.0f} GB/s** (read + write; datasheet HBM {H200_HBM_TBPS} TB/s)",
        f"- bf16 matmul {mm['n']}^3: **{mm['tflops']:.0f} TFLOP/s** (datasheet dense {H200_DENSE_BF16_TFLOPS:.0f})",
        f"- Model: random Llama, {report['model']['params'] / 1e9:.2f} B parameters, {report['model']['dtype']}",
        "",
        "| PyTorch engine decode | engine | tokens/s | ms/step | achieved GB/s | of measured bandwidth |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["decode"]:
        lines.append(
            f"| batch {row['batch']} × {row['max_tokens']} tokens | {row.get('engine', 'continuous')} "
            f"| {row['tokens_per_s']:.0f} | {row['ms_per_step']:.1f} "
            f"| {row['achieved_gb_per_s']:.0f} | {100 * row['fraction_of_measured_bandwidth']:.1f}% |"
        )
    arrivals = report.get("arrivals") or []
    if arrivals:
        lines += ["", "| Requests arriving one every gap | engine | tokens/s | TTFT p50 ms | TTFT max ms |", "|---|---|---|---|---|"]
        for row in arrivals:
            lines.append(
                f"| {row['requests']} × {row['max_tokens']} tokens, every {row['gap_ms']:.0f} ms | {row['engine']} "
                f"| {row['tokens_per_s']:.0f} | {row['ttft_p50_ms']:.0f} | {row['ttft_max_ms']:.0f} |"
            )
    multi = report.get("multi_lora")
    if multi:
        ms, reads = multi["summary"], multi["weight_reads"]
        lines += [
            "",
            f"Multi-LoRA decode, {multi['rows']} concurrent requests × {multi['max_tokens']} tokens, each with its own rank-16 "
            f"adapter (their LoRA weights {reads['lora_over_base']:.2f}× the base's per step): "
            f"**{ms['tokens_per_s_ratio']['median']:.2f}×** the base alone's tokens/s "
            f"({ms['lora_tokens_per_s']['median']:.0f} against {ms['merged_tokens_per_s']['median']:.0f}).",
        ]
    lines += [
        "",
        f"LoRA SFT (r=16, all linear layers, batch {sft['batch']} × {sft['seq_len']} tokens): **{sft['tokens_per_s']:.0f} tokens/s**, "
        f"MFU {100 * sft['mfu_lora_4n_vs_datasheet']:.1f}% (LoRA 4N count) / {100 * sft['mfu_6n_vs_datasheet']:.1f}% (6N count) "
        f"of the datasheet peak; {100 * sft['mfu_lora_4n_vs_measured_matmul']:.1f}% / {100 * sft['mfu_6n_vs_measured_matmul']:.1f}% "
        "of the measured matmul peak.",
        "",
    ]
    return "\n".join(lines)


def run(out: Path, *, smoke: bool) -> dict[str, Any]:
    """Run every measurement and write the JSON and Markdown reports."""
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    if not cuda and not smoke:
        raise SystemExit("no CUDA device: run with --smoke for a CPU check of the script")
    device = torch.device("cuda" if cuda else "cpu")
    started = time.perf_counter()
    report: dict[str, Any] = {
        "environment": {
            "device": torch.cuda.get_device_name(0) if cuda else host_platform.processor() or "cpu",
            "capability": "sm{}{}".format(*torch.cuda.get_device_capability(0)) if cuda else None,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
            "smoke": smoke,
        }
    }
    report["bandwidth"] = measure_bandwidth(device, gib=0.25 if smoke else 4.0, iters=5 if smoke else 20)
    report["matmul"] = measure_matmul(device, n=512 if smoke else 8192, iters=3 if smoke else 10)
    with tempfile.TemporaryDirectory(prefix="forgeline-bench-") as tmp:
        folder = Path(tmp) / "model"
        report["model"] = save_random_model(folder, smoke=smoke, device=device)
        if cuda:
            torch.cuda.empty_cache()
        report["decode"] = bench_decode(
            folder, report["model"], report["bandwidth"]["gb_per_s"], device=device.type,
            batches=[1, 4] if smoke else [1, 8, 32], max_tokens=16 if smoke else 256,
        )  # fmt: skip
        report["arrivals"] = bench_arrivals(
            folder, device=device.type, requests=4 if smoke else 32, gap_s=0.01 if smoke else 0.05,
            max_tokens=16 if smoke else 256,
        )  # fmt: skip
        report["multi_lora"] = bench_multi_lora(
            folder, Path(tmp), device=device.type, rows=4 if smoke else 16, max_tokens=8 if smoke else 128, rounds=1 if smoke else 2,
        )  # fmt: skip
    if cuda:
        torch.cuda.empty_cache()
    report["lora_sft"] = bench_lora_sft(
        device=device, smoke=smoke, batch=2 if smoke else 8, seq=64 if smoke else 2048, steps=2 if smoke else 10,
        peak_tflops=report["matmul"]["tflops"],
    )  # fmt: skip
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu-bench.md").write_text(markdown(report))
    logger.info("wrote %s and %s in %.0f s", out / "gpu-bench.json", out / "gpu-bench.md", report["seconds"])
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "bench" / "results"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (runs on CPU too): checks the script, measures nothing useful")
    args = parser.parse_args(argv)
    report = run(args.out, smoke=args.smoke)
    sys.stdout.write(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
