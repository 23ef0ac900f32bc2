"""Fake ``tensorrt_llm.llmapi``: BuildConfig, QuantConfig, QuantAlgo, CalibConfig with documented fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum


class QuantAlgo(StrEnum):
    FP8 = "FP8"
    W4A16_AWQ = "W4A16_AWQ"
    NVFP4 = "NVFP4"


@dataclass(kw_only=True)
class BuildConfig:
    max_batch_size: int = 2048
    max_num_tokens: int = 8192
    max_seq_len: int | None = None
    max_beam_width: int = 1
    max_input_len: int = 1024

    def to_dict(self):
        return asdict(self)


@dataclass(kw_only=True)
class QuantConfig:
    quant_algo: QuantAlgo | None = None
    kv_cache_quant_algo: QuantAlgo | None = None


@dataclass(kw_only=True)
class CalibConfig:
    device: str = "cuda"
    calib_dataset: str = "cnn_dailymail"
    calib_batches: int = 512
    calib_batch_size: int = 1
    calib_max_seq_length: int = 512
    random_seed: int = 1234
    tokenizer_max_seq_length: int = 2048
