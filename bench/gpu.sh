#!/usr/bin/env bash
# GPU checks for a lent H200 (no network needed): the `gpu` tests, then bench/gpu_bench.py.
# Run from the repo root with the Python of a venv that has forgeline's dependencies:
#   PYTHON=.venv/bin/python bash bench/gpu.sh
# Results go to $OUT (when set) or bench/results/: gpu-tests.log, gpu-tests.xml, gpu-bench.json,
# gpu-bench.md (a section for BENCHMARKS.md), gpu-bench.log. Budget: < 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
RESULTS="${OUT:-bench/results}"
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0))" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$RESULTS/nvidia-smi.txt" || true

status=0
start=$(date +%s)
timeout 210 "$PYTHON" -m pytest tests/gpu -m gpu -q -ra -p no:cacheprovider --junitxml "$RESULTS/gpu-tests.xml" 2>&1 | tee "$RESULTS/gpu-tests.log" || status=1
echo "gpu tests: $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout 370 "$PYTHON" bench/gpu_bench.py --out "$RESULTS" 2>&1 | tee "$RESULTS/gpu-bench.log" || status=1
echo "gpu bench: $(( $(date +%s) - start )) s"
exit "$status"
