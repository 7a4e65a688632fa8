#!/usr/bin/env bash
# On the GPU machine: CUDA-graph tests (tiny model), then the end-to-end decode benchmark of
# Qwen3-30B-A3B with dummy weights at TP1 in three modes. Results under $OUT (new rows in
# $OUT/decode_rows.json: scripts/append_rows.py adds them to benchmarks/results/).
#   BS="1 64 256" STEPS=8 scripts/device_e2e.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SGLORA_CACHE_DIR=${SGLORA_CACHE_DIR:-$PWD/.cache/sglora}
OUT=${OUT:-/tmp/sglora-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python -m pytest -q -s -p no:cacheprovider -p no:warnings tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" \
    || echo "GPU TESTS FAILED (benchmark runs anyway)"
fi
python scripts/bench_one_batch.py --batch-sizes ${BS:-1 64 256} --decode-steps "${STEPS:-8}" \
  --input-len "${INPUT_LEN:-1024}" --out "$OUT/decode_rows.json" ${BENCH_ARGS:-} 2>&1 |
  tee "$OUT/bench_one_batch.log"
