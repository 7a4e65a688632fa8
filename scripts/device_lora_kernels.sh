#!/usr/bin/env bash
# Dense LoRA kernels on the device machine, from any directory: the kernel tests on CUDA (bf16
# cases included), the backends-vs-PEFT model test compiled in float32, and the shrink+expand
# benchmark (scripts/bench_lora_kernels.py -> benchmarks/results/kernels_<device>.json). Logs
# and results are copied to $OUT. A section to merge into scripts/device_test.sh as
# `STEPS=lora`; arguments go to the benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export SGLORA_CACHE_DIR="${SGLORA_CACHE_DIR:-$PWD/.cache/sglora}"
OUT="${OUT:-/tmp/sglora-device}"
mkdir -p "$OUT"
status=0
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${WORKERS:-8}")
start=$(date +%s)
# shellcheck disable=SC2086
python3 -m pytest -q -p no:warnings $xdist tests/kernels/test_lora_kernels.py \
    tests/kernels/test_lora_backends_match_peft.py 2>&1 | tee "$OUT/lora_tests.log" | tail -30 \
    || status=1
echo "== lora tests: $(($(date +%s) - start)) s"
start=$(date +%s)
python3 scripts/bench_lora_kernels.py "$@" 2>&1 | tee "$OUT/lora_bench.log" || status=1
cp benchmarks/results/kernels_*.json "$OUT/" 2>/dev/null
echo "== lora bench: $(($(date +%s) - start)) s"
exit $status
