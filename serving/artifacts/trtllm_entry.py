"""In-container entry point: build a TensorRT-LLM artifact, or start its ``trtllm-serve`` worker.

Runs inside NVIDIA's TensorRT-LLM release image (see ``trtllm_version.py``), never in
forgeline's environment, so it imports only the standard library and ``tensorrt_llm``.
The host prepares the artifact folder (checkpoint, adapters, serve YAML) and a JSON spec;
this script does the GPU work and reports what it did in ``job/build-result.json``.

    python3 trtllm_entry.py build --spec ARTIFACT/job/build-spec.json
    python3 trtllm_entry.py serve --artifact ARTIFACT [--host 0.0.0.0] [--port 8000]

Build steps, by spec:
* FP8 with the pytorch backend: ModelOpt post-training quantization through
  ``tensorrt_llm.quantization.quantize_and_export(..., export_format="hf")`` (what
  ``examples/quantization/quantize.py`` calls), written to ``quantized/``;
* ``backend: tensorrt``: ``tensorrt_llm._tensorrt_engine.LLM`` with a ``BuildConfig``
  (and ``QuantConfig(quant_algo=FP8, kv_cache_quant_algo=FP8)`` for FP8), saved with
  ``llm.save`` to ``engine/``;
* a smoke test: the artifact's own ``trtllm-serve`` argv, ``/health``, one completion.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

logger = logging.getLogger("forgeline.trtllm_entry")

RESULT_FILE = "job/build-result.json"
MANIFEST_FILE = "forgeline-engine.json"


class BuildFailed(Exception):
    """A build step failed; the message says which and why."""


def detected_gpus() -> list[str]:
    """``name, compute_cap`` of each visible GPU, from ``nvidia-smi`` (empty when it is missing)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("nvidia-smi failed: %s", exc)
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def check_version(expected: str) -> str:
    """The installed TensorRT-LLM version; refuses any other than the pinned one."""
    import tensorrt_llm

    version = str(tensorrt_llm.__version__)
    if version != expected:
        raise BuildFailed(f"this image has TensorRT-LLM {version}, the artifact is pinned to {expected}; use the pinned image")
    return version


def quantize_fp8_hf(spec: dict[str, Any], checkpoint: Path, out: Path) -> None:
    """FP8 weights + FP8 KV-cache scales with ModelOpt, exported as an HF checkpoint."""
    from tensorrt_llm.quantization import quantize_and_export

    calib = spec["calib"]
    wanted: dict[str, Any] = {
        "model_dir": str(checkpoint),
        "device": "cuda",
        "calib_dataset": calib["dataset"],
        "dtype": "bfloat16",
        "qformat": "fp8",
        "kv_cache_dtype": "fp8",
        "calib_size": calib["size"],
        "batch_size": calib["batch_size"],
        "calib_max_seq_length": calib["max_seq_length"],
        "awq_block_size": 128,
        "output_dir": str(out),
        # An HF checkpoint is not sharded; tensor parallelism is applied when it is served.
        "tp_size": 1,
        "pp_size": 1,
        "cp_size": 1,
        "seed": 1234,
        "tokenizer_max_seq_length": 2048,
        "export_format": "hf",
    }
    params = inspect.signature(quantize_and_export).parameters
    if "export_format" not in params:
        raise BuildFailed(
            "this TensorRT-LLM's quantize_and_export cannot export an HF checkpoint, which the pytorch backend needs; "
            "build FP8 with --backend tensorrt instead"
        )
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in wanted]
    if required:
        raise BuildFailed(f"quantize_and_export needs arguments forgeline does not know: {required}")
    quantize_and_export(**{k: v for k, v in wanted.items() if k in params})


def _lora_config_class() -> Any:
    try:
        from tensorrt_llm.lora_helper import LoraConfig
    except ImportError:  # older 1.x releases exported it from lora_manager only
        from tensorrt_llm.lora_manager import LoraConfig
    return LoraConfig


def build_engine(spec: dict[str, Any], artifact: Path, out: Path) -> None:
    """Build and serialize a TensorRT engine with the LLM API (``llm.save``)."""
    from tensorrt_llm._tensorrt_engine import LLM
    from tensorrt_llm.llmapi import BuildConfig, CalibConfig, QuantAlgo, QuantConfig

    limits = spec["limits"]
    build = {"max_batch_size": limits["max_batch_size"], "max_num_tokens": limits["max_num_tokens"]}
    if limits.get("max_seq_len"):
        build["max_seq_len"] = limits["max_seq_len"]
    kwargs: dict[str, Any] = {
        "model": str(artifact / spec["checkpoint"]),
        "tensor_parallel_size": spec["tp_size"],
        "pipeline_parallel_size": spec["pp_size"],
        "build_config": BuildConfig(**build),
    }
    if spec["quantize"] == "fp8":
        kwargs["quant_config"] = QuantConfig(quant_algo=QuantAlgo.FP8, kv_cache_quant_algo=QuantAlgo.FP8)
        calib = spec["calib"]
        kwargs["calib_config"] = CalibConfig(
            calib_dataset=calib["dataset"], calib_batches=calib["size"], calib_max_seq_length=calib["max_seq_length"]
        )
    lora = spec.get("lora")
    if lora:
        # An engine needs one adapter at build time to size its LoRA plugin.
        kwargs["lora_config"] = _lora_config_class()(
            lora_dir=[str(artifact / rel) for rel in lora["adapters"].values()],
            max_lora_rank=lora["max_lora_rank"],
            max_loras=lora["max_loras"],
            max_cpu_loras=lora["max_cpu_loras"],
            lora_target_modules=lora["target_modules"],
        )
    llm = LLM(**kwargs)
    try:
        llm.save(str(out))
    finally:
        llm.shutdown()


def fill_argv(template: list[str], artifact: str, host: str, port: int) -> list[str]:
    """Same substitution as ``serving.artifacts.trtllm_config.fill_argv`` (this file cannot import it)."""
    root = artifact.rstrip("/") or "/"
    return [a.replace("{artifact}", root).replace("{host}", host).replace("{port}", str(port)) for a in template]


def _get(url: str, timeout: float) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
            return int(resp.status)
    except (urllib.error.URLError, OSError):
        return 0


def _post(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback only
        return dict(json.loads(resp.read()))


def smoke_test(spec: dict[str, Any], artifact: Path) -> dict[str, Any]:
    """Start the artifact's worker exactly as deployed, wait for ``/health``, run one completion."""
    smoke = spec["smoke"]
    port = int(smoke["port"])
    argv = fill_argv(spec["serve_argv"], str(artifact), "127.0.0.1", port)
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    proc = subprocess.Popen(argv)
    try:
        while _get(f"{base}/health", 5) != 200:
            if proc.poll() is not None:
                raise BuildFailed(f"trtllm-serve exited with {proc.returncode} before it was healthy: {' '.join(argv)}")
            if time.monotonic() - started > smoke["timeout_s"]:
                raise BuildFailed(f"trtllm-serve was not healthy within {smoke['timeout_s']} s")
            time.sleep(2)
        ready_s = time.monotonic() - started
        body: dict[str, Any] = {"model": argv[1], "prompt": smoke["prompt"], "max_tokens": 8, "temperature": 0}
        result = {"ready_seconds": round(ready_s, 1), "completion": _post(f"{base}/v1/completions", body, 300)["choices"][0]["text"]}
        lora = spec.get("lora")
        if lora:
            name, rel = next(iter(lora["adapters"].items()))
            body["lora_request"] = {"lora_name": name, "lora_int_id": 0, "lora_path": str(artifact / rel)}
            result["lora_completion"] = _post(f"{base}/v1/completions", body, 300)["choices"][0]["text"]
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_build(spec_path: Path) -> dict[str, Any]:
    """Run every step the spec asks for and write ``job/build-result.json``."""
    spec = json.loads(spec_path.read_text())
    artifact = Path(spec["artifact"])
    started = time.monotonic()
    result: dict[str, Any] = {"ok": False, "steps": [], "gpus": detected_gpus()}
    try:
        result["tensorrt_llm_version"] = check_version(spec["expect_version"])
        if spec["quantize"] == "fp8" and spec["backend"] == "pytorch":
            t0 = time.monotonic()
            quantize_fp8_hf(spec, artifact / spec["checkpoint"], artifact / spec["model_dir"])
            result["steps"].append({"name": "quantize-fp8-modelopt-hf", "seconds": round(time.monotonic() - t0, 1)})
        if spec["backend"] == "tensorrt":
            t0 = time.monotonic()
            build_engine(spec, artifact, artifact / spec["model_dir"])
            result["steps"].append({"name": "build-tensorrt-engine", "seconds": round(time.monotonic() - t0, 1)})
        if spec["smoke"]["enabled"]:
            t0 = time.monotonic()
            result["smoke"] = smoke_test(spec, artifact)
            result["steps"].append({"name": "smoke-test", "seconds": round(time.monotonic() - t0, 1)})
        result["ok"] = True
    except BuildFailed as exc:
        result["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - reported in the result file, then re-raised by exit code
        logger.exception("build failed")
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["seconds"] = round(time.monotonic() - started, 1)
    out = artifact / RESULT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_serve(artifact: Path, host: str, port: int) -> None:
    """Replace this process with the artifact's ``trtllm-serve`` (argv from its manifest)."""
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    if manifest.get("target") != "tensorrt-llm":
        raise BuildFailed(f"{artifact} is not a tensorrt-llm artifact")
    argv = fill_argv(manifest["serve"]["argv"], str(artifact), host, port)
    logger.info("exec %s", " ".join(argv))
    os.execvp(argv[0], argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build an artifact from its spec")
    build.add_argument("--spec", type=Path, required=True)
    serve = sub.add_parser("serve", help="exec the artifact's trtllm-serve")
    serve.add_argument("--artifact", type=Path, required=True)
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if args.command == "build":
        result = run_build(args.spec)
        if not result["ok"]:
            logger.error("build failed: %s", result.get("error"))
            return 1
        logger.info("build finished in %.1f s", result["seconds"])
        return 0
    try:
        run_serve(args.artifact, args.host, args.port)
    except BuildFailed as exc:
        logger.error("%s", exc)
        return 1
    return 0  # not reached: execvp replaced the process


if __name__ == "__main__":
    sys.exit(main())
