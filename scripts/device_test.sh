#!/usr/bin/env bash
# GPU run on the device machine, from any directory: the test suites on CUDA (bf16 cases where the
# kernel tests parametrize dtypes), kernel tuning and the kernel benchmarks.
#
#   STEPS="tests tune bench" TESTS="tests/kernels" scripts/device_test.sh [bench_kernels.py args]
#
# STEPS (default "tests bench"): tests -> pytest over $TESTS (default: tests/kernels tests/lora
# tests/models, 8 xdist workers); tune -> scripts/tune_kernels.py $TUNE_ARGS (configs/moe_*.json);
# bench -> scripts/bench_kernels.py (benchmarks/results/kernels_<device>.json, per-kernel
# profile). Logs, configs and results are copied to $OUT (the device tool's output folder).
# Tiny test models are read from $SGLORA_CACHE_DIR (default .cache/sglora: carry it to skip
# rebuilding them).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export SGLORA_CACHE_DIR="${SGLORA_CACHE_DIR:-$PWD/.cache/sglora}"
OUT="${OUT:-/tmp/sglora-device}"
mkdir -p "$OUT"
STEPS="${STEPS:-tests bench}"
status=0
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
for step in $STEPS; do
    start=$(date +%s)
    case $step in
    tests)
        # shellcheck disable=SC2086
        python3 -m pytest -q -p no:warnings -n "${WORKERS:-8}" ${TESTS:-tests/kernels tests/lora tests/models} \
            2>&1 | tee "$OUT/tests.log" | tail -40 || status=1
        ;;
    tune)
        # shellcheck disable=SC2086
        python3 scripts/tune_kernels.py ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.log" || status=1
        cp sglora/kernels/configs/moe_*.json "$OUT/" 2>/dev/null
        ;;
    bench)
        python3 scripts/bench_kernels.py --profile "$OUT/profile.txt" "$@" 2>&1 \
            | tee "$OUT/bench.log" || status=1
        cp benchmarks/results/kernels_*.json "$OUT/" 2>/dev/null
        ;;
    *) echo "unknown step $step" && status=1 ;;
    esac
    echo "== $step: $(($(date +%s) - start)) s"
done
exit $status
