"""The PyTorch engine, its LoRA path and the upstream relay on a CUDA GPU (run by bench/gpu.sh).

Skipped without CUDA. Tiny models built from config: these check correctness on the GPU;
bench/gpu_bench.py measures speed on a ~1B model.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["Hello, world!", "The quick brown fox", "Numbers: 0 1 2", "Serving engines batch requests"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from serving.artifacts.torch_build import build_torch_artifact
    from tests.support.tiny_model import build_tiny_adapter, build_tiny_base

    root = tmp_path_factory.mktemp("gpu")
    base = build_tiny_base(root / "base")
    adapter = build_tiny_adapter(base, root / "adapter")
    build_torch_artifact(str(base), None, root / "plain")
    build_torch_artifact(str(base), adapter, root / "merged")
    return {"base": base, "adapter": adapter, "plain": root / "plain", "merged": root / "merged"}


def _reference(folder: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy text from transformers' own generate on the GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).to("cuda").eval()
    out = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to("cuda")
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def _engine_texts(folder: Path, prompts: list[str], max_new_tokens: int, adapter: Path | None = None) -> tuple[list[str], str]:
    from serving.engine.base import SamplingParams
    from serving.engine.torch_engine import TorchEngine

    engine = TorchEngine(folder, device="cuda", batch_window_ms=50.0, model_id="tiny", adapters={"support": adapter} if adapter else None)

    async def run() -> list[str]:
        await engine.start()
        try:

            async def one(prompt: str) -> str:
                params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
                return "".join([c.text async for c in engine.generate(prompt, params, adapter="support" if adapter else None)])

            return list(await asyncio.gather(*(one(p) for p in prompts)))
        finally:
            await engine.stop()

    texts = asyncio.run(run())
    return texts, str(engine._device)  # noqa: SLF001 - which device the engine really used


def test_engine_on_gpu_batches_and_matches_transformers_greedy(artifacts: dict[str, Path]) -> None:
    texts, device = _engine_texts(artifacts["plain"], PROMPTS, 16)
    assert device.startswith("cuda")
    assert texts == _reference(artifacts["plain"], PROMPTS, 16)


def test_lora_adapter_on_gpu_matches_the_merged_model(artifacts: dict[str, Path]) -> None:
    texts, _ = _engine_texts(artifacts["plain"], PROMPTS, 12, adapter=artifacts["adapter"])
    assert texts == _reference(artifacts["merged"], PROMPTS, 12)
    assert texts != _reference(artifacts["plain"], PROMPTS, 12)


def test_gateway_relays_to_a_gpu_worker(artifacts: dict[str, Path]) -> None:
    import httpx
    import openai

    from serving.engine.upstream import UpstreamEngine
    from serving.gateway.app import ServedModel, StaticCatalog, create_app
    from serving.gateway.server import serve_in_background

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "forgeline", "worker", "--artifact", str(artifacts["plain"]), "--name", "tiny",
            "--port", str(port), "--device", "cuda"]  # fmt: skip
    worker = subprocess.Popen(argv, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert worker.poll() is None and time.monotonic() < deadline, "forgeline worker did not start"
            time.sleep(0.3)
        engine = UpstreamEngine(url, "tiny", tokenizer=artifacts["plain"])
        app = create_app(StaticCatalog([ServedModel(name="tiny-up", version="1", engine=engine)]), max_new_tokens=64)
        gateway, stop = serve_in_background(app)
        try:
            client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
            got = client.completions.create(model="tiny-up", prompt=PROMPTS[0], max_tokens=16, temperature=0)
            assert got.choices[0].text == _reference(artifacts["plain"], PROMPTS[:1], 16)[0]
        finally:
            stop()
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)


def test_benchmark_runs_on_the_gpu(tmp_path: Path) -> None:
    sys.path.append(str(REPO))
    from bench.gpu_bench import run

    report = run(tmp_path, smoke=True)
    assert report["environment"]["capability"], "not measured on a GPU"
    assert report["bandwidth"]["gb_per_s"] > 50
    assert all(row["tokens"] > 0 and row["tokens_per_s"] > 0 for row in report["decode"])
    assert report["lora_sft"]["tokens_per_s"] > 0 and 0 < report["lora_sft"]["mfu_lora_4n_vs_measured_matmul"] < 1
    multi = report["multi_lora"]["rounds"][0]
    assert multi["merged"]["tokens"] > 0 and multi["lora"]["tokens"] > 0 and multi["ratio"] > 0
    assert (tmp_path / "gpu-bench.json").is_file() and (tmp_path / "gpu-bench.md").read_text().startswith("### GPU benchmark")
