"""The benchmarks run alone (not in `python -m bench`'s suite) run end to end on tiny settings.

Nothing about speed is asserted (tiny settings mean nothing); what is checked is that each
measured what it says it measures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

pytestmark = [pytest.mark.integration]


def _run(module: str, out: Path, *args: str) -> dict:
    cmd = [sys.executable, "-m", module, *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "|---|" in proc.stdout  # the table for BENCHMARKS.md
    return json.loads(out.read_text())


def test_gc_pause_times_collections_of_a_started_worker_before_and_after_the_freeze(tmp_path: Path) -> None:
    result = _run("bench.gc_pause", tmp_path / "gc.json", "--size", "tiny", "--rounds", "1")
    assert result["frozen_objects"] > 100_000  # a started worker: torch, transformers, the app
    assert result["tracked_after_freeze"] < result["tracked_objects"] / 100
    assert result["full_collection_ms"] > 0 and result["full_collection_frozen_ms"] >= 0


def test_cpu_dtype_serves_the_same_burst_in_both_dtypes(tmp_path: Path) -> None:
    result = _run("bench.cpu_dtype", tmp_path / "dtype.json", "--size", "tiny", "--requests", "2", "--max-tokens", "4", "--rounds", "1")
    (round_,) = result["rounds"]
    assert set(round_) == {"float32", "bfloat16"}
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in round_.values())


def test_lora_step_times_the_stacked_decode_step_and_the_closed_loop_against_the_merged_model(tmp_path: Path) -> None:
    result = _run(
        "bench.lora_step", tmp_path / "step.json", "--size", "tiny", "--rows", "2", "--rank", "4", "--reps", "1",
        "--engine", "--adapters", "3", "--requests", "4", "--max-tokens", "2",
    )  # fmt: skip
    step = result["decode_step"]
    assert step["rows"] == 2 and step["merged_ms"]["n"] == step["lora_ms"]["n"] == 1
    assert step["merged_ms"]["median"] > 0 and step["lora_ms"]["median"] > 0
    # The tiny base's layer: hidden 128, k/v 64, intermediate 352; rank 4 on all seven linears.
    layer = 128 * 128 * 2 + 128 * 64 * 2 + 128 * 352 * 3
    adapter = 4 * (256 + 192 * 2 + 256 + 480 * 3)
    assert result["adapter_share_of_layer"] == pytest.approx(adapter / layer)
    vocab = json.loads((REPO / "assets" / "tiny-base" / "config.json").read_text())["vocab_size"]
    reads = result["weight_reads"]  # 4 layers and the output head; one adapter per row
    assert reads["base"] == 4 * layer + 128 * vocab and reads["lora"] == 2 * 4 * adapter
    engine = result["engine"]
    assert engine["adapters"] == 3 and engine["loaded_adapters"] == 3 and len(engine["rounds"]) == 1
    (round_,) = engine["rounds"]
    # Every request ran on each engine: 4 requests of 2 tokens (random weights, no early stop).
    assert round_["merged"]["tokens"] == round_["lora"]["tokens"] == 8
    assert engine["summary"]["tokens_per_s_ratio"]["median"] == pytest.approx(round_["ratio"])


def test_the_gpu_benchmark_runs_its_smoke_sizes_on_a_cpu(tmp_path: Path) -> None:
    """bench/gpu.sh runs it on a lent GPU, rarely: a broken script would waste that machine's time."""
    proc = subprocess.run(
        [sys.executable, "bench/gpu_bench.py", "--smoke", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert report["environment"]["smoke"] is True
    assert {row["engine"] for row in report["decode"]} == {"continuous", "static"}
    multi = report["multi_lora"]
    (round_,) = multi["rounds"]
    # 2 waves of 4 requests × 8 tokens on each engine, every row of a wave with its own adapter.
    assert round_["merged"]["tokens"] == round_["lora"]["tokens"] == 64
    assert multi["weight_reads"]["lora_over_base"] > 0
    assert "Multi-LoRA decode" in (tmp_path / "gpu-bench.md").read_text()
