"""Fake ``tensorrt_llm.quantization.quantize_and_export`` (signature as called by examples/quantization/quantize.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tensorrt_llm import record


def quantize_and_export(
    *,
    model_dir,
    device,
    calib_dataset,
    dtype,
    qformat,
    kv_cache_dtype,
    calib_size,
    batch_size,
    calib_max_seq_length,
    awq_block_size,
    output_dir,
    tp_size,
    pp_size,
    cp_size,
    seed,
    tokenizer_max_seq_length,
    num_medusa_heads=None,
    num_medusa_layers=None,
    max_draft_len=None,
    medusa_hidden_act=None,
    medusa_model_dir=None,
    quant_medusa_head=None,
    auto_quantize_bits=None,
    device_map="auto",
    quantize_lm_head=False,
    export_format="tensorrt_llm",
):
    record("quantize_and_export", model_dir=model_dir, qformat=qformat, kv_cache_dtype=kv_cache_dtype, export_format=export_format,
           output_dir=output_dir, calib_dataset=calib_dataset, dtype=dtype, tp_size=tp_size)
    shutil.copytree(model_dir, output_dir, dirs_exist_ok=True)
    (Path(output_dir) / "hf_quant_config.json").write_text(
        json.dumps({"producer": {"name": "modelopt"}, "quantization": {"quant_algo": qformat.upper(), "kv_cache_quant_algo": kv_cache_dtype.upper()}})
    )
