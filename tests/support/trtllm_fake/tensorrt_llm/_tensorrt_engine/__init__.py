"""Fake ``tensorrt_llm._tensorrt_engine.LLM``: records the build, ``save`` writes placeholder engine files."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from tensorrt_llm import record
from tensorrt_llm.llmapi import BuildConfig, CalibConfig, QuantConfig
from tensorrt_llm.lora_helper import LoraConfig


class LLM:
    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        *,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        build_config: BuildConfig | None = None,
        quant_config: QuantConfig | None = None,
        calib_config: CalibConfig | None = None,
        lora_config: LoraConfig | None = None,
    ) -> None:
        for name, value, cls in (("build_config", build_config, BuildConfig), ("quant_config", quant_config, QuantConfig),
                                 ("calib_config", calib_config, CalibConfig), ("lora_config", lora_config, LoraConfig)):
            if value is not None and not isinstance(value, cls):
                raise TypeError(f"{name} must be {cls.__name__}")
        self.world_size = tensor_parallel_size * pipeline_parallel_size
        self.args = {
            "model": model,
            "tensor_parallel_size": tensor_parallel_size,
            "pipeline_parallel_size": pipeline_parallel_size,
            "build_config": asdict(build_config) if build_config else None,
            "quant_config": asdict(quant_config) if quant_config else None,
            "calib_config": asdict(calib_config) if calib_config else None,
            "lora_config": asdict(lora_config) if lora_config else None,
        }
        record("LLM", **self.args)

    def save(self, engine_dir: str) -> None:
        out = Path(engine_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"build_config": self.args["build_config"], "quant": self.args["quant_config"]}, default=str))
        for rank in range(self.world_size):
            (out / f"rank{rank}.engine").write_bytes(b"fake engine")
        record("LLM.save", engine_dir=engine_dir)

    def shutdown(self) -> None:
        record("LLM.shutdown")
